"""MMDiT (Esser et al., 2024, Stable Diffusion 3) as a rectified-flow velocity model, top to bottom.

    img = patchify(x_t) + pos_embed                         (B, N, D)    N = (H/p)(W/p) image tokens
    txt = context_embedder(context)                          (B, L, D)    L text tokens (text encoders)
    c   = t_embed(t) + pooled_embed(pooled)                  (B, D)       adaLN conditioning
    img, txt = MMDiTBlock(img, txt, c) x depth               joint attention over [img ; txt]
    v   = unpatchify(final_layer(img, c))                    (B, C, H, W)

Each block has two *streams* with separate weights (adaLN modulation, qkv, qk-norm, output
projection, MLP): one for image tokens, one for text tokens. Their queries, keys and values are
concatenated, image tokens first (the paper's Listing 2), and attend jointly. The last block's text
stream is "pre-only" as in SD3: its text output would be discarded, so it has no output projection
and no MLP (unused parameters would also break DDP).

The attention of block i is attention layer i of the `erg.attention` seam, with
`Site(layer=i, image=slice(0, N), text=slice(N, N + L), grid=(H/p, W/p))`: image-level rectifiers
(I-ERG, PAG, SEG) touch the image-token queries only, and a text-segment rectifier the text ones.

Conventions (erg/flow.py): t in [0, 1] with t = 0 noise; the output is the velocity x - eps. Depth and
width are set independently (SD3 ties hidden = 64 x depth, heads = depth: presets `MMDiT-d{depth}`).
Text tokens and the pooled vector come from `models.text_encoders.TextConditioner`; the
unconditional input is its encoding of the empty prompt.

FSDP: `MMDiTBlock` is the wrapping (and activation-checkpointing) unit, see `MMDiT.wrap_modules`;
no parameter is shared between blocks, and the model can be built on the meta device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from erg.attention import AttentionPlan, Site, attention, skip_blocks
from models.dit import FinalLayer
from models.layers import Mlp, PatchEmbed, TimestepEmbedder, modulate, sincos_pos_embed_2d

__all__ = [
    "MMDIT_PRESETS",
    "MMDiT",
    "MMDiTBlock",
    "PooledEmbedder",
    "Stream",
    "build_mmdit",
    "mmdit_flops_per_forward",
    "mmdit_preset",
]


class PooledEmbedder(nn.Module):
    """Pooled text vector -> conditioning vector: Linear -> SiLU -> Linear (SD3's `y_embedder`)."""

    def __init__(self, pooled_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(pooled_dim, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, pooled: Tensor) -> Tensor:
        return self.mlp(pooled)


class StreamAttention(nn.Module):
    """One stream's part of joint attention: qkv projection, qk-norm (RMSNorm per head), output projection.

    pre_only: no output projection (the last block's text stream).
    """

    def __init__(self, hidden_size: int, num_heads: int, pre_only: bool = False):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        # qk-norm (SD3, eq. (5) of Esser et al.): RMSNorm over each head's channels, learned gain.
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.proj = None if pre_only else nn.Linear(hidden_size, hidden_size, bias=True)

    def qkv_heads(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, D) -> q, k, v each (B, heads, T, head_dim), q and k normalised."""
        B, T, _ = h.shape
        q, k, v = self.qkv(h).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v


class Stream(nn.Module):
    """One modality's weights in a block: adaLN-Zero modulation, attention projections, MLP.

    A full stream has 6 modulation chunks (shift/scale/gate for attention, then MLP); a pre-only
    stream has 2 (shift/scale before attention) and ends after producing q, k, v.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, pre_only: bool = False):
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = StreamAttention(hidden_size, num_heads, pre_only=pre_only)
        chunks = 2 if pre_only else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, chunks * hidden_size, bias=True))
        if not pre_only:
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def pre_attention(self, h: Tensor, c: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, ...]]:
        """q, k, v of this stream's tokens and the modulation chunks post_attention needs."""
        mods = self.adaLN_modulation(c).chunk(2 if self.pre_only else 6, dim=1)  # each (B, D)
        qkv = self.attn.qkv_heads(modulate(self.norm1(h), mods[0], mods[1]))
        return qkv, mods[2:]

    def post_attention(self, h: Tensor, attn_out: Tensor, mods: tuple[Tensor, ...]) -> Tensor:
        """Residual updates after joint attention. attn_out: (B, T, D), the heads merged."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        h = h + gate_msa.unsqueeze(1) * self.attn.proj(attn_out)
        return h + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(h), shift_mlp, scale_mlp))


class MMDiTBlock(nn.Module):
    """Joint attention over [image tokens ; text tokens] with separate weights per stream.

    `layer` is this block's index in the `erg.attention` seam. With `last=True` the text stream is
    pre-only and `forward` returns None for the text tokens.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, layer: int, last: bool = False):
        super().__init__()
        self.layer = layer
        self.num_heads = num_heads
        self.image = Stream(hidden_size, num_heads, mlp_ratio)
        self.text = Stream(hidden_size, num_heads, mlp_ratio, pre_only=last)

    def joint_attention(
        self,
        img_qkv: tuple[Tensor, Tensor, Tensor],
        txt_qkv: tuple[Tensor, Tensor, Tensor],
        grid: tuple[int, int],
        plan: AttentionPlan | None,
    ) -> tuple[Tensor, Tensor]:
        """Attention through the seam; returns the image and text outputs, each (B, T, D) heads merged."""
        n_img, n_txt = img_qkv[0].shape[2], txt_qkv[0].shape[2]
        q, k, v = (torch.cat([a, b], dim=2) for a, b in zip(img_qkv, txt_qkv))  # (B, heads, N + L, hd)
        site = Site(layer=self.layer, image=slice(0, n_img), text=slice(n_img, n_img + n_txt), grid=grid)
        out = attention(q, k, v, site, plan)  # (B, heads, N + L, hd)
        out = out.transpose(1, 2).flatten(2)  # (B, N + L, D)
        return out[:, :n_img], out[:, n_img:]

    def forward(
        self, img: Tensor, txt: Tensor, c: Tensor, grid: tuple[int, int], plan: AttentionPlan | None = None
    ) -> tuple[Tensor, Tensor | None]:
        img_qkv, img_mods = self.image.pre_attention(img, c)
        txt_qkv, txt_mods = self.text.pre_attention(txt, c)
        img_out, txt_out = self.joint_attention(img_qkv, txt_qkv, grid, plan)
        img = self.image.post_attention(img, img_out, img_mods)
        txt = None if self.text.pre_only else self.text.post_attention(txt, txt_out, txt_mods)
        return img, txt


