"""Smoothed energy guidance (Hong, NeurIPS 2024), SEG* of the ERG paper.

The perturbed branch blurs the image-token queries on their 2D grid with a Gaussian of std `sigma`
(`erg.attention.SmoothedEnergy`; sigma >= 1e4, e.g. `.inf`, means their mean) in the chosen blocks;
see perturbed.py for the combination (with CFG: 3 evaluations, the paper's NFE column).
Traps of public code avoided: the infinite / finite cases are not swapped, and a perturbation that
cannot attach (no image grid) is an error, not plain CFG.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from erg.attention import SmoothedEnergy
from erg.guidance.base import Guidance
from erg.guidance.config import finite, layer_range, positive
from erg.guidance.perturbed import perturbed_guidance

__all__ = ["SEGConfig", "build_seg"]


@dataclass
class SEGConfig:
    scale: float = 3.0  # w of the CFG term
    seg_scale: float = 3.0  # s (SEG's default)
    sigma: float = float("inf")  # blur std on the token grid; >= 1e4 = infinite (mean query)
    layers: Any = (12, 15)  # [l_min, l_max): middle blocks (appendix B.4)

    def __post_init__(self) -> None:
        finite(self.scale, "guidance.scale")
        finite(self.seg_scale, "guidance.seg_scale")
        positive(self.sigma, "guidance.sigma")
        self.layers = layer_range(list(self.layers), "guidance.layers")


def build_seg(cfg: SEGConfig, name: str = "seg") -> Guidance:
    return perturbed_guidance(name, cfg.scale, cfg.seg_scale, SmoothedEnergy(cfg.sigma), cfg.layers, "guidance.layers")
