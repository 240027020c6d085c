"""A tiny PixArt-Sigma pipeline built from configs (no download): PixArt-Sigma's 28 transformer blocks (so the
presets' layer range, Table 7's SD3 row scaled to 28 blocks, exists) and T5-XXL's 24 encoder blocks, every
width tiny. Tokenizer: MiniLM's BERT tokenizer (the only one available offline), as tests/sd3_tiny.py.

The scheduler is DDIM on the trailing grid without clipping, so the pipeline's own loop is exactly the
deterministic (eta = 0) probability-flow Euler step that the shared sampler takes (erg/integrations/pixart.py).
"""

from __future__ import annotations

import torch

from tests.sd3_tiny import PROMPTS, _t5, _tokenizer

__all__ = ["PROMPTS", "TOKENS", "tiny_pixart_pipeline"]

TOKENS = 12  # T5 tokens (max_sequence_length) in the tests; the pipeline's default is 300


def tiny_pixart_pipeline(seed: int = 0, prediction_type: str = "epsilon", learned_sigma: bool = True):
    """PixArtSigmaPipeline: 28 blocks of width 16 (2 heads of 8), T5 of 24 blocks (width 24), 8x8 latents with 4
    channels (16 image tokens on a 4x4 grid) from 16x16 images; out_channels 8 = PixArt's learned sigma."""
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    t5 = _t5(24, 24, seed)
    torch.manual_seed(seed + 1)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=28, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=24,
        in_channels=4, cross_attention_dim=16, out_channels=8 if learned_sigma else 4, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
    ).eval()  # fmt: skip
    with torch.no_grad():  # PixArt zero-initialises nothing in diffusers, but make every output clearly non-trivial
        for p in transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=0.13025,
    ).eval()  # fmt: skip
    scheduler = DDIMScheduler(
        beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False, set_alpha_to_one=True,
        timestep_spacing="trailing", prediction_type=prediction_type,
    )  # fmt: skip
    pipe = PixArtSigmaPipeline(tokenizer=_tokenizer(512), text_encoder=t5, vae=vae, transformer=transformer,
                               scheduler=scheduler)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
