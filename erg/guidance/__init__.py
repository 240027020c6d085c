"""Guidance methods as named branches + combine rules, and the registry that builds them from config.

    guidance = build_guidance({"method": "erg", "scale": 3.0, "image": {...}, "apg": {...}})

`method` picks the branches and the combine rule (none, cfg, erg, pag, seg, sag, autoguidance, and the
guiders of the ecosystem: cfg_zero_star, slg, fdg, tcfg, mambo_g); `apg` and `cads` compose with any
method that has the branches they act on (APG replaces the pos/neg combination, CADS noises a branch's
condition), so ERG + APG and ERG + CADS are not separate methods; `interval` ([t_lo, t_hi], the guidance
interval) restricts any method's guidance to t_lo <= t < t_hi. `name` is the method's name in tables;
`guided_channels` is DiT/SiT's first-channels-only quirk (off by default).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from erg.guidance.apg import APGConfig, with_apg
from erg.guidance.autoguidance import AutoGuidanceConfig, build_autoguidance
from erg.guidance.base import Guidance
from erg.guidance.cads import CADSConfig, with_cads
from erg.guidance.cfg import CFGConfig, NoneConfig, build_cfg, build_none
from erg.guidance.cfg_zero_star import CFGZeroStarConfig, build_cfg_zero_star
from erg.guidance.config import GuidanceConfigError, parse
from erg.guidance.erg import ERGConfig, build_erg
from erg.guidance.fdg import FDGConfig, build_fdg
from erg.guidance.interval import parse_interval, with_interval
from erg.guidance.mambo_g import MamboGConfig, build_mambo_g
from erg.guidance.pag import PAGConfig, build_pag
from erg.guidance.sag import SAGConfig, build_sag
from erg.guidance.seg import SEGConfig, build_seg
from erg.guidance.slg import SLGConfig, build_slg
from erg.guidance.tcfg import TCFGConfig, build_tcfg

__all__ = ["METHODS", "GuidanceConfigError", "build_guidance"]

METHODS: dict[str, tuple[type, Callable[..., Guidance]]] = {
    "none": (NoneConfig, build_none),
    "cfg": (CFGConfig, build_cfg),
    "erg": (ERGConfig, build_erg),
    "pag": (PAGConfig, build_pag),
    "seg": (SEGConfig, build_seg),
    "sag": (SAGConfig, build_sag),
    "autoguidance": (AutoGuidanceConfig, build_autoguidance),
    "cfg_zero_star": (CFGZeroStarConfig, build_cfg_zero_star),
    "slg": (SLGConfig, build_slg),
    "fdg": (FDGConfig, build_fdg),
    "tcfg": (TCFGConfig, build_tcfg),
    "mambo_g": (MamboGConfig, build_mambo_g),
}
COMMON_KEYS = ("name", "method", "apg", "cads", "interval", "guided_channels")


def build_guidance(cfg: Mapping[str, Any]) -> Guidance:
    """The guidance method a (resolved) `guidance` config describes; every bad key or value raises a
    GuidanceConfigError naming it, before any model is touched."""
    cfg = dict(cfg)
    method = cfg.pop("method", None)
    if method not in METHODS:
        raise GuidanceConfigError(f"guidance.method must be one of {sorted(METHODS)}, got {method!r}")
    name = str(cfg.pop("name", None) or method)
    apg, cads, guided = cfg.pop("apg", None), cfg.pop("cads", None), cfg.pop("guided_channels", None)
    interval = parse_interval(cfg.pop("interval", None))
    config_cls, builder = METHODS[method]
    try:
        guidance = builder(parse(config_cls, cfg, "guidance"), name)
    except GuidanceConfigError as err:
        if "unknown guidance key" in str(err):
            raise GuidanceConfigError(f"{err} (and, for every method: {', '.join(COMMON_KEYS)})") from None
        raise
    if cads is not None:
        guidance = with_cads(guidance, parse(CADSConfig, cads, "guidance.cads"))
    if apg is not None:
        guidance = with_apg(guidance, parse(APGConfig, apg, "guidance.apg"))
    if interval is not None:
        guidance = with_interval(guidance, interval)
    if guided is not None:
        if not (isinstance(guided, int) and guided >= 1):
            raise GuidanceConfigError(f"guidance.guided_channels must be a positive integer or null, got {guided!r}")
        guidance = replace(guidance, guided_channels=guided)
    return guidance
