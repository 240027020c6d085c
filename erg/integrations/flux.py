"""ERG and every method of the shared sampler on Flux.1 (dev / schnell) through diffusers' FluxPipeline.

    model = load_flux("weights/FLUX.1-dev", variant="dev")                 # or FluxDenoiser(pipe)
    sampler = GuidedSampler(build_guidance(erg_flux_dev), model, config=SamplerConfig(steps=28, schedule="pipeline"))
    images = model.decode(sampler.sample_indices(range(4), prompts))      # in [-1, 1]

The Flux family on the shared layer (erg/integrations/adapter.py); this file holds only what is Flux's:

- conventions: the transformer takes sigma = 1 - t (it multiplies by 1000 itself) and predicts
  v_diffusers = eps - x = -v, on latents packed 2x2 into tokens ((B, 16, H, W) -> (B, H/2 * W/2, 64), row-major):
  the adapter packs and unpacks, so the sampler sees (16, H/8, W/8) latents like any other model;
- attention layers in forward order: the 19 double-stream blocks' joint attention are layers 0..18, the 38
  single-stream blocks' attention over the concatenated [text ; image] tokens are layers 19..56 (57 in all;
  tiny models: D double + S single). In both the text tokens come FIRST, then the image tokens on their
  (H/2, W/2) grid; image-level rectifiers touch the image queries only;
- q and k are RMS-normalised per head right after to_q / to_k, then rotated (RoPE): a temperature on to_q's
  output would be undone by the norm (the trap of public ports), so `FluxSeamAttention` hands the seam q and k
  after the norm and the rotation, and the temperature scales the logits;
- the guidance-distillation embedding (Flux-dev): the transformer takes a "distilled guidance" input that
  approximates CFG in one forward. Here it is set to `distilled_guidance` (default 3.5, the pipeline's default
  guidance_scale) for EVERY branch of every method, so guidance=none is exactly FluxPipeline(guidance_scale=3.5)
  and CFG / ERG / PAG / SEG / SAG ... run as a true second branch beside it (the pipeline's `true_cfg_scale`
  path, with its `negative_prompt=""` for CFG), batched with the positive rows. Flux-schnell has no such
  embedding (timestep-distilled, 4 steps): distilled_guidance must be null there;
- C-ERG: clip_l (text_encoder, CLIP ViT-L/14: only its pooled output is used) and t5_xxl (text_encoder_2,
  T5-v1.1-XXL), the same encoders as SD3's, with Table 7's SD3 ranges;
- the time grid: the pipeline's own (sigmas linspace(1, 1/n, n), shifted by its resolution-dependent mu
  for dev; unshifted for schnell): sampler=flux_dev / flux_schnell use schedule=pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from erg.attention import AttentionPlan
from erg.flow import from_diffusers_velocity, to_diffusers_sigma
from erg.integrations.adapter import AttentionLayer, DiffusersDenoiser, SeamProcessor, load_pipeline

__all__ = ["FLUX_ENCODERS", "FluxDenoiser", "FluxSeamAttention", "load_flux"]

# C-ERG's names for the pipeline's text encoders (configs/guidance/erg_flux_*.yaml).
FLUX_ENCODERS = {"clip_l": "text_encoder", "t5_xxl": "text_encoder_2"}
HUB_IDS = {"dev": "black-forest-labs/FLUX.1-dev", "schnell": "black-forest-labs/FLUX.1-schnell"}


class FluxSeamAttention(SeamProcessor):
    """diffusers' FluxAttnProcessor (projections, per-head RMSNorm on q / k, [text ; image] concatenation, RoPE,
    output projections) with the attention itself through our seam.

    Double-stream blocks pass the text tokens as encoder_hidden_states; single-stream blocks pass the
    concatenated [text ; image] sequence as hidden_states, whose text length only the adapter knows
    (`routing.text_tokens`).
    """

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise ValueError(f"FluxSeamAttention (layer {self.layer}) takes no attention mask")
        if getattr(attn, "fused_projections", False):
            raise ValueError("Flux attention with fused projections is not routed through the seam: unfuse them")

        def heads(x: Tensor) -> Tensor:  # (B, T, H * d) -> (B, T, H, d), diffusers' layout
            return x.unflatten(-1, (-1, attn.head_dim))

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)  # RMSNorm per head: the logits' temperature must come after it
        if encoder_hidden_states is not None:  # double-stream block: text tokens first
            L = encoder_hidden_states.shape[1]
            cq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
            ck = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
            cv = heads(attn.add_v_proj(encoder_hidden_states))
            q, k, v = torch.cat([cq, q], dim=1), torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)
        else:  # single-stream block: hidden_states is already [text ; image]
            L = self.routing.text_tokens
            if L is None:
                if self.routing.plan:
                    raise ValueError(f"Flux single-stream layer {self.layer}: the text length was not given")
                L = 0
        T = q.shape[1]
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), image=slice(L, T),
                          text=slice(0, L) if L else None)  # fmt: skip
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)  # (B, T, H * d)
        if encoder_hidden_states is None:
            return out
        text, image = out.split_with_sizes([L, T - L], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())


def pack(x: Tensor) -> Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens, as FluxPipeline._pack_latents."""
    B, C, H, W = x.shape
    return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of `pack` for (height, width) latents, as FluxPipeline._unpack_latents."""
    B, _, D = tokens.shape
    x = tokens.view(B, height // 2, width // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, D // 4, height, width)


class FluxDenoiser(DiffusersDenoiser):
    """A FluxPipeline as a velocity model of the shared sampler (see the module docstring).

    resolution: image size in pixels (default 1024); latents (16, resolution / 8, resolution / 8).
    max_sequence_length: T5 tokens (the pipeline's default 512; schnell's is 256).
    distilled_guidance: Flux-dev's guidance-embedding input on every branch (None: schnell, which has none).
    """

    family = "Flux.1"
    pipeline_class = "FluxPipeline"
    encoders = FLUX_ENCODERS
    latent_multiple = 2  # 2x2 latent pixels per token

    def __init__(
        self,
        pipe: Any,
        resolution: int | None = None,
        max_sequence_length: int = 512,
        distilled_guidance: float | None = 3.5,
        decode_batch: int = 4,
        offload: bool = False,
    ):
        super().__init__(pipe, resolution=resolution, decode_batch=decode_batch, offload=offload)
        embeds = bool(self.transformer.config.guidance_embeds)
        if embeds and distilled_guidance is None:
            raise ValueError(
                "this Flux transformer has a guidance-distillation embedding (Flux.1-dev): set "
                "model.distilled_guidance (3.5 is the pipeline's default)"
            )
        if not embeds and distilled_guidance is not None:
            raise ValueError(
                f"model.distilled_guidance={distilled_guidance}, but this Flux transformer has no guidance "
                "embedding (Flux.1-schnell): set model.distilled_guidance=null"
            )
        self.distilled_guidance = None if distilled_guidance is None else float(distilled_guidance)
        self.max_sequence_length = int(max_sequence_length)

    @property
    def in_channels(self) -> int:
        return int(self.transformer.config.in_channels) // 4  # the VAE's latent channels (packed 2x2 inside)

    def attention_layers(self) -> list[AttentionLayer]:
        double = len(self.transformer.transformer_blocks)
        layers = [AttentionLayer(f"transformer_blocks.{i}.attn.processor", i, FluxSeamAttention(i, self.routing))
                  for i in range(double)]  # fmt: skip
        for j in range(len(self.transformer.single_transformer_blocks)):
            name = f"single_transformer_blocks.{j}.attn.processor"
            layers.append(AttentionLayer(name, double + j, FluxSeamAttention(double + j, self.routing)))
        return layers

    def grid(self, x: Tensor) -> tuple[int, int]:
        return (x.shape[-2] // 2, x.shape[-1] // 2)

    def text_tokens(self, inputs: dict[str, Tensor]) -> int:
        return int(inputs["context"].shape[1])

    def forward(
        self, x: Tensor, t: Tensor, context: Tensor, pooled: Tensor, plan: AttentionPlan | None = None
    ) -> Tensor:
        """Our velocity at (x_t, t). x: (B, 16, H, W) latents; t: (B,) in [0, 1], 0 = noise; context (B, L, 4096)
        T5 tokens / pooled (B, 768) CLIP vector: `encode`'s outputs; plan: rectifiers per layer and row."""
        return self.denoise(x, t, plan, context=context, pooled=pooled)

    def _velocity(self, x: Tensor, t: Tensor, context: Tensor, pooled: Tensor) -> Tensor:
        from diffusers import FluxPipeline

        B, _, H, W = x.shape
        dtype = self.transformer.dtype
        img_ids = FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, x.device, dtype)
        txt_ids = torch.zeros(context.shape[1], 3, device=x.device, dtype=dtype)
        guidance = None
        if self.distilled_guidance is not None:
            guidance = torch.full((B,), self.distilled_guidance, device=x.device, dtype=torch.float32)
        tokens = self.transformer(
            hidden_states=pack(x.to(dtype)),
            timestep=to_diffusers_sigma(t).to(dtype),  # the transformer multiplies by 1000 itself
            guidance=guidance,
            pooled_projections=pooled.to(dtype),
            encoder_hidden_states=context.to(dtype),
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return from_diffusers_velocity(unpack(tokens, H, W))

    def scheduler_kwargs(self, steps: int) -> dict[str, Any]:
        """As FluxPipeline's `__call__`: sigmas linspace(1, 1/n, n) and mu from the image's token count."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = self.pipe.scheduler.config
        tokens = (self.input_size // 2) ** 2
        mu = calculate_shift(tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))  # fmt: skip
        if cfg.get("use_flow_sigmas", False):
            return {"num_inference_steps": steps, "mu": mu}
        return {"sigmas": np.linspace(1.0, 1 / steps, steps), "mu": mu}

    # --- text ------------------------------------------------------------------------------------------
    def _encode(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """The pipeline's prompt encoding: {"context": (B, max_sequence_length, 4096) T5, "pooled": (B, 768) CLIP}."""
        context, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            device=self.execution_device or self.transformer.device,
            max_sequence_length=self.max_sequence_length,
        )
        return {"context": context, "pooled": pooled}


