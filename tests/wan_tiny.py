"""Tiny Wan 2.1 / 2.2 text-to-video pipelines built from configs (no download): Wan 2.1-1.3B's 30 transformer
blocks (so the presets' layer range, Table 7's SD3 row scaled to 30 blocks, exists) and UMT5-XXL's 24 encoder
blocks, every width tiny. Tokenizer: MiniLM's BERT tokenizer (the only one available offline), as
tests/sd3_tiny.py. Wan 2.2's A14B layout is two such transformers (high-noise `transformer`, low-noise
`transformer_2`) switched at `boundary_ratio`; TI2V-5B's is one with `expand_timesteps` (a timestep per token).

The scheduler is FlowMatchEulerDiscreteScheduler (shift 3.0, Wan's 480p flow shift), the Euler step of the
shared sampler (Wan's own default is UniPC on the same flow: a multistep solver, not reproduced).
"""

from __future__ import annotations

import torch

from tests.sd3_tiny import PROMPTS, _tokenizer

__all__ = ["FRAMES", "PROMPTS", "TOKENS", "tiny_wan_pipeline", "wan_variant"]

TOKENS = 12  # UMT5 tokens (max_sequence_length) in the tests; the pipeline's default is 512
FRAMES = 5  # video frames: (5 - 1) / 4 + 1 = 2 latent frames
Z = 4  # latent channels (Wan's VAE: 16)


def _umt5(layers: int, width: int, seed: int):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=30522, d_model=width, d_kv=8, d_ff=2 * width, num_layers=layers, num_heads=2)
    return UMT5EncoderModel(config).eval()


def _transformer(seed: int, layers: int = 30):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=Z, out_channels=Z,
        text_dim=24, freq_dim=32, ffn_dim=32, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()  # fmt: skip
    with torch.no_grad():  # make every output clearly non-trivial
        for p in transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return transformer


def wan_variant(pipe, version: str, seed: int = 0):
    """Another Wan version on the same components: "2.2" adds a low-noise expert (transformer_2, boundary 0.875),
    "2.2-ti2v" feeds a timestep per token (expand_timesteps)."""
    from diffusers import WanPipeline

    parts = {k: v for k, v in pipe.components.items() if k != "transformer_2"}
    extra = {"transformer_2": _transformer(seed + 2), "boundary_ratio": 0.875} if version == "2.2" else {}
    out = WanPipeline(**parts, **extra, expand_timesteps=version == "2.2-ti2v")
    out.set_progress_bar_config(disable=True)
    return out


def tiny_wan_pipeline(seed: int = 0, version: str = "2.1"):
    """WanPipeline: 30 blocks of width 24 (2 heads of 12: RoPE's 4 + 4 + 4 channels for frames, height, width),
    UMT5 of 24 blocks (width 24), latents (4, 2, 8, 8) from 5 frames of 32x32 (a 2 x 4 x 4 grid of 32 video
    tokens).

    version: "2.1" (one transformer), "2.2" (A14B: two experts, boundary_ratio 0.875) or "2.2-ti2v"
    (TI2V-5B: one transformer, expand_timesteps).
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    if version not in ("2.1", "2.2", "2.2-ti2v"):
        raise ValueError(f"unknown Wan version {version!r}")
    umt5 = _umt5(24, 24, seed)
    transformer = _transformer(seed + 1)
    transformer_2 = _transformer(seed + 2) if version == "2.2" else None
    torch.manual_seed(seed + 3)
    vae = AutoencoderKLWan(
        base_dim=4, z_dim=Z, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 0.8, 1.2], scale_factor_temporal=4,
        scale_factor_spatial=4,
    ).eval()  # fmt: skip
    pipe = WanPipeline(
        tokenizer=_tokenizer(512), text_encoder=umt5, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer, transformer_2=transformer_2, boundary_ratio=0.875 if version == "2.2" else None,
        expand_timesteps=version == "2.2-ti2v",
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
