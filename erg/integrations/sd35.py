"""ERG and every method of the shared sampler on Stable Diffusion 3.5 (large / medium) through diffusers.

    model = load_sd35("weights/stable-diffusion-3.5-medium", variant="medium")
    sampler = GuidedSampler(build_guidance(erg_sd35_medium), model, config=SamplerConfig(steps=40, schedule="pipeline"))

SD3.5 is SD3's pipeline (StableDiffusion3Pipeline) with a bigger or a "dual" transformer, so this family is
SD3's (erg/integrations/sd3.py: conventions, JointAttention, C-ERG on clip_l / openclip_g / t5_xxl) plus what
differs:

- both variants RMS-normalise q and k per head after the projections (qk_norm="rms_norm"): the seam gets the
  normalised q, so a temperature scales the logits (never a projection that the norm would undo);
- SD3.5-large: 38 blocks, one joint attention each: block i is attention layer i (38 layers);
- SD3.5-medium: 24 blocks; its first 13 blocks (0..12, `dual_attention_layers`) have a SECOND attention, an
  image-only self-attention (`attn2`, run after the joint one on the same block input). Layer i is block i, and
  a plan on layer i acts on BOTH attentions of block i (the joint attention's image queries and the extra
  self-attention's queries, which are all image tokens); blocks 13..23 have the joint attention only. So
  layer indices mean the same blocks as in SD3-medium (24 layers), and Table 7's SD3 row applies unscaled.
  (SAG records both maps of a dual block; the later one, the image self-attention's, is the one it reads.)
- the time grid is the pipeline's own (schedule=pipeline: the folder's scheduler, shift 3.0 for both).
"""

from __future__ import annotations

from erg.integrations.adapter import load_pipeline
from erg.integrations.sd3 import SD3Denoiser

__all__ = ["SD35Denoiser", "load_sd35"]

HUB_IDS = {"large": "stabilityai/stable-diffusion-3.5-large", "medium": "stabilityai/stable-diffusion-3.5-medium"}


class SD35Denoiser(SD3Denoiser):
    """A StableDiffusion3Pipeline with an SD3.5 transformer (dual attention blocks routed too; see above)."""

    family = "Stable Diffusion 3.5"
    dual_attention = True


def load_sd35(
    path: str,
    variant: str = "large",
    resolution: int | None = 1024,
    dtype: str = "auto",
    text_encoder_3: bool = True,
    max_sequence_length: int = 256,
    decode_batch: int = 4,
    offload: bool = False,
    download: bool = False,
) -> SD35Denoiser:
    """SD3.5-large or -medium from a local diffusers folder (never the hub, unless download=true)."""
    if variant not in HUB_IDS:
        raise ValueError(f"model.variant={variant!r}: Stable Diffusion 3.5 comes as 'large' or 'medium' here")
    extra = {} if text_encoder_3 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = load_pipeline(SD35Denoiser.pipeline_class, path, family=f"Stable Diffusion 3.5 {variant}",
                         hub_id=HUB_IDS[variant], env=f"SD35_{variant.upper()}_PATH", dtype=dtype, download=download,
                         **extra)  # fmt: skip
    dual = tuple(pipe.transformer.config.dual_attention_layers or ())
    if bool(dual) != (variant == "medium"):
        other = "large" if variant == "medium" else "medium"
        raise ValueError(
            f"{path} holds an SD3.5-{other}-like transformer (dual attention blocks: {list(dual) or 'none'}), but "
            f"model=sd35_{variant} was chosen: use model=sd35_{other} or point model.path at an SD3.5-{variant} folder"
        )
    return SD35Denoiser(pipe, resolution=resolution, max_sequence_length=max_sequence_length,
                        decode_batch=decode_batch, offload=offload)  # fmt: skip
