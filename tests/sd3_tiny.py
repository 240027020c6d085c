"""A tiny Stable Diffusion 3 pipeline built from configs (no download): SD3's architecture and layer
counts where C-ERG's Table 7 ranges need them (CLIP-L 12 blocks, OpenCLIP-G 32, T5-XXL 24), every
width tiny. Tokenizers: MiniLM's BERT tokenizer (the only one available offline), 77 tokens for the CLIPs.
"""

from __future__ import annotations

import torch

PROMPTS = ["a red cube on a table", "two cats"]


def _tokenizer(max_length: int):
    import transformers

    from models.text_encoders import minilm_path

    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    tok.model_max_length = max_length
    return tok


def _clip(layers: int, hidden: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=30522, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden, eos_token_id=102,
        pad_token_id=0, bos_token_id=101,
    )  # fmt: skip
    return CLIPTextModelWithProjection(config).eval()


def _t5(layers: int, width: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=30522, d_model=width, d_kv=8, d_ff=2 * width, num_layers=layers, num_heads=2)
    return T5EncoderModel(config).eval()


def tiny_sd3_pipeline(seed: int = 0, num_layers: int = 8, dual_attention_layers: tuple[int, ...] = ()):
    """StableDiffusion3Pipeline: 8 transformer blocks of width 16 (Table 7 rectifies blocks [6, 8)),
    16x16 images -> 4-channel 8x8 latents (16 image tokens on a 4x4 grid). dual_attention_layers: the blocks
    with SD3.5-medium's extra image self-attention (SD3.5 tests: tests/sd35_tiny.py)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    clip_l, clip_g, t5 = _clip(12, 8, seed), _clip(32, 12, seed + 1), _t5(24, 24, seed + 2)
    torch.manual_seed(seed + 3)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=num_layers, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=24, caption_projection_dim=16, pooled_projection_dim=8 + 12, out_channels=4,
        pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=tuple(dual_attention_layers),
    ).eval()  # fmt: skip
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make the outputs clearly non-trivial
        for p in transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(seed + 4)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=4, sample_size=16, shift_factor=0.0609, scaling_factor=1.5305,
    ).eval()  # fmt: skip
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip_l, tokenizer=_tokenizer(77), text_encoder_2=clip_g, tokenizer_2=_tokenizer(77),
        text_encoder_3=t5, tokenizer_3=_tokenizer(512),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
