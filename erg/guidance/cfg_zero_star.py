"""CFG-Zero* (Fan et al., 2025, "CFG-Zero*: Improved Classifier-Free Guidance for Flow Matching Models").

Two changes to CFG, on the predicted velocities (the paper works on flow-matching velocities):

    s*  = <v_c, v_u> / ||v_u||^2                  optimised scale, per sample over C, H, W (+ 1e-8)
    out = s* v_u + w (v_c - s* v_u)               = pos + (w - 1)(pos - s* neg)
    out = 0 for the first `zero_init_steps` steps (zero-init: the velocity of the first steps is zeroed)

pos = D(x, c), neg = D(x, null). s* is the least-squares scale of the unconditional velocity towards the
conditional one (the paper's eq. for s*; its README's `optimized_scale`); with s* = 1 this is CFG.
Zero-init follows the authors' code (github.com/WeichenFan/CFG-Zero-star, `models/sd/sd3_pipeline.py`:
`if (i <= zero_steps) and use_zero_init: noise_pred = noise_pred_text * 0.`, zero_steps = 0 by
default, i.e. the first step) and diffusers' `zero_init_steps = 1`: the state does not move on those
steps, and since nothing is read there no branch is evaluated at all (NFE 0 on them, 2 after).
The velocity's sign convention does not matter: s* and the combination are unchanged when both
predictions change sign (diffusers' v = -v here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from erg.guidance.base import NULL, Branch, Combine, Condition, Guidance, Step
from erg.guidance.config import GuidanceConfigError, finite

__all__ = ["CFGZeroStar", "CFGZeroStarConfig", "build_cfg_zero_star", "optimized_scale"]


def optimized_scale(pos: Tensor, neg: Tensor, eps: float = 1e-8) -> Tensor:
    """s* = <pos, neg> / (||neg||^2 + eps) per sample, shaped to broadcast against (B, ...)."""
    p, n = pos.flatten(1).float(), neg.flatten(1).float()
    s = (p * n).sum(dim=1) / ((n * n).sum(dim=1) + eps)
    return s.view(-1, *(1,) * (pos.ndim - 1)).to(pos.dtype)


@dataclass(frozen=True)
class CFGZeroStar(Combine):
    scale: float  # w
    zero_init_steps: int = 1
    use_optimized_scale: bool = True
    pos: str = "pos"
    neg: str | None = "neg"  # None: w = 1, no negative branch

    def _zero(self, step: Step) -> bool:
        return step.index < self.zero_init_steps

    def __call__(self, step: Step, state: dict[str, Any]) -> Tensor:
        if self._zero(step):
            return torch.zeros_like(step.x)
        pos = step.preds[self.pos]
        if self.neg is None:
            return pos
        neg = step.preds[self.neg]
        if self.use_optimized_scale:
            neg = optimized_scale(pos, neg) * neg
        return neg + self.scale * (pos - neg)

    @property
    def uses(self) -> frozenset[str]:
        return frozenset([self.pos] if self.neg is None else [self.pos, self.neg])

    def needs(self, step: Step) -> frozenset[str]:
        return frozenset() if self._zero(step) else self.uses


@dataclass
class CFGZeroStarConfig:
    scale: float = 3.0  # w
    zero_init_steps: int = 1  # K: the velocity of steps 0 .. K - 1 is zero (0: no zero-init)
    optimized_scale: bool = True  # s*; false: plain CFG (with zero-init), the paper's ablation

    def __post_init__(self) -> None:
        finite(self.scale, "guidance.scale")
        if not (isinstance(self.zero_init_steps, int) and self.zero_init_steps >= 0):
            raise GuidanceConfigError(
                f"guidance.zero_init_steps must be an integer >= 0 (steps whose velocity is zero), got "
                f"{self.zero_init_steps!r}"
            )
        if not isinstance(self.optimized_scale, bool):
            raise GuidanceConfigError(f"guidance.optimized_scale must be true or false, got {self.optimized_scale!r}")


def build_cfg_zero_star(cfg: CFGZeroStarConfig, name: str = "cfg_zero_star") -> Guidance:
    if cfg.scale == 1.0:  # out = pos after the zero-init steps: no negative branch
        return Guidance(name, (Branch("pos"),), CFGZeroStar(1.0, cfg.zero_init_steps, cfg.optimized_scale, neg=None))
    branches = (Branch("pos"), Branch("neg", Condition(NULL)))
    return Guidance(name, branches, CFGZeroStar(cfg.scale, cfg.zero_init_steps, cfg.optimized_scale))
