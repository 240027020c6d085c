"""Frequency-decoupled guidance, FDG (Sadat et al., 2025, "Guidance in the Frequency Domain Enables
High-Fidelity Sampling at Low CFG Scales"): CFG with its own scale per frequency band.

On the denoised (x0) predictions (the paper's appendix D: "we convert the model's output to the denoised
estimate, apply the guidance step, and then convert it back"), with a Laplacian pyramid psi of L levels
(Burt & Adelson; appendix B, eqs. (7)-(9)), level 0 the highest frequencies, level L - 1 the low-pass
residual (Algorithm 2: "guidance scales from high- to low-frequency"):

    for each level k:   d_k = psi_k[x0_c] - psi_k[x0_u]
                        d_k <- p_k par(d_k) + orth(d_k)      optional: parallel / orthogonal to psi_k[x0_c]
                        g_k = psi_k[x0_c] + (w_k - 1) d_k    eqs. (5)-(6), Algorithm 1 step 4
    x0 = psi^-1[g]                                            Algorithm 1 step 5; back to a velocity

pos = D(x, c), neg = D(x, null). The paper's main results use a single-level split (L = 2: one band-pass
level and the low-pass rest; Table 5b): `scales: [w_high, w_low]`, e.g. Table 8a's DiT-XL/2 setting
w_high = 2, w_low = 1. All w_k = w is CFG with scale w, as the pyramid is linear and psi^-1 psi = id.

The pyramid is the one of the paper's Algorithm 2 (kornia's `build_laplacian_pyramid` / `pyrup`): 5x5
binomial kernel [1, 4, 6, 4, 1]^2 / 256 with reflect borders, blur then bilinear halving (pyrdown),
bilinear doubling then blur (pyrup); tested against kornia. Like kornia, an image none of whose sides is a
power of two, or whose sides the levels do not halve exactly, is reflect-padded to the next powers of
two; unlike the paper's code (and diffusers, which copied it), the result is cropped back to the input's
size (docs/reference_bugs.md). The projection (parallel weights p_k < 1, the paper's APG-style option) is
done in float64, as in Algorithm 2.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from erg.flow import velocity_from_x0
from erg.guidance.base import NULL, Branch, Combine, Condition, Guidance, Linear, Step
from erg.guidance.config import GuidanceConfigError

__all__ = ["FDG", "FDGConfig", "build_fdg", "laplacian_pyramid", "pyramid_image"]

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])


def _blur(x: Tensor) -> Tensor:
    """5x5 binomial blur of every channel, reflect borders. x: (B, C, H, W)."""
    b, c, h, w = x.shape
    kernel = torch.outer(_BINOMIAL, _BINOMIAL).to(x) / 256.0
    padded = F.pad(x.reshape(b * c, 1, h, w), (2, 2, 2, 2), mode="reflect")
    return F.conv2d(padded, kernel[None, None]).view(b, c, h, w)


def _down(x: Tensor) -> Tensor:
    """Blur, then halve each side (floor) by bilinear resampling."""
    h, w = x.shape[-2:]
    return F.interpolate(_blur(x), size=(h // 2, w // 2), mode="bilinear", align_corners=False)


def _up(x: Tensor) -> Tensor:
    """Double each side by bilinear resampling, then blur."""
    h, w = x.shape[-2:]
    return _blur(F.interpolate(x, size=(2 * h, 2 * w), mode="bilinear", align_corners=False))


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _padded_size(h: int, w: int, levels: int) -> tuple[int, int]:
    """kornia's rule: pad to the next powers of two when neither side is one, or when the levels do not
    halve both sides exactly."""
    stride = 1 << (levels - 1)
    if not (_pow2(h) or _pow2(w)) or (levels > 1 and (h % stride or w % stride)):
        return _next_pow2(h), _next_pow2(w)
    return h, w


def laplacian_pyramid(x: Tensor, levels: int) -> list[Tensor]:
    """[L_0, ..., L_{levels-2}, G_{levels-1}]: band-pass levels L_i = G_i - up(G_{i+1}) (eq. (8)) and the
    low-pass rest, of x reflect-padded where kornia pads (see `_padded_size`). x: (B, C, H, W)."""
    h, w = x.shape[-2:]
    ph, pw = _padded_size(h, w, levels)
    # The 5x5 blur (reflect padding 2) needs sides >= 3. It runs on G_0 .. G_{L-2} (pyrdown) and on each
    # doubled G_{i+1}, the same sizes: the smallest blurred grid is side >> (L - 2); G_{L-1} itself is never
    # blurred (an 8x8 image has a 3-level pyramid, as in kornia: 8, 4, 2).
    if levels >= 2 and min(ph, pw) >> (levels - 2) < 3:
        raise ValueError(
            f"a {levels}-level Laplacian pyramid of a {h}x{w} image blurs a "
            f"{ph >> (levels - 2)}x{pw >> (levels - 2)} level, smaller than its 5x5 blur allows (3 per side); "
            "give FDG fewer scales (levels)"
        )
    if (ph, pw) != (h, w):
        x = F.pad(x, (0, pw - w, 0, ph - h), mode="reflect")
    gauss = [x]
    for _ in range(levels - 1):
        gauss.append(_down(gauss[-1]))
    return [g - _up(g_next) for g, g_next in itertools.pairwise(gauss)] + [gauss[-1]]


def pyramid_image(pyramid: list[Tensor], size: tuple[int, int] | None = None) -> Tensor:
    """The image of a Laplacian pyramid, G_i = L_i + up(G_{i+1}) (eq. (9)), cropped to `size`."""
    img = pyramid[-1]
    for level in reversed(pyramid[:-1]):
        img = _up(img) + level
    return img if size is None else img[..., : size[0], : size[1]]


def _project(diff: Tensor, onto: Tensor) -> tuple[Tensor, Tensor]:
    """Parallel and orthogonal parts of diff w.r.t. onto, per sample over all its other dims, in float64."""
    d, u = diff.double().flatten(1), onto.double().flatten(1)
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    par = (d * u).sum(dim=1, keepdim=True) * u
    return par.view_as(diff).to(diff.dtype), (d - par).view_as(diff).to(diff.dtype)


@dataclass(frozen=True)
class FDG(Combine):
    scales: tuple[float, ...]  # w_k, high -> low frequency
    parallel_weights: tuple[float, ...] | None = None
    pos: str = "pos"
    neg: str = "neg"

    def guide_x0(self, x0_pos: Tensor, x0_neg: Tensor) -> Tensor:
        """FDG on denoised predictions (Algorithm 1, steps 3-5). x0: (B, C, H, W) images, or (B, C, F, H, W)
        videos, whose frames get the 2D pyramid one by one (the paper is image-only; its pyramid is spatial)."""
        video = x0_pos.ndim == 5
        if video:  # (B, C, F, H, W) -> (B F, C, H, W)
            shape = x0_pos.shape
            n, f = shape[0], shape[2]
            frames = lambda x: x.transpose(1, 2).reshape(n * f, *shape[1:2], *shape[3:])
            x0_pos, x0_neg = frames(x0_pos), frames(x0_neg)
        levels = len(self.scales)
        cond, uncond = laplacian_pyramid(x0_pos, levels), laplacian_pyramid(x0_neg, levels)
        weights = self.parallel_weights or (1.0,) * levels
        guided = []
        for c, u, w, p in zip(cond, uncond, self.scales, weights):
            diff = c - u
            if p != 1.0:  # per sample: a video's frames together
                per_sample = (lambda x: x.reshape(n, -1)) if video else (lambda x: x)
                par, orth = _project(per_sample(diff), per_sample(c))
                diff = p * par.view_as(diff) + orth.view_as(diff)
            guided.append(c + (w - 1.0) * diff)
        out = pyramid_image(guided, tuple(x0_pos.shape[-2:]))
        return out.reshape(n, f, *out.shape[1:]).transpose(1, 2) if video else out

    def __call__(self, step: Step, state: dict[str, Any]) -> Tensor:
        x0 = self.guide_x0(step.x0(self.pos), step.x0(self.neg))
        return velocity_from_x0(step.x, x0, step.t)

    @property
    def uses(self) -> frozenset[str]:
        return frozenset([self.pos, self.neg])


def _numbers(value: Any, key: str) -> tuple[float, ...]:
    if not (isinstance(value, list | tuple) and value and all(isinstance(v, int | float) for v in value)):
        raise GuidanceConfigError(f"{key} must be a non-empty list of numbers (high -> low frequency), got {value!r}")
    out = tuple(float(v) for v in value)
    if not all(math.isfinite(v) for v in out):
        raise GuidanceConfigError(f"{key} must be finite, got {value!r}")
    return out


@dataclass
class FDGConfig:
    scales: Any = (2.0, 1.0)  # [w_high, ..., w_low]: one per pyramid level (Table 8a, DiT-XL/2: w_high 2, w_low 1)
    parallel_weights: Any = None  # null, or one p_k per level (1: the plain difference)

    def __post_init__(self) -> None:
        self.scales = _numbers(self.scales, "guidance.scales")
        if self.parallel_weights is not None:
            self.parallel_weights = _numbers(self.parallel_weights, "guidance.parallel_weights")
            if len(self.parallel_weights) != len(self.scales):
                raise GuidanceConfigError(
                    f"guidance.parallel_weights needs one weight per level of guidance.scales ({len(self.scales)}), "
                    f"got {len(self.parallel_weights)}"
                )


def build_fdg(cfg: FDGConfig, name: str = "fdg") -> Guidance:
    if all(w == 1.0 for w in cfg.scales):  # every level unguided: out = c, no negative branch
        return Guidance(name, (Branch("pos"),), Linear())
    combine = FDG(cfg.scales, cfg.parallel_weights)
    return Guidance(name, (Branch("pos"), Branch("neg", Condition(NULL))), combine)
