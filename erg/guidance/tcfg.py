"""Tangential damping CFG, TCFG (Kwon et al., CVPR 2025): CFG against an unconditional prediction
stripped of its tangential component.

Per sample, with u = neg and c = pos flattened over C, H, W (Algorithm 1):

    A = [u; c] (2 x D),  A = W S V^T          SVD; v_1 = the first right singular vector
    u' = u V^T [v_1, 0] = (u . v_1) v_1       eq. (3): keep u's component along v_1 only
    out = u' + w (c - u')                     eq. (4)

v_1 is the top eigenvector of A^T A, which lies in span(u, c): v_1 = (e_1 u + e_2 c) / ||e_1 u + e_2 c||
with (e_1, e_2) the top eigenvector of the 2 x 2 Gram matrix A A^T = [[u.u, u.c], [u.c, c.c]], so the
SVD of the 2 x D matrix is two dot products and a 2 x 2 eigenproblem, done here in float64 (same
result as `torch.linalg.svd`, tested against diffusers' `normalized_guidance`). Its sign is irrelevant.

Which prediction: the paper's Algorithm 1 takes the predicted scores. On its eps-prediction models
(SD 1.5, SDXL) that is the noise prediction up to a factor; for its rectified-flow model (SD3) it gives
no conversion, and diffusers' guider (given the transformer's output by its modular SD3 pipeline) and
ComfyUI's node (x_t - x0_hat, proportional to the velocity for flow models) both project the predicted
velocity. So does this file. The score of a flow model is proportional to eps_hat = x_t - t v instead,
but a velocity cannot be recovered from eps_hat at t = 0, where every flow sampler starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from erg.guidance.base import NULL, Branch, Combine, Condition, Guidance, Linear, Step
from erg.guidance.config import finite

__all__ = ["TCFG", "TCFGConfig", "build_tcfg", "tangential_damping"]


def tangential_damping(uncond: Tensor, cond: Tensor) -> Tensor:
    """u' = (u . v_1) v_1, v_1 the first right singular vector of [u; c] (per sample)."""
    u, c = uncond.flatten(1).double(), cond.flatten(1).double()
    a, b, d = (u * u).sum(1), (u * c).sum(1), (c * c).sum(1)  # Gram matrix [[a, b], [b, d]]
    lam = 0.5 * (a + d) + torch.sqrt((0.5 * (a - d)) ** 2 + b * b)  # its largest eigenvalue
    # top eigenvector: (b, lam - a) or (lam - d, b); take the better conditioned of the two
    first = (a >= d).unsqueeze(1)
    e = torch.where(first, torch.stack([lam - d, b], 1), torch.stack([b, lam - a], 1))  # (B, 2)
    # a tie (u orthogonal to c, equal norms: no first singular direction) keeps u as it is
    e = torch.where((e == 0).all(1, keepdim=True), torch.tensor([1.0, 0.0], dtype=e.dtype, device=e.device), e)
    v1 = e[:, :1] * u + e[:, 1:] * c
    v1 = v1 / v1.norm(dim=1, keepdim=True).clamp_min(1e-300)
    damped = (u * v1).sum(1, keepdim=True) * v1
    return damped.view_as(uncond).to(uncond.dtype)


@dataclass(frozen=True)
class TCFG(Combine):
    scale: float  # w
    pos: str = "pos"
    neg: str = "neg"

    def __call__(self, step: Step, state: dict[str, Any]) -> Tensor:
        pos = step.preds[self.pos]
        neg = tangential_damping(step.preds[self.neg], pos)
        return neg + self.scale * (pos - neg)

    @property
    def uses(self) -> frozenset[str]:
        return frozenset([self.pos, self.neg])


@dataclass
class TCFGConfig:
    scale: float = 3.0  # w

    def __post_init__(self) -> None:
        finite(self.scale, "guidance.scale")


def build_tcfg(cfg: TCFGConfig, name: str = "tcfg") -> Guidance:
    if cfg.scale == 1.0:  # out = c: no negative branch
        return Guidance(name, (Branch("pos"),), Linear())
    return Guidance(name, (Branch("pos"), Branch("neg", Condition(NULL))), TCFG(cfg.scale))
