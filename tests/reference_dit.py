"""An independent DiT/SiT forward for equivalence tests, written from REFERENCE.md's specification
with timm's ViT building blocks (PatchEmbed, Attention, Mlp), as the public DiT/SiT code uses.

It shares no code with models/: if our DiT and this agree on the same state dict, our key layout
and maths match the public checkpoints'.
"""

from __future__ import annotations

import torch
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention
from torch import nn


def _ln(d: int) -> nn.LayerNorm:
    return nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)


class _TEmb(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, t):
        k = torch.arange(128, dtype=torch.float64)
        freqs = torch.pow(torch.tensor(10000.0, dtype=torch.float64), -k / 128)
        ang = t.double()[:, None] * freqs[None, :]
        return self.mlp(torch.cat([ang.cos(), ang.sin()], dim=1).float())


class _YEmb(nn.Module):
    def __init__(self, n: int, d: int):
        super().__init__()
        self.embedding_table = nn.Embedding(n + 1, d)


class _Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = _ln(d), _ln(d)
        self.attn = Attention(d, num_heads=heads, qkv_bias=True)
        self.mlp = Mlp(in_features=d, hidden_features=4 * d, act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c):
        m = self.adaLN_modulation(c)[:, None, :]
        d = x.shape[-1]
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[..., i * d : (i + 1) * d] for i in range(6))
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class _Final(nn.Module):
    def __init__(self, d: int, p: int, c: int):
        super().__init__()
        self.norm_final = _ln(d)
        self.linear = nn.Linear(d, p * p * c)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))


class ReferenceDiT(nn.Module):
    """DiT with learned sigma (2C outputs), as released by facebookresearch/DiT and willisma/SiT."""

    def __init__(self, input_size, patch, in_ch, d, depth, heads, num_classes):
        super().__init__()
        self.p, self.c_out, self.n = patch, 2 * in_ch, input_size // patch
        self.x_embedder = PatchEmbed(input_size, patch, in_ch, d, bias=True)
        self.t_embedder = _TEmb(d)
        self.y_embedder = _YEmb(num_classes, d)
        self.pos_embed = nn.Parameter(torch.randn(1, self.n * self.n, d), requires_grad=False)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(depth))
        self.final_layer = _Final(d, patch, self.c_out)

    def forward(self, x, t, y):
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder.embedding_table(y)
        for blk in self.blocks:
            h = blk(h, c)
        f = self.final_layer
        shift, scale = f.adaLN_modulation(c)[:, None, :].split(h.shape[-1], dim=-1)
        h = f.linear(f.norm_final(h) * (1 + scale) + shift)  # (B, n*n, p*p*C)
        B = h.shape[0]
        # token (i, j), in-patch offset (a, b), channel c  ->  pixel (i*p + a, j*p + b)
        h = h.view(B, self.n, self.n, self.p, self.p, self.c_out).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(B, self.c_out, self.n * self.p, self.n * self.p)


def public_dit_keys(depth: int) -> list[str]:
    """The state-dict keys of the public DiT/SiT checkpoints (REFERENCE.md)."""
    keys = [
        "pos_embed",
        "x_embedder.proj.weight",
        "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.0.bias",
        "t_embedder.mlp.2.weight",
        "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
    ]
    for i in range(depth):
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys += [f"blocks.{i}.{name}.weight", f"blocks.{i}.{name}.bias"]
    for name in ("linear", "adaLN_modulation.1"):
        keys += [f"final_layer.{name}.weight", f"final_layer.{name}.bias"]
    return keys