def load_flux(
    path: str,
    variant: str = "dev",
    resolution: int | None = 1024,
    dtype: str = "auto",
    distilled_guidance: float | None = 3.5,
    max_sequence_length: int = 512,
    decode_batch: int = 4,
    offload: bool = False,
    download: bool = False,
) -> FluxDenoiser:
    """Flux.1-dev or -schnell from a local diffusers folder (never the hub, unless download=true)."""
    if variant not in HUB_IDS:
        raise ValueError(f"model.variant={variant!r}: Flux.1 comes as 'dev' or 'schnell'")
    env = f"FLUX_{variant.upper()}_PATH"
    pipe = load_pipeline(FluxDenoiser.pipeline_class, path, family=f"Flux.1-{variant}", hub_id=HUB_IDS[variant],
                         env=env, dtype=dtype, download=download)  # fmt: skip
    if bool(pipe.transformer.config.guidance_embeds) != (variant == "dev"):
        other = "schnell" if variant == "dev" else "dev"
        raise ValueError(
            f"{path} holds a Flux.1-{other} transformer ({'no' if variant == 'dev' else 'a'} guidance embedding), but "
            f"model=flux_{variant} was chosen: use model=flux_{other} or point model.path at a Flux.1-{variant} folder"
        )
    return FluxDenoiser(pipe, resolution=resolution, max_sequence_length=max_sequence_length,
                        distilled_guidance=distilled_guidance, decode_batch=decode_batch, offload=offload)  # fmt: skip
