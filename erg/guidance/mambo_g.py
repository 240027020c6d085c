"""MAMBO-G, magnitude-aware mitigation for boosted guidance (Zhu et al., 2025, arXiv:2508.03442):
CFG whose scale shrinks while the guidance update is large against the unconditional prediction.

Per sample, on the predicted velocities (norms over C, H, W):

    r    = ||v_c - v_u|| / ||v_u||              the magnitude-aware ratio r_t
    w(r) = 1 + (w_max - 1) exp(-alpha r)        the damped scale (arXiv v3, eq. of w(r_t))
    out  = v_u + w(r) (v_c - v_u)

pos = v_c = D(x, c), neg = v_u = D(x, null); `scale` is w_max. alpha = 0 is CFG with w = w_max; large
r (early steps, where the guidance direction is generic, the paper's "overshoot") pulls w towards 1.
This is diffusers' `MagnitudeAwareGuidance` (the authors' integration, diffusers PR 12862) with its
default formulation; its defaults are the authors' (w_max 10, alpha 8). r is unchanged when both
velocities change sign, so diffusers' v = -v convention gives the same combination. (diffusers' version
fails on (B, C, H, W) latents with recent torch: docs/reference_bugs.md.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from erg.guidance.base import NULL, Branch, Combine, Condition, Guidance, Linear, Step
from erg.guidance.config import GuidanceConfigError, finite

__all__ = ["MamboG", "MamboGConfig", "build_mambo_g", "magnitude_ratio"]


def magnitude_ratio(pos: Tensor, neg: Tensor) -> Tensor:
    """r = ||pos - neg|| / ||neg|| per sample, shaped to broadcast against (B, ...)."""
    dims = tuple(range(1, pos.ndim))
    norm = lambda z: torch.linalg.vector_norm(z, dim=dims, keepdim=True)
    return norm(pos - neg) / norm(neg).clamp_min(1e-12)


@dataclass(frozen=True)
class MamboG(Combine):
    scale: float  # w_max
    alpha: float = 8.0
    pos: str = "pos"
    neg: str = "neg"

    def __call__(self, step: Step, state: dict[str, Any]) -> Tensor:
        pos, neg = step.preds[self.pos], step.preds[self.neg]
        w = 1.0 + (self.scale - 1.0) * torch.exp(-self.alpha * magnitude_ratio(pos, neg))
        return neg + w * (pos - neg)

    @property
    def uses(self) -> frozenset[str]:
        return frozenset([self.pos, self.neg])


@dataclass
class MamboGConfig:
    scale: float = 10.0  # w_max (the authors' example: 10 with alpha 8)
    alpha: float = 8.0  # damping strength

    def __post_init__(self) -> None:
        finite(self.scale, "guidance.scale")
        finite(self.alpha, "guidance.alpha")
        if self.alpha < 0:
            raise GuidanceConfigError(f"guidance.alpha must be >= 0 (0: plain CFG), got {self.alpha!r}")


def build_mambo_g(cfg: MamboGConfig, name: str = "mambo_g") -> Guidance:
    if cfg.scale == 1.0:  # w(r) = 1: out = c, no negative branch
        return Guidance(name, (Branch("pos"),), Linear())
    return Guidance(name, (Branch("pos"), Branch("neg", Condition(NULL))), MamboG(cfg.scale, cfg.alpha))