class MMDiT(nn.Module):
    """Multimodal diffusion transformer predicting the rectified-flow velocity.

    Args:
        input_size: spatial size of the model input (latent size = image size / 8 for SD-style VAEs).
        in_channels: channels of the model input (16 for the SD3 VAE, 4 for SD-VAE, 1 or 3 for pixels).
        context_dim: channels of the text tokens given to `forward` (the text encoders' output width,
            see `TextConditioner.context_dim`); `context_embedder` projects them to `hidden_size`.
        pooled_dim: channels of the pooled text vector (0: no pooled vector, adaLN from t only).
        depth, hidden_size, num_heads, mlp_ratio, patch_size: the size, set independently.
        time_scale: t is multiplied by this before the sinusoidal embedding (SD3 feeds 1000 x time).
        grad_checkpointing: recompute block activations in backward (activation checkpointing).
    """

    supports_block_skip = True  # forward applies erg.attention.skip_blocks to both streams after every block

    def __init__(
        self,
        input_size: int = 32,
        in_channels: int = 16,
        context_dim: int = 4096,
        pooled_dim: int = 2048,
        patch_size: int = 2,
        hidden_size: int = 1536,
        depth: int = 24,
        num_heads: int = 24,
        mlp_ratio: float = 4.0,
        time_scale: float = 1000.0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if context_dim < 1 or pooled_dim < 0:
            raise ValueError(f"context_dim must be >= 1 and pooled_dim >= 0, got {context_dim}, {pooled_dim}")
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.context_dim = context_dim
        self.pooled_dim = pooled_dim
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.time_scale = time_scale
        self.grad_checkpointing = grad_checkpointing
        self.grid = (input_size // patch_size, input_size // patch_size)

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = PooledEmbedder(pooled_dim, hidden_size) if pooled_dim > 0 else None
        self.context_embedder = nn.Linear(context_dim, hidden_size, bias=True)
        self.register_buffer("pos_embed", torch.zeros(1, self.grid[0] * self.grid[1], hidden_size))
        self.blocks = nn.ModuleList(
            MMDiTBlock(hidden_size, num_heads, mlp_ratio, layer=i, last=i == depth - 1) for i in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def num_attention_layers(self) -> int:
        return self.depth

    @staticmethod
    def wrap_modules() -> set[type[nn.Module]]:
        """Module classes to shard with FSDP and to checkpoint (Lightning's `auto_wrap_policy`)."""
        return {MMDiTBlock}

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier linears, adaLN-Zero (every block starts as the identity), zero output."""
        if self.pos_embed.is_meta:  # built on the meta device (FSDP / counting): materialise, then call again
            return

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)

        self.apply(_basic_init)
        self.pos_embed.copy_(sincos_pos_embed_2d(self.hidden_size, *self.grid).unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.y_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            for stream in (block.image, block.text):
                nn.init.zeros_(stream.adaLN_modulation[-1].weight)
                nn.init.zeros_(stream.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, N, p * p * C) -> (B, C, H, W)."""
        p, c = self.patch_size, self.out_channels
        h, w = self.grid
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def _check_inputs(self, x: Tensor, t: Tensor, context: Tensor, pooled: Tensor | None) -> None:
        B = x.shape[0]
        if x.shape[1:] != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(
                f"MMDiT expects inputs of shape (B, {self.in_channels}, {self.input_size}, {self.input_size}), "
                f"got {tuple(x.shape)}"
            )
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},) (one time per sample), got {tuple(t.shape)}")
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != self.context_dim:
            raise ValueError(
                f"context must have shape ({B}, tokens, {self.context_dim}), got {tuple(context.shape)}; "
                "model.context_dim must equal the text encoders' context width (TextConditioner.context_dim)"
            )
        if self.y_embedder is None:
            if pooled is not None:
                raise ValueError("this MMDiT has pooled_dim=0 (no pooled text vector) but `pooled` was given")
        elif pooled is None or pooled.shape != (B, self.pooled_dim):
            got = None if pooled is None else tuple(pooled.shape)
            raise ValueError(
                f"pooled must have shape ({B}, {self.pooled_dim}), got {got}; model.pooled_dim must equal the "
                "text encoders' pooled width (TextConditioner.pooled_dim)"
            )

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        pooled: Tensor | None = None,
        plan: AttentionPlan | None = None,
    ) -> Tensor:
        """Velocity at (x_t, t) given text.

        x: (B, C, H, W) noisy input; t: (B,) times in [0, 1]; context: (B, L, context_dim) text tokens;
        pooled: (B, pooled_dim) pooled text vector (None when pooled_dim = 0). The unconditional
        prediction takes the empty prompt's encoding. plan: attention rectification for guidance
        (None = plain attention); its layers are block indices.
        """
        self._check_inputs(x, t, context, pooled)
        if plan is not None:
            plan.validate(self.num_attention_layers, x.shape[0])
        c = self.t_embedder(t * self.time_scale)  # (B, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(pooled.to(c.dtype))
        img = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (B, N, D)
        txt = self.context_embedder(context.to(self.context_embedder.weight.dtype))  # (B, L, D)
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training:
                img_out, txt_out = checkpoint(block, img, txt, c, self.grid, plan, use_reentrant=False)
            else:
                img_out, txt_out = block(img, txt, c, self.grid, plan)
            # skip-layer guidance's rows keep both streams' inputs (SD3.5: the whole joint block skipped)
            img = skip_blocks(plan, i, img, img_out)
            txt = None if txt_out is None else skip_blocks(plan, i, txt, txt_out)
        return self.unpatchify(self.final_layer(img, c))  # (B, C, H, W)


