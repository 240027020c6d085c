"""DiT (Peebles & Xie, 2023) as a rectified-flow velocity model, read top to bottom.

    tokens = patchify(x_t) + pos_embed                     (B, N, D)
    c      = t_embed(t) + y_embed(y)                        (B, D)
    tokens = DiTBlock(tokens, c) x depth                    adaLN-Zero blocks
    v      = unpatchify(final_layer(tokens, c))             (B, C, H, W)

Conventions (erg/flow.py): t in [0, 1] with t = 0 noise, the output is the velocity x - eps.
This is SiT's convention, so a SiT-XL/2 checkpoint loads with `strict=True` and predicts our
velocity as is (`learn_sigma=True`: the checkpoint has 2C output channels, the first C are v).

Every attention goes through `erg.attention.attention` with its layer index; `forward(...,
plan=...)` takes an `AttentionPlan` so guidance can rectify chosen rows and layers without
touching this file (and skip whole blocks for chosen rows: `erg.attention.skip_blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from erg.attention import AttentionPlan, skip_blocks
from models.layers import (
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    SelfAttention,
    TimestepEmbedder,
    modulate,
    sincos_pos_embed_2d,
)

__all__ = ["DIT_PRESETS", "DiT", "DiTBlock", "FinalLayer", "count_parameters", "dit_preset"]


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (6 modulation chunks: shift/scale/gate x 2)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, layer: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, layer=layer)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor, grid: tuple[int, int], plan: AttentionPlan | None = None) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), grid, plan)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map to patch_size^2 * out_channels per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer predicting the rectified-flow velocity.

    Args:
        input_size: spatial size of the model input (pixels, or latent size = image size / 8).
        in_channels: channels of the model input (4 for SD-VAE latents, 1 or 3 for pixels).
        num_classes: number of classes; 0 builds an unconditional model (no label embedding).
        learn_sigma: keep DiT's doubled output channels (needed to load DiT/SiT checkpoints);
            only the first `in_channels` are returned.
        time_scale: t is multiplied by this before the sinusoidal embedding (1.0 = SiT).
        grad_checkpointing: recompute block activations in backward (activation checkpointing).
    """

    supports_block_skip = True  # forward applies erg.attention.skip_blocks after every block

    def __init__(
        self,
        input_size: int = 32,
        in_channels: int = 4,
        num_classes: int = 1000,
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        learn_sigma: bool = False,
        time_scale: float = 1.0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}")
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.learn_sigma = learn_sigma
        self.time_scale = time_scale
        self.grad_checkpointing = grad_checkpointing
        self.grid = (input_size // patch_size, input_size // patch_size)

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        # Fixed sin-cos embedding; a persistent buffer so it is saved as `pos_embed` (as upstream).
        self.register_buffer("pos_embed", torch.zeros(1, self.grid[0] * self.grid[1], hidden_size))
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, layer=i) for i in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def num_attention_layers(self) -> int:
        return self.depth

    @property
    def null_class(self) -> int | None:
        """Label of the learned "no class" embedding (None for an unconditional model)."""
        return self.y_embedder.null_class if self.y_embedder is not None else None

    def initialize_weights(self) -> None:
        if self.pos_embed.is_meta:  # parameter counting on the meta device: nothing to fill
            return

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        self.pos_embed.copy_(sincos_pos_embed_2d(self.hidden_size, *self.grid).unsqueeze(0))
        w = self.x_embedder.proj.weight.data  # initialise the patch projection like a Linear
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
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

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        plan: AttentionPlan | None = None,
        class_embedding: Tensor | None = None,
    ) -> Tensor:
        """Velocity at (x_t, t).

        x: (B, C, H, W) noisy input; t: (B,) times in [0, 1]; y: (B,) class labels, with
        `null_class` for the unconditional prediction (None for an unconditional model);
        plan: attention rectification for guidance (None = plain attention);
        class_embedding: (B, D) the label embedding given directly instead of y (guidance that edits
        the condition, e.g. CADS' noised class embedding); `y_embedder(y)` gives the same as y.
        """
        B = x.shape[0]
        if plan is not None:
            plan.validate(self.num_attention_layers, B)
        if x.shape[1:] != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(
                f"DiT expects inputs of shape (B, {self.in_channels}, {self.input_size}, {self.input_size}), "
                f"got {tuple(x.shape)}"
            )
        c = self.t_embedder(t * self.time_scale)  # (B, D)
        if class_embedding is not None:
            if self.y_embedder is None or y is not None:
                raise ValueError("pass either labels y or class_embedding, to a class-conditional DiT")
            c = c + class_embedding  # exactly what the label path adds
        elif self.y_embedder is not None:
            if y is None:
                raise ValueError(
                    f"class-conditional DiT needs labels y; use y = {self.null_class} (null class) for "
                    "the unconditional prediction"
                )
            c = c + self.y_embedder(y)
        elif y is not None:
            raise ValueError("this DiT is unconditional (num_classes=0) but labels y were given")

        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (B, N, D), N = H W / p^2
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training:
                out = checkpoint(block, tokens, c, self.grid, plan, use_reentrant=False)
            else:
                out = block(tokens, c, self.grid, plan)  # (B, N, D)
            tokens = skip_blocks(plan, i, tokens, out)  # skip-layer guidance's rows keep their input
        out = self.unpatchify(self.final_layer(tokens, c))  # (B, out_channels, H, W)
        return out[:, : self.in_channels] if self.learn_sigma else out


@dataclass(frozen=True)
class _Preset:
    depth: int
    hidden_size: int
    num_heads: int


_SIZES = {
    "S": _Preset(depth=12, hidden_size=384, num_heads=6),
    "B": _Preset(depth=12, hidden_size=768, num_heads=12),
    "L": _Preset(depth=24, hidden_size=1024, num_heads=16),
    "XL": _Preset(depth=28, hidden_size=1152, num_heads=16),
}
DIT_PRESETS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{patch}": {
        "depth": p.depth,
        "hidden_size": p.hidden_size,
        "num_heads": p.num_heads,
        "patch_size": patch,
    }
    for size, p in _SIZES.items()
    for patch in (2, 4, 8)
}


def dit_preset(arch: str) -> dict[str, int]:
    """Architecture hyper-parameters of a named DiT size, e.g. 'DiT-XL/2' (also 'SiT-XL/2')."""
    key = arch.replace("SiT-", "DiT-")
    if key not in DIT_PRESETS:
        raise ValueError(f"unknown DiT architecture {arch!r}; choose one of {sorted(DIT_PRESETS)}")
    return dict(DIT_PRESETS[key])


def count_parameters(model: nn.Module, include_buffers: bool = False) -> int:
    n = sum(p.numel() for p in model.parameters())
    if include_buffers:
        n += sum(b.numel() for b in model.buffers())
    return n


def dit_flops_per_forward(model: DiT) -> float:
    """Matmul FLOPs (2 x MACs) of one forward of one sample (DiT-XL/2 at 256px: 237 GFLOPs = 118.6 GMACs).

    Assumes mlp_ratio = 4, as every DiT preset does.
    """
    n = model.grid[0] * model.grid[1]
    d = model.hidden_size
    per_block = 2 * n * (3 * d * d + d * d + 2 * 4 * d * d) + 2 * 2 * n * n * d  # projections, MLP, QK^T and AV
    adaln = 2 * (6 * d * d)
    patch = 2 * n * (model.patch_size**2 * model.in_channels) * d
    final = 2 * n * d * model.patch_size**2 * model.out_channels + 2 * 2 * d * d
    return float(model.depth * (per_block + adaln) + patch + final + 2 * (256 * d + d * d))
