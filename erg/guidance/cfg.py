"""No guidance, and classifier-free guidance (Ho & Salimans, 2021).

    none: out = D(x, c)                                             NFE 1
    CFG:  out = pos + (w - 1)(pos - neg),  pos = D(x, c), neg = D(x, null)   NFE 2
        = neg + w (pos - neg)

w = 1 is no guidance: the negative branch is then not evaluated at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from erg.guidance.base import NULL, Branch, Condition, Guidance, Linear, Term
from erg.guidance.config import finite

__all__ = ["CFGConfig", "NoneConfig", "build_cfg", "build_none", "linear_pair"]


@dataclass
class NoneConfig:
    """No settings."""


@dataclass
class CFGConfig:
    scale: float = 3.0  # w

    def __post_init__(self) -> None:
        finite(self.scale, "guidance.scale")


def build_none(cfg: NoneConfig, name: str = "none") -> Guidance:
    return Guidance(name, (Branch("pos"),), Linear())


def linear_pair(name: str, scale: float, neg: Branch) -> Guidance:
    """pos + (w - 1)(pos - neg); with w = 1 only the positive branch is evaluated."""
    if scale == 1.0:
        return Guidance(name, (Branch("pos"),), Linear())
    return Guidance(name, (Branch("pos"), neg), Linear((Term(scale - 1.0, "pos", neg.name),)))


def build_cfg(cfg: CFGConfig, name: str = "cfg") -> Guidance:
    return linear_pair(name, cfg.scale, Branch("neg", Condition(NULL)))