# --- sizes -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Preset:
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int = 2


# Named sizes. SD3's family ties the width to the depth (hidden 64 d, d heads of 64): `MMDiT-d{d}`
# for any d (SD3-medium is d24). The paper's two text-to-image sizes:
# - MMDiT-B/2, the model of Table 7 (I-ERG on blocks 10..17): 28 blocks of width 768 (B width, 12
#   heads of 64). The paper gives no size; Table 7's ranges are read from its other rows: DiT-XL/2's
#   12..15 and MMDiT-B/2's 10..17 are both centred on block 13.5, the middle of a 28-block stack,
#   which is the "middle blocks" rule of appendix B.4. A 12-block (DiT-B depth) model has no block 17.
# - MMDiT-38x1536, section 4's text-to-image model: 38 blocks, hidden 1536 (24 heads of 64). The paper
#   says "approx 1.9B parameters"; SD3's block (both streams with their own adaLN, qkv, proj, 4x MLP)
#   at this size has 3.2B (tests/test_mmdit.py counts it). The adaLN and attention projections of
#   the two streams alone are 1.79B, so the paper's block must be lighter in ways it does not describe.
_NAMED = {
    "MMDiT-B/2": _Preset(depth=28, hidden_size=768, num_heads=12),
    "MMDiT-38x1536": _Preset(depth=38, hidden_size=1536, num_heads=24),
}
MMDIT_PRESETS: dict[str, dict[str, int]] = {
    **{name: vars(p).copy() for name, p in _NAMED.items()},
    **{f"MMDiT-d{d}": vars(_Preset(depth=d, hidden_size=64 * d, num_heads=d)).copy() for d in (12, 16, 24, 38)},
}


