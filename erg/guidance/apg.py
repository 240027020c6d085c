"""Adaptive projected guidance (Sadat et al., ICLR 2025), on denoised (x0) predictions.

    diff    = x0_pos - x0_neg
    running = diff + momentum * running;  diff = running          (negative momentum: momentum < 0)
    diff   *= min(1, r / ||diff||)                                 (L2 over C, H, W per sample; r > 0)
    par     = <diff, u> u,  u = x0_pos / ||x0_pos||                (float64)
    update  = (diff - par) + eta * par
    x0      = x0_pos + (w - 1) * update,   then back to a velocity: v = (x0 - x_t) / (1 - t)

The paper's setting (ERG paper, Sec. 4.1): momentum -0.5, eta 0, r 5. Traps avoided (REFERENCE.md):
diffusers' guider returns neg + w * update and defaults eta to 1; here out = pos + (w - 1) * update
and eta defaults to 0; the momentum buffer lives in the per-run state, so it starts at zero in every
sampling run. r depends on resolution and channels (tune it per model). With momentum 0, r 0 and
eta 1 APG is CFG.

APG only changes how pos and neg are combined: `with_apg` puts it on any method with a pos/neg
pair (CFG -> APG, ERG -> ERG + APG), keeping the method's branches and other terms.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from erg.flow import velocity_from_x0
from erg.guidance.base import Combine, Guidance, Linear, Step, Term, add_terms, term_branches
from erg.guidance.config import GuidanceConfigError, finite

__all__ = ["APG", "APGConfig", "apg_update", "with_apg"]


@dataclass
class APGConfig:
    momentum: float = -0.5
    eta: float = 0.0
    norm_threshold: float = 5.0  # r; 0 disables the rescaling

    def __post_init__(self) -> None:
        finite(self.momentum, "guidance.apg.momentum")
        finite(self.eta, "guidance.apg.eta")
        if not (isinstance(self.norm_threshold, int | float) and self.norm_threshold >= 0):
            raise GuidanceConfigError(f"guidance.apg.norm_threshold must be >= 0, got {self.norm_threshold!r}")


def apg_update(diff: Tensor, pos: Tensor, eta: float, norm_threshold: float) -> Tensor:
    """Rescale diff to norm <= r, split it into the parts parallel / orthogonal to pos (float64),
    return orthogonal + eta * parallel. Shapes (B, C, H, W); norms per sample."""
    dims = tuple(range(1, diff.ndim))
    if norm_threshold > 0:
        norm = diff.norm(p=2, dim=dims, keepdim=True)
        diff = diff * torch.clamp(norm_threshold / norm, max=1.0)
    d64, p64 = diff.double(), pos.double()
    unit = p64 / p64.norm(p=2, dim=dims, keepdim=True).clamp_min(1e-12)
    parallel = (d64 * unit).sum(dim=dims, keepdim=True) * unit
    orthogonal = d64 - parallel
    return (orthogonal + eta * parallel).to(diff.dtype)


@dataclass(frozen=True)
class APG(Combine):
    scale: float  # w
    momentum: float = -0.5
    eta: float = 0.0
    norm_threshold: float = 5.0
    pos: str = "pos"
    neg: str = "neg"
    extra: tuple[Term, ...] = ()  # other terms of the method, added in velocity space

    def new_state(self) -> dict[str, Any]:
        return {"running": None}

    def __call__(self, step: Step, state: dict[str, Any]) -> Tensor:
        x0_pos, x0_neg = step.x0(self.pos), step.x0(self.neg)
        diff = x0_pos - x0_neg
        if self.momentum != 0:
            running = state.get("running")
            diff = diff if running is None else diff + self.momentum * running
            state["running"] = diff
        update = apg_update(diff, x0_pos, self.eta, self.norm_threshold)
        x0 = x0_pos + (self.scale - 1.0) * update
        return add_terms(velocity_from_x0(step.x, x0, step.t), self.extra, step)

    @property
    def uses(self) -> frozenset[str]:
        return frozenset([self.pos, self.neg, *(t.plus for t in self.extra), *(t.minus for t in self.extra)])

    def needs(self, step: Step) -> frozenset[str]:
        return frozenset([self.pos, self.neg]) | term_branches(self.extra, step)


def with_apg(guidance: Guidance, cfg: APGConfig) -> Guidance:
    """Replace the pos/neg term of a linear method by APG (same branches, same other terms)."""
    combine = guidance.combine
    if not isinstance(combine, Linear) or combine.base != "pos":
        raise GuidanceConfigError(f"guidance.apg: method {guidance.name} has no linear pos/neg combination to replace")
    pair = [t for t in combine.terms if t.plus == "pos" and t.minus == "neg"]
    if not pair:
        raise GuidanceConfigError(
            f"guidance.apg combines the branches 'pos' and 'neg', but {guidance.name} evaluates "
            f"{[b.name for b in guidance.branches]} (a guidance scale of 1 evaluates no negative branch)"
        )
    extra = tuple(t for t in combine.terms if t is not pair[0])
    apg = APG(pair[0].scale + 1.0, cfg.momentum, cfg.eta, cfg.norm_threshold, extra=extra)
    return replace(guidance, combine=apg)
