"""Self-attention guidance (Hong et al., ICCV 2023), SAG* of the ERG paper.

Two forwards per step: first the usual branches, recording the attention maps of the *source*
branch (neg with CFG, else pos) in the chosen blocks (`Capture`); then the *degraded* branch:

    A      = image-to-image attention probabilities, averaged over heads (and over the chosen blocks);
             in joint text-image attention each head's image-query rows are renormalised over the
             image keys first (`erg.attention.AttentionMaps`), so every row sums to 1 as in SAG's
             image self-attention, whatever the text length
    mask   = image keys whose attention summed over image queries exceeds `threshold` (1: above
             average; SAG's reference: `attn_map.mean(1).sum(1) > 1.0`), on the token grid,
             upsampled (nearest) to the image
    x0_deg = blur(x0_src) inside the mask, x0_src outside      (Gaussian, `blur_sigma`)
    x_deg  = t x0_deg + (1 - t) eps_src                        (re-noised to the current t)
    degraded = D(x_deg, condition of the source branch)

    out = pos + (w - 1)(pos - neg) + s (src - degraded)        (diffusers' SAG; alone: w = 1)

On a video (Wan: latents (B, C, F, H, W), tokens on a (frames, h, w) grid) the mask lives on that 3D grid
and x0 is blurred frame by frame (in space, as SAG blurs an image).

NFE per step: 2 alone, 3 with CFG. The map needs an explicit attention in the watched blocks (no
fused kernel there), and memory for the full float32 map of a layer: rows x heads x image queries x keys
x 4 bytes (Wan 2.1 at 480 x 832, 81 frames: 12 heads x 32,760^2 tokens, about 51 GB per row). A map above
`max_map_gb` (GB, default 16; null: no limit) is refused at the first forward with the figure, instead of
running out of memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from erg.blur import gaussian_blur_2d, gaussian_blur_frames
from erg.flow import interpolate
from erg.guidance.base import NULL, Branch, Condition, Guidance, Linear, Step, Term
from erg.guidance.config import GuidanceConfigError, finite, layer_range, positive

__all__ = ["SAGConfig", "SAGDegrade", "build_sag"]


@dataclass(frozen=True)
class SAGDegrade:
    """The degraded input of SAG, computed from the source branch of the same step."""

    source: str
    layers: tuple[int, ...]
    blur_sigma: float = 1.0
    blur_kernel: int | None = 9
    threshold: float = 1.0

    def mask(self, step: Step) -> Tensor:
        """(B, 1, H, W) float mask of the image regions the source branch attends to most ((B, 1, F, H, W) for
        a video, whose tokens lie on a (frames, h, w) grid)."""
        maps = step.maps[self.source]
        attn = torch.stack([maps.image_to_image(layer) for layer in self.layers]).mean(dim=0)  # (B, N, N)
        attended = attn.sum(dim=1)  # per image key, summed over image queries: 1 on average
        grid = maps.sites[self.layers[0]].grid
        if grid is None or len(grid) != step.x.ndim - 2:
            raise ValueError(
                f"SAG needs the token grid of blocks {list(self.layers)} matching the latents {tuple(step.x.shape)}; "
                f"the model reports grid={grid}"
            )
        mask = (attended > self.threshold).to(step.x.dtype).view(-1, 1, *grid)
        return F.interpolate(mask, size=step.x.shape[2:], mode="nearest")

    def __call__(self, step: Step) -> Tensor:
        x0, eps = step.x0(self.source), step.eps(self.source)
        mask = self.mask(step)
        blur = gaussian_blur_2d if x0.ndim == 4 else gaussian_blur_frames  # a video: each frame, as an image
        degraded = blur(x0, self.blur_sigma, self.blur_kernel) * mask + x0 * (1 - mask)
        return interpolate(degraded, eps, step.t)


@dataclass
class SAGConfig:
    scale: float = 1.0  # w of the CFG term (1: SAG alone, NFE 2 as in the paper's tables)
    sag_scale: float = 0.75  # s (diffusers' default)
    layers: Any = (12, 15)  # [l_min, l_max): blocks whose maps are averaged (middle blocks, appendix B.4)
    blur_sigma: float = 1.0
    blur_kernel: int | None = 9  # SAG's reference and diffusers; null: SEG's size (erg.blur)
    threshold: float = 1.0
    max_map_gb: float | None = 16.0  # largest attention map of one layer, GB (null: no limit); see the module doc

    def __post_init__(self) -> None:
        finite(self.scale, "guidance.scale")
        finite(self.sag_scale, "guidance.sag_scale")
        positive(self.blur_sigma, "guidance.blur_sigma")
        finite(self.threshold, "guidance.threshold")
        if self.blur_kernel is not None and not (isinstance(self.blur_kernel, int) and self.blur_kernel % 2 == 1):
            raise GuidanceConfigError(f"guidance.blur_kernel must be an odd integer or null, got {self.blur_kernel!r}")
        self.layers = layer_range(list(self.layers), "guidance.layers")
        if self.max_map_gb is not None:
            self.max_map_gb = positive(self.max_map_gb, "guidance.max_map_gb")


def build_sag(cfg: SAGConfig, name: str = "sag") -> Guidance:
    terms = []
    branches = {"pos": Branch("pos")}
    source = "pos"
    if cfg.scale != 1.0:
        branches["neg"] = Branch("neg", Condition(NULL))
        terms.append(Term(cfg.scale - 1.0, "pos", "neg"))
        source = "neg"
    if cfg.sag_scale != 0.0:
        layers = tuple(cfg.layers)
        src = branches[source]
        branches[source] = Branch(src.name, src.condition, capture=frozenset(layers), capture_max_gb=cfg.max_map_gb)
        degrade = SAGDegrade(source, layers, cfg.blur_sigma, cfg.blur_kernel, cfg.threshold)
        branches["degraded"] = Branch("degraded", Condition(src.condition.kind), input=degrade)
        terms.append(Term(cfg.sag_scale, source, "degraded"))
    return Guidance(name, tuple(branches.values()), Linear(tuple(terms)))