def mmdit_preset(arch: str) -> dict[str, int]:
    """Size of a named MMDiT: 'MMDiT-B/2', 'MMDiT-38x1536', or SD3's 'MMDiT-d{depth}' (hidden 64 x depth)."""
    if arch in MMDIT_PRESETS:
        return dict(MMDIT_PRESETS[arch])
    match = re.fullmatch(r"MMDiT-d(\d+)", arch)
    if match and int(match.group(1)) >= 1:
        d = int(match.group(1))
        return vars(_Preset(depth=d, hidden_size=64 * d, num_heads=d)).copy()
    raise ValueError(f"unknown MMDiT architecture {arch!r}; choose one of {sorted(MMDIT_PRESETS)} or MMDiT-d<depth>")


def build_mmdit(
    arch: str | None = None, checkpoint: str | None = None, prefer_ema: bool = True, **kwargs: Any
) -> MMDiT:
    """Build an MMDiT from a named size plus overrides (explicit arguments win), then load weights."""
    from models.checkpoints import load_into

    params: dict[str, Any] = mmdit_preset(arch) if arch else {}
    params.update({k: v for k, v in kwargs.items() if v is not None})
    missing = [k for k in ("depth", "hidden_size", "num_heads", "patch_size") if k not in params]
    if missing:
        raise ValueError(f"model config needs `arch` (e.g. MMDiT-B/2) or explicit {missing}")
    model = MMDiT(**params)
    if checkpoint:
        load_into(model, checkpoint, prefer_ema, arch or "MMDiT", what="model.checkpoint")
    return model


build_mmdit.forwards_to = MMDiT  # config checks: build_mmdit's **kwargs are MMDiT's arguments


def mmdit_flops_per_forward(model: MMDiT, context_tokens: int) -> float:
    """Matmul FLOPs (2 x MACs) of one forward of one sample with `context_tokens` text tokens.

    Counts every linear map, the patch convolution and the two attention matmuls (QK^T, AV);
    norms, activations and softmax are left out (as in DiT's 118.6 GMACs).
    """
    n, L, d = model.grid[0] * model.grid[1], context_tokens, model.hidden_size
    m = int(d * model.mlp_ratio)

    def stream(tokens: int, pre_only: bool) -> int:
        if pre_only:  # adaLN (2 chunks) and qkv only
            return 2 * d * 2 * d + 2 * tokens * d * 3 * d
        return 2 * d * 6 * d + 2 * tokens * (3 * d * d + d * d + 2 * d * m)

    joint = 2 * 2 * (n + L) ** 2 * d  # QK^T and AV over all heads
    blocks = sum(stream(n, False) + stream(L, i == model.depth - 1) + joint for i in range(model.depth))
    patch_out = model.patch_size**2 * model.out_channels
    embed = 2 * n * patch_out * d + 2 * L * model.context_dim * d + 2 * (256 * d + d * d)
    if model.y_embedder is not None:
        embed += 2 * (model.pooled_dim * d + d * d)
    final = 2 * d * 2 * d + 2 * n * d * patch_out
    return float(blocks + embed + final)
