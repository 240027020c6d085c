"""The attention seam: every attention layer of our models calls `attention(q, k, v, site, plan)`.

A layer describes itself with a `Site` (its index, which tokens are image tokens, their 2D grid, and
in joint text-image attention which are text tokens). A rectifier acts on the queries of one segment
(`Rectifier.segment`: 'image' by default, or 'text'); the other queries keep plain attention.
An `AttentionPlan` says which *rectifier* replaces plain attention in which layers and for which
rows of the batch. Guidance builds a plan per step and passes it explicitly through the model's
`forward(..., plan=...)`: nothing is monkeypatched and nothing stays installed after a call.

Rules the seam guarantees (tests/test_attention.py):
- an empty plan, or a rule whose layer set is empty, gives plain `scaled_dot_product_attention`;
- a rectifier touches only its rows and layers; other rows are bit-for-bit the plain forward;
- a layer or row range that does not exist is an error, never a silent no-op.

Rectifiers defined here, acting on the *image-token queries* of their rows (text queries of a joint
attention keep plain attention; `Temperature` can take the text segment instead):
- `Temperature`: ERG's Algorithm 1 (logit temperature tau, K energy steps with alpha, gamma), or
  the paper's Listing 2 (`update="listing2"`);
- `Identity`: PAG, the image-to-image attention map replaced by the identity (output = V);
- `SmoothedEnergy`: SEG, image queries blurred on their 2D grid (a video's 3D grid; sigma = inf: their mean);
- `Capture`: SAG and the analyses, records the attention probabilities in a sink the caller owns
  and returns the plain output;
- `SkipBlock`: skip-layer guidance (SLG, STG-R): the whole transformer block is the identity for its
  rows. Attention gives those rows plain attention; the model puts the block's input back after the
  block with `skip_blocks(plan, layer, before, after)` (a model that does so sets
  `supports_block_skip = True`; the sampler refuses block skips for any other model).
Rectifiers are stateless (frozen dataclasses); `Capture`'s sink is the one explicit exception.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from erg.blur import gaussian_blur_2d, gaussian_blur_3d

__all__ = [
    "UPDATES",
    "AttentionMaps",
    "AttentionPlan",
    "AttentionSink",
    "Capture",
    "Identity",
    "Rectifier",
    "Rule",
    "Site",
    "SkipBlock",
    "SmoothedEnergy",
    "Temperature",
    "attention",
    "skip_blocks",
]


@dataclass(frozen=True)
class Site:
    """What an attention layer tells the seam about itself.

    layer: index of the attention layer in the model (0-based, in forward order).
    image: the token range holding image tokens (all tokens for DiT; the image segment of MMDiT's
        joint attention). Image-level rectifiers act on these queries only.
    grid: (height, width) of the image tokens, or (frames, height, width) of a video's (row-major in that
        order), for rectifiers that need their layout (SEG, SAG's mask).
    text: the token range holding text tokens in joint attention (None: the layer has none).
    """

    layer: int
    image: slice = field(default_factory=lambda: slice(None))
    grid: tuple[int, ...] | None = None
    text: slice | None = None

    def segment(self, name: str) -> slice:
        """The token range of segment `name` ('image' or 'text'); a segment the layer lacks is an error."""
        if name == "image":
            return self.image
        if name == "text":
            if self.text is None:
                raise ValueError(
                    f"attention layer {self.layer} has no text tokens; a text-segment rectifier needs joint "
                    "text-image attention (MMDiT)"
                )
            return self.text
        raise ValueError(f"unknown token segment {name!r}; choose 'image' or 'text'")


class Rectifier(ABC):
    """Replaces plain attention for the batch rows and layers a `Rule` gives it.

    `segment` names the queries it rectifies: 'image' (the default, every image-level method of the
    paper) or 'text' (the text tokens of joint attention); the other queries keep plain attention.
    """

    segment: str = "image"

    def query_scale(self) -> float | None:
        """If this rectifier is exactly "its segment's logits times a factor", that factor.

        The seam then folds it into a per-row scale of the queries and runs ONE fused SDPA call
        for the whole batch (rectified and plain rows together), so ERG costs what CFG costs.
        """
        return None

    @abstractmethod
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, site: Site) -> Tensor:
        """Attention output for the given rows. q, k, v: (rows, heads, tokens, head_dim)."""


UPDATES = ("algorithm1", "listing2")


@dataclass(frozen=True)
class Temperature(Rectifier):
    """Energy-landscape rectification of the paper's Algorithm 1, on the image-token queries.

        repeat K (`steps`) times:  Q <- Q - gamma * (Q - alpha * softmax(tau * beta * Q K^T) V)

    with beta = 1 / sqrt(d). K = 1, gamma = 1, alpha = 1 is attention with logits scaled by tau
    (eq. (9)); it runs as a fused SDPA call.

    `update` chooses between the paper's two writings, which differ when gamma != 1 (and for K > 1):
    - "algorithm1" (default): as above; the residual Q is the unscaled query, and every step's softmax
      carries tau. Queries outside the segment keep plain attention.
    - "listing2": the paper's Listing 2 (appendix C, `energy_based_attention` + `multistep_attention`):
      the segment's queries are multiplied by tau once, then K steps Q <- Q - gamma (Q - alpha
      softmax(beta Q K^T) V) run on every query of the layer (in joint attention the text queries too,
      unscaled, as Listing 2 passes the concatenated queries). For K = 1 the rectified rows differ from
      Algorithm 1 by exactly (1 - gamma)(1 - tau) Q (tests/test_rectifiers.py).
    With gamma = alpha = K = 1 both are the same logit temperature.
    """

    tau: float
    alpha: float = 1.0
    gamma: float = 1.0
    steps: int = 1
    segment: str = "image"
    update: str = "algorithm1"

    def __post_init__(self) -> None:
        if self.segment not in ("image", "text"):
            raise ValueError(f"segment must be 'image' or 'text', got {self.segment!r}")
        if not self.tau > 0:
            raise ValueError(f"temperature tau must be > 0, got {self.tau}")
        if not self.gamma > 0:
            raise ValueError(f"step size gamma must be > 0, got {self.gamma}")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"steps K must be an integer >= 1, got {self.steps!r}")
        if self.update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {self.update!r}")

    @property
    def is_logit_scale(self) -> bool:
        return self.steps == 1 and self.alpha == 1.0 and self.gamma == 1.0

    def query_scale(self) -> float | None:
        return float(self.tau) if self.is_logit_scale else None

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, site: Site) -> Tensor:
        tokens = site.segment(self.segment)
        if self.update == "listing2":
            q_new = q.clone()
            q_new[:, :, tokens] = q[:, :, tokens] * self.tau  # Listing 2: qi *= tau_i, before the loop
            for _ in range(self.steps):
                attended = F.scaled_dot_product_attention(q_new, k, v)  # beta = 1 / sqrt(d)
                q_new = q_new - self.gamma * (q_new - self.alpha * attended)
            return q_new
        out = _attend_outside(q, k, v, tokens)  # queries outside the segment keep plain attention
        q_seg = q[:, :, tokens]
        scale = self.tau / math.sqrt(q.shape[-1])  # tau * beta
        for _ in range(self.steps):
            attended = F.scaled_dot_product_attention(q_seg, k, v, scale=scale)
            q_seg = q_seg - self.gamma * (q_seg - self.alpha * attended)
        out[:, :, tokens] = q_seg
        return out


def _attend_outside(q: Tensor, k: Tensor, v: Tensor, tokens: slice) -> Tensor:
    """Plain attention for the queries outside `tokens`; the slots of `tokens` are left for the
    caller to fill (not computed at all when `tokens` covers every query, as the image tokens of DiT)."""
    n = q.shape[2]
    if len(range(*tokens.indices(n))) == n:
        return q.new_empty(*q.shape[:-1], v.shape[-1])
    return F.scaled_dot_product_attention(q, k, v)


def _image_grid(q_img: Tensor, site: Site, who: str) -> tuple[int, ...]:
    """The image tokens' grid, (h, w) or a video's (frames, h, w), checked against the number of image tokens."""
    if site.grid is None:
        raise ValueError(
            f"{who} needs the grid of the image tokens, but layer {site.layer} reports Site.grid=None; "
            "the model must pass its token grid to the attention seam"
        )
    if len(site.grid) not in (2, 3):
        raise ValueError(
            f"{who}: layer {site.layer} reports the grid {tuple(site.grid)}; the seam knows image grids (h, w) and "
            "video grids (frames, h, w)"
        )
    if math.prod(site.grid) != q_img.shape[2]:
        raise ValueError(
            f"{who}: layer {site.layer} has {q_img.shape[2]} image tokens but its grid is "
            f"{'x'.join(map(str, site.grid))}; the Site's image segment and grid disagree"
        )
    return tuple(site.grid)


@dataclass(frozen=True)
class Identity(Rectifier):
    """PAG (Ahn et al., 2024): the image-to-image attention map is replaced by the identity.

    Each image-token query's output is its own value vector, out_i = v_i. Text queries of a joint
    attention keep plain attention. Needs self-attention over the same tokens (as many queries as
    keys in the image segment); anything else is an error, never a silent no-op (a trap of public
    implementations).
    """

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, site: Site) -> Tensor:
        if q.shape[2] != k.shape[2]:
            raise ValueError(
                f"identity attention (PAG) in layer {site.layer} needs self-attention with one key per query, "
                f"got {q.shape[2]} queries and {k.shape[2]} keys"
            )
        out = _attend_outside(q, k, v, site.image)
        out[:, :, site.image] = v[:, :, site.image]
        return out


@dataclass(frozen=True)
class SmoothedEnergy(Rectifier):
    """SEG (Hong, 2024): blur the image-token queries on their 2D grid, then plain attention.

    Each channel of the queries (heads x head_dim) is blurred by a Gaussian of std `sigma` on the
    (H, W) token grid (`erg.blur`: SEG's kernel ceil(6 sigma) + 1 - ceil(6 sigma) % 2, reflect padding). sigma >=
    `INFINITE` (1e4, as SEG's reference) replaces the image queries by their mean over the grid: every
    image token then attends with the same (maximally smoothed) attention weights. On a video's
    (frames, H, W) grid the blur is the same isotropic Gaussian along all three axes, so that its
    sigma -> inf limit is still that mean over every token (uniform attention).
    """

    sigma: float
    INFINITE = 1e4

    def __post_init__(self) -> None:
        if not self.sigma > 0:
            raise ValueError(f"SEG blur sigma must be > 0 (use .inf for the mean), got {self.sigma}")

    @property
    def is_infinite(self) -> bool:
        return self.sigma >= self.INFINITE

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, site: Site) -> Tensor:
        q_img = q[:, :, site.image]  # (rows, heads, N, d)
        layout = _image_grid(q_img, site, "smoothed energy attention (SEG)")
        if self.is_infinite:
            q_img = q_img.mean(dim=2, keepdim=True).expand_as(q_img)
        else:
            rows, heads, n, d = q_img.shape
            grid = q_img.permute(0, 1, 3, 2).reshape(rows, heads * d, *layout)  # tokens are row-major
            grid = gaussian_blur_2d(grid, self.sigma) if len(layout) == 2 else gaussian_blur_3d(grid, self.sigma)
            q_img = grid.reshape(rows, heads, d, n).permute(0, 1, 3, 2)
        out = _attend_outside(q, k, v, site.image)
        out[:, :, site.image] = F.scaled_dot_product_attention(q_img.contiguous(), k, v)
        return out


class AttentionSink(Protocol):
    """Receives the attention probabilities `Capture` computes."""

    def record(self, site: Site, probs: Tensor) -> None:
        """probs: float32 (rows, heads, image queries, keys) of one layer."""


class AttentionMaps:
    """The sink SAG reads: per layer, the image-to-image attention, averaged over heads.

    maps[layer]: (rows, image queries, image keys). In joint text-image attention (MMDiT, SD3) part of
    every image query's attention goes to the text keys, and that share grows with the text length. SAG
    defines its mask on image self-attention, where each query's row sums to 1 (Hong et al., 2023: "sum
    over queries > 1" means a key attended above average). So each head's image-query -> image-key
    block is renormalised over the image keys (the softmax restricted to them) before the head average:
    the map, and SAG's mask, then mean the same thing whatever the number of text tokens. Layers
    without text keys (DiT) are recorded as computed (nothing to renormalise). sites[layer]: the
    layer's Site. A layer recorded twice keeps the latest call.
    """

    def __init__(self) -> None:
        self.maps: dict[int, Tensor] = {}
        self.sites: dict[int, Site] = {}

    def record(self, site: Site, probs: Tensor) -> None:
        keys = probs.shape[-1]
        image = range(*site.image.indices(keys))
        if len(image) != keys:  # text keys present: restrict each (head, query) row to the image keys
            probs = probs[..., site.image]
            probs = probs / probs.sum(dim=-1, keepdim=True)
        self.maps[site.layer] = probs.mean(dim=1)
        self.sites[site.layer] = site

    def image_to_image(self, layer: int) -> Tensor:
        """(rows, image queries, image keys) of a recorded layer; every row sums to 1."""
        if layer not in self.maps:
            raise KeyError(f"no attention map recorded for layer {layer} (recorded: {sorted(self.maps)})")
        return self.maps[layer]


@dataclass(frozen=True, eq=False)
class Capture(Rectifier):
    """Records softmax(Q K^T / sqrt(d)) of the image-token queries (float32) into `sink` and returns
    the plain attention output. It cannot use a fused kernel for the map itself, so it costs an
    explicit attention in the layers it watches (SAG, appendix B.4's analysis).

    max_gb: the largest map (rows x heads x image queries x keys x 4 bytes, one layer; the softmax
    briefly holds about twice that) it may build, in GB (1e9 bytes); a larger one is refused before
    anything is allocated (`guidance.max_map_gb` for SAG). None: no limit."""

    sink: AttentionSink
    max_gb: float | None = None

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, site: Site) -> Tensor:
        rows, heads = q.shape[:2]
        queries, keys = len(range(*site.image.indices(q.shape[2]))), k.shape[2]
        need_gb = rows * heads * queries * keys * 4 / 1e9
        if self.max_gb is not None and need_gb > self.max_gb:
            from erg.guidance.config import GuidanceConfigError  # here: erg.guidance imports this module

            raise GuidanceConfigError(
                f"SAG's attention map of layer {site.layer} needs {need_gb:.1f} GB (float32 {rows} rows x {heads} "
                f"heads x {queries} image queries x {keys} keys), above guidance.max_map_gb={self.max_gb:g}: lower "
                "model.height / model.width (model.num_frames for a video), use guidance=seg or guidance=pag "
                "(fused attention, no map), or raise guidance.max_map_gb if the GPU has room for about twice that"
            )
        q_img = q[:, :, site.image].float()
        logits = q_img @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
        self.sink.record(site, torch.softmax(logits, dim=-1))
        return F.scaled_dot_product_attention(q, k, v)


@dataclass(frozen=True)
class SkipBlock(Rectifier):
    """Skip-layer guidance: transformer block `layer` is the identity for the rule's rows.

    SD3.5's reference (`mmditx.py`: `if i in skip_layers: continue`) and STG's residual skip
    (Hyung et al., 2025: Res'(z_l) = z_l) skip the whole block, both streams of a joint block included.
    Inside the block's attention these rows get plain attention (a logit scale of exactly 1, so it folds
    into the one fused call); the block runs for them as for every row and `skip_blocks` then puts their
    input back, so a skipped branch costs no extra forward and the other rows are untouched.
    """

    def query_scale(self) -> float:
        return 1.0

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, site: Site) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v)  # discarded: the block's output is replaced


def skip_blocks(plan: AttentionPlan | None, layer: int, before: Tensor, after: Tensor) -> Tensor:
    """The output of block `layer` under `plan`: `after`, except the rows a `SkipBlock` rule gives for
    this layer, which get the block's input `before` back (exactly, bit for bit).

    Models call it after every block, on every stream the block updates (image and text tokens of a
    joint block); before, after: (B, ...) the stream's tokens entering and leaving the block."""
    rules = [r for r in plan.at(layer) if isinstance(r.rectifier, SkipBlock)] if plan else []
    if not rules:
        return after
    skipped = torch.zeros(after.shape[0], dtype=torch.bool, device=after.device)
    for rule in rules:
        skipped[rule.rows] = True
    return torch.where(skipped.view(-1, *(1,) * (after.ndim - 1)), before, after)


def _as_layers(layers: Iterable[int] | int) -> frozenset[int]:
    if isinstance(layers, int):
        return frozenset([layers])
    return frozenset(int(i) for i in layers)


@dataclass(frozen=True)
class Rule:
    """Apply `rectifier` in `layers` to batch rows `rows` (a slice of the batch)."""

    rectifier: Rectifier
    layers: frozenset[int]
    rows: slice = field(default_factory=lambda: slice(None))

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _as_layers(self.layers))
        if not isinstance(self.rows, slice) or self.rows.step not in (None, 1):
            raise ValueError(f"rows must be a contiguous slice of the batch, got {self.rows!r}")

    def row_range(self, batch_size: int) -> range:
        return range(*self.rows.indices(batch_size))


@dataclass(frozen=True)
class AttentionPlan:
    """Which rectifier runs in which layers for which rows. Empty by default (plain attention)."""

    rules: tuple[Rule, ...] = field(default_factory=tuple)

    @classmethod
    def single(cls, rectifier: Rectifier, layers: Iterable[int] | int, rows: slice = slice(None)) -> AttentionPlan:
        return cls((Rule(rectifier, _as_layers(layers), rows),))

    def __bool__(self) -> bool:
        return any(rule.layers for rule in self.rules)

    def __add__(self, other: AttentionPlan) -> AttentionPlan:
        return AttentionPlan(self.rules + other.rules)

    def at(self, layer: int) -> tuple[Rule, ...]:
        return tuple(rule for rule in self.rules if layer in rule.layers)

    @property
    def layers(self) -> frozenset[int]:
        return frozenset().union(*(rule.layers for rule in self.rules))

    def validate(self, num_layers: int, batch_size: int | None = None) -> None:
        """Raise if a rule names a layer the model lacks, rows outside the batch, or overlapping rules."""
        bad = sorted(i for i in self.layers if not 0 <= i < num_layers)
        if bad:
            raise ValueError(
                f"attention plan names layers {bad} but the model has {num_layers} attention layers "
                f"(valid: 0..{num_layers - 1}); fix the guidance layer range"
            )
        if batch_size is None:
            return
        for rule in self.rules:
            start, stop = rule.rows.start or 0, rule.rows.stop
            if start < 0 or (stop is not None and (stop < 0 or stop > batch_size)):
                raise ValueError(f"attention plan rows {rule.rows} fall outside a batch of {batch_size} rows")
        for layer in self.layers:
            taken: set[int] = set()
            for rule in self.at(layer):
                rows = set(rule.row_range(batch_size))
                if rows & taken:
                    raise ValueError(f"two rectifiers claim the same batch rows in layer {layer}")
                taken |= rows


def attention(q: Tensor, k: Tensor, v: Tensor, site: Site, plan: AttentionPlan | None = None) -> Tensor:
    """Multi-head attention through the seam. q, k, v: (batch, heads, tokens, head_dim)."""
    rules = plan.at(site.layer) if plan else ()
    if not rules:
        return F.scaled_dot_product_attention(q, k, v)

    if all(rule.rectifier.query_scale() is not None for rule in rules):
        # Fast path: every rectifier here is a logit temperature. Scale each rectified segment's
        # queries row by row (rows outside the rules are multiplied by exactly 1.0, which is
        # bit-exact) and run one fused SDPA call: softmax((tau q) k^T / sqrt(d)) == softmax(tau q k^T / sqrt(d)).
        q = q.clone()
        for segment in sorted({rule.rectifier.segment for rule in rules}):
            scale = torch.ones(q.shape[0], device=q.device, dtype=torch.float32)
            for rule in rules:
                if rule.rectifier.segment == segment:
                    scale[rule.rows] = rule.rectifier.query_scale()
            tokens = site.segment(segment)
            q[:, :, tokens] = (q[:, :, tokens] * scale.view(-1, 1, 1, 1)).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v)

    out = F.scaled_dot_product_attention(q, k, v)
    for rule in rules:
        rows = rule.rows
        out[rows] = rule.rectifier(q[rows], k[rows], v[rows], site).to(out.dtype)
    return out
