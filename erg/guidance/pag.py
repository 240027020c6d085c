"""Perturbed-attention guidance (Ahn et al., ECCV 2024), PAG* of the ERG paper.

The perturbed branch replaces the image-to-image self-attention map by the identity (output = V,
`erg.attention.Identity`) in the chosen (middle) blocks; see perturbed.py for the combination.
Scale convention: `pag_scale` is s in pos + s (pos - perturbed) (PAG's eq. and diffusers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from erg.attention import Identity
from erg.guidance.base import Guidance
from erg.guidance.config import finite, layer_range
from erg.guidance.perturbed import perturbed_guidance

__all__ = ["PAGConfig", "build_pag"]


@dataclass
class PAGConfig:
    scale: float = 1.0  # w of the CFG term (1: PAG alone, NFE 2 as in the paper's tables)
    pag_scale: float = 3.0  # s
    layers: Any = (12, 15)  # [l_min, l_max): middle blocks (appendix B.4)

    def __post_init__(self) -> None:
        finite(self.scale, "guidance.scale")
        finite(self.pag_scale, "guidance.pag_scale")
        self.layers = layer_range(list(self.layers), "guidance.layers")


def build_pag(cfg: PAGConfig, name: str = "pag") -> Guidance:
    return perturbed_guidance(name, cfg.scale, cfg.pag_scale, Identity(), cfg.layers, "guidance.layers")
