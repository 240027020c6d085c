"""A tiny Flux.1 pipeline built from configs (no download): Flux's layout (double-stream blocks, then
single-stream blocks; RoPE on a 3-axis position id; RMSNorm on q / k; dev's guidance embedding or schnell's
none), the text encoders' layer counts that C-ERG's Table 7 ranges need (CLIP-L 12 blocks, T5-XXL 24), every
width tiny. Tokenizers: MiniLM's BERT tokenizer (tests/sd3_tiny.py)."""

from __future__ import annotations

import torch

from tests.sd3_tiny import PROMPTS, _t5, _tokenizer

__all__ = ["PROMPTS", "tiny_flux_pipeline"]

DOUBLE, SINGLE = 2, 3  # attention layers 0, 1 (double-stream) and 2, 3, 4 (single-stream)


def _clip_text(layers: int, hidden: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=30522, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=77, eos_token_id=102, pad_token_id=0, bos_token_id=101,
    )  # fmt: skip
    return CLIPTextModel(config).eval()


def tiny_flux_pipeline(variant: str = "dev", seed: int = 0):
    """FluxPipeline: 2 double + 3 single blocks of width 16 (2 heads of 8; RoPE axes 2 + 2 + 4), 16x16 images
    -> 4-channel 8x8 latents -> 16 tokens of 16 channels on a 4x4 grid. variant dev: guidance embedding and
    Flux-dev's dynamically shifted scheduler; schnell: neither."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip_l, t5 = _clip_text(12, 8, seed), _t5(24, 24, seed + 2)
    torch.manual_seed(seed + 3)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=DOUBLE, num_single_layers=SINGLE, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=8, guidance_embeds=variant == "dev",
        axes_dims_rope=(2, 2, 4),
    ).eval()  # fmt: skip
    with torch.no_grad():  # clearly non-trivial outputs
        for p in transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(seed + 4)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=4, sample_size=16, shift_factor=0.1159, scaling_factor=0.3611,
    ).eval()  # fmt: skip
    if variant == "dev":  # FLUX.1-dev's scheduler config
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096,
        )  # fmt: skip
    else:  # FLUX.1-schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip_l, tokenizer=_tokenizer(77), text_encoder_2=t5,
        tokenizer_2=_tokenizer(512), transformer=transformer,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
