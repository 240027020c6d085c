"""ERG on Wan 2.1 / 2.2 text-to-video through diffusers, with the shared sampler.

    model = load_wan("weights/Wan2.1-T2V-1.3B-Diffusers", height=480, width=832, num_frames=81)
    config = SamplerConfig(steps=50, schedule="pipeline")                           # the pipeline's sigmas
    sampler = GuidedSampler(build_guidance(erg_wan_d30), model, config=config)      # configs/guidance/
    videos = model.decode(sampler.sample_indices(range(2), prompts))                # (B, 3, F, H, W) in [-1, 1]

The Wan family on the shared layer (erg/integrations/adapter.py); this file holds only what is Wan's:

- conventions: a flow model like SD3: the transformer takes sigma = 1 - t times 1000 and predicts
  v_diffusers = eps - x = -v (erg/flow.py);
- tokens: latents (B, C, F, H, W) (F = (frames - 1) / 4 + 1 latent frames), patchified (1, 2, 2) and flattened
  frames-major: the video tokens lie on a (F, H/2, W/2) grid, row-major in that order; that 3D grid is the
  `Site.grid` of every layer, so SEG blurs the queries in 3D and SAG masks the 3D grid (erg/attention.py,
  erg/guidance/sag.py). Prompts enter through cross-attention, not joint attention;
- attention: each block has a self-attention over the video tokens (attn1: q / k RMSNorm across heads, then
  3D RoPE) and a cross-attention to UMT5's tokens (attn2). Attention layer i of the seam is block i's
  SELF-attention (I-ERG, PAG, SEG, SAG act there); `SelfAttention` is diffusers' WanAttnProcessor for it (tested
  bit for bit) with the attention itself through the seam, on q and k AFTER the norm and RoPE, so a temperature
  scales the logits (the norm would undo a scaled projection). The cross-attention keeps diffusers' processor;
- C-ERG: UMT5-XXL (the pipeline's text_encoder, 24 blocks) by the name umt5_xxl. Wan zero-pads its 512 tokens
  after each prompt's own, as the pipeline does;
- the unconditional input is the encoding of `negative_prompt` (default "", the pipeline's default negative;
  Wan's authors recommend a long one, pass it as model.negative_prompt);
- Wan 2.2: A14B has two experts, `transformer` for the high-noise steps (diffusers' timestep >= boundary_ratio x
  1000) and `transformer_2` for the rest, switched per step as the pipeline does; both have the same blocks, so
  layer i is block i of whichever runs. TI2V-5B feeds a timestep per token (`expand_timesteps`), as its pipeline.
  The pipeline's `guidance_scale_2` (another CFG scale for the low-noise expert) has no counterpart: our
  guidance uses one scale, i.e. the pipeline with guidance_scale_2 = guidance_scale;
- frames: `decode` gives videos (B, 3, F, H, W) in [-1, 1]; sample.py writes them through the same sample store
  (uint8 (n, F, H, W, C), data/sample_store.py).

What is equal (tests/test_wan.py): with guidance=none / cfg our sampler equals the pipeline's own loop with
FlowMatchEulerDiscreteScheduler on the same latents, to float tolerance (the pipeline runs cond and uncond as two
forwards per step; we batch them as one). Wan's own scheduler is UniPC (multistep, higher order): with it, our
sampler takes Euler steps on the sigmas it sets (`schedule=pipeline`), which is not the same integration (and the
transformer sees sigma x 1000 where UniPC feeds it that number floored to an integer).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from erg.attention import AttentionPlan
from erg.flow import from_diffusers_velocity, to_diffusers_sigma
from erg.integrations.adapter import AttentionLayer, DiffusersDenoiser, SeamProcessor, installed, load_pipeline

__all__ = ["WAN_ENCODERS", "WAN_MODELS", "SelfAttention", "WanDenoiser", "WanModel", "load_wan"]

# C-ERG's name for the pipeline's text encoder (configs/guidance/erg_wan_*.yaml).
WAN_ENCODERS = {"umt5_xxl": "text_encoder"}


@dataclass(frozen=True)
class WanModel:
    """What a Wan model config (configs/model/<name>.yaml) expects of its folder, checked by `load_wan`."""

    hub_id: str
    blocks: int  # transformer blocks (each expert's)
    two_experts: bool  # Wan 2.2 A14B: transformer_2, the low-noise expert
    expand_timesteps: bool  # TI2V-5B: a timestep per token
    env: str  # the environment variable its config reads the folder from

    def describe(self) -> str:
        experts = "two experts" if self.two_experts else "one transformer"
        return f"{self.blocks} blocks, {experts}, expand_timesteps={self.expand_timesteps}"


WAN_MODELS = {
    "wan2_1_t2v_1_3b": WanModel("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 30, False, False, "WAN2_1_T2V_1_3B_PATH"),
    "wan2_1_t2v_14b": WanModel("Wan-AI/Wan2.1-T2V-14B-Diffusers", 40, False, False, "WAN2_1_T2V_14B_PATH"),
    "wan2_2_t2v_a14b": WanModel("Wan-AI/Wan2.2-T2V-A14B-Diffusers", 40, True, False, "WAN2_2_T2V_A14B_PATH"),
    "wan2_2_ti2v_5b": WanModel("Wan-AI/Wan2.2-TI2V-5B-Diffusers", 30, False, True, "WAN2_2_TI2V_5B_PATH"),
}


def _check_variant(pipe: Any, path: str, variant: str) -> None:
    """Refuse a folder that is not the Wan model its config names (its presets: layers, scale, sampler)."""
    found = (len(pipe.transformer.blocks), pipe.transformer_2 is not None, bool(pipe.config.get("expand_timesteps")))
    expected = WAN_MODELS[variant]
    if found == (expected.blocks, expected.two_experts, expected.expand_timesteps):
        return
    match = [name for name, m in WAN_MODELS.items() if (m.blocks, m.two_experts, m.expand_timesteps) == found]
    hint = f"use model={match[0]}" if match else "use the model config of the Wan model it holds"
    blocks, two, expand = found
    raise ValueError(
        f"{path} holds a Wan transformer with {blocks} blocks, {'two experts' if two else 'one transformer'}, "
        f"expand_timesteps={expand}, but model={variant} expects {expected.describe()}: {hint} or point model.path "
        f"(${expected.env}) at a {expected.hub_id} folder"
    )


def _rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Wan's RoPE on (B, N, heads, head_dim) (diffusers' WanAttnProcessor, pairs of interleaved channels)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class SelfAttention(SeamProcessor):
    """Wan's self-attention (a block's attn1) through the seam: diffusers' WanAttnProcessor without encoder
    states, the attention itself by `self.attend` on q, k after their RMSNorm and RoPE."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        rotary_emb: tuple[Tensor, Tensor] | None = None,
        **kwargs: Any,
    ) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"Wan's self-attention (block {self.layer}) takes no encoder states and no mask")
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)  # RMSNorm across heads
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, v))  # (B, N, heads, head_dim)
        if rotary_emb is not None:
            q, k = _rotary(q, *rotary_emb), _rotary(k, *rotary_emb)
        N = q.shape[1]
        out = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), image=slice(0, N))
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)  # (B, N, heads x head_dim)
        return attn.to_out[1](attn.to_out[0](out))  # projection, dropout


class WanDenoiser(DiffusersDenoiser):
    """A WanPipeline (Wan 2.1, Wan 2.2 A14B / TI2V-5B) as a velocity model of the shared sampler.

    height, width, num_frames: the video (pixels, frames; the pipeline's defaults 480 x 832, 81 frames);
        latents (in_channels, (num_frames - 1) / 4 + 1, height / 8, width / 8) for Wan 2.1's VAE.
    max_sequence_length: UMT5 tokens (the pipeline's default 512).
    negative_prompt: the unconditional prompt (default "", the pipeline's).
    decode_batch: videos per VAE call; offload: adapter.DiffusersDenoiser.
    """

    family = "Wan"
    pipeline_class = "WanPipeline"
    encoders = WAN_ENCODERS

    def __init__(
        self,
        pipe: Any,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        max_sequence_length: int = 512,
        negative_prompt: str = "",
        decode_batch: int = 1,
        offload: bool = False,
    ):
        if pipe.transformer is None:
            raise ValueError("Wan: the pipeline has no `transformer` (a transformer_2-only pipeline is not supported)")
        _, p_h, p_w = pipe.transformer.config.patch_size
        spatial, temporal = int(pipe.vae_scale_factor_spatial), int(pipe.vae_scale_factor_temporal)
        if height % (spatial * p_h) or width % (spatial * p_w):
            raise ValueError(
                f"Wan: height {height} and width {width} must be multiples of {spatial * p_h} x {spatial * p_w} (VAE "
                f"factor {spatial} x patch), e.g. model.height={height // (spatial * p_h) * spatial * p_h}"
            )
        if num_frames % temporal != 1:
            raise ValueError(
                f"Wan: num_frames {num_frames} must be 1 + a multiple of {temporal} (the VAE's time factor), e.g. "
                f"model.num_frames={num_frames // temporal * temporal + 1}"
            )
        self.latent_multiple = int(p_h)
        super().__init__(pipe, resolution=height, decode_batch=decode_batch, offload=offload)
        self.vae_scale_factor = spatial  # WanPipeline's factors: spatial and temporal (no `vae_scale_factor`)
        self.height, self.width, self.num_frames = int(height), int(width), int(num_frames)
        self.latent_frames = (self.num_frames - 1) // temporal + 1
        self.transformer_2 = pipe.transformer_2  # Wan 2.2 A14B's low-noise expert (None otherwise)
        if self.transformer_2 is not None and len(self.transformer_2.blocks) != len(self.transformer.blocks):
            raise ValueError("Wan 2.2: the two experts have different depths; layer i would be ambiguous")
        self.num_train_timesteps = int(pipe.scheduler.config.num_train_timesteps)
        ratio = pipe.config.get("boundary_ratio", None)
        self.boundary = None if ratio is None else float(ratio) * self.num_train_timesteps
        if self.boundary is not None and self.transformer_2 is None:
            raise ValueError("Wan 2.2: boundary_ratio is set but the pipeline has no transformer_2")
        self.expand_timesteps = bool(pipe.config.get("expand_timesteps", False))
        self.max_sequence_length = int(max_sequence_length)
        self.negative_prompt = str(negative_prompt)

    def attention_layers(self) -> list[AttentionLayer]:
        return [
            AttentionLayer(f"blocks.{i}.attn1.processor", i, SelfAttention(i, self.routing))
            for i in range(len(self.transformer.blocks))
        ]

    def blocks(self) -> dict[int, nn.Module | list[nn.Module]]:
        """Block i is layer i (skip-layer guidance skips the whole block; Wan 2.2: block i of either expert)."""
        if self.transformer_2 is None:
            return dict(enumerate(self.transformer.blocks))
        return {i: [a, b] for i, (a, b) in enumerate(zip(self.transformer.blocks, self.transformer_2.blocks))}

    @property
    def latent_shape(self) -> tuple[int, ...]:
        s = self.vae_scale_factor
        return (self.in_channels, self.latent_frames, self.height // s, self.width // s)

    def grid(self, x: Tensor) -> tuple[int, int, int]:
        p_t, p_h, p_w = self.transformer.config.patch_size
        return (x.shape[-3] // p_t, x.shape[-2] // p_h, x.shape[-1] // p_w)  # Conv3d patches, frames-major

    def forward(self, x: Tensor, t: Tensor, context: Tensor, plan: AttentionPlan | None = None) -> Tensor:
        """Our velocity at (x_t, t). x: (B, C, F, h, w) video latents; t: (B,) in [0, 1], 0 = noise;
        context (B, L, 4096): `encode`'s UMT5 tokens; plan: rectifiers per block and row."""
        return self.denoise(x, t, plan, context=context)

    @contextmanager
    def routed(self, plan: AttentionPlan | None, grid: tuple[int, ...] | None, text_tokens: int | None = None
               ) -> Iterator[None]:  # fmt: skip
        """The shared routing on `transformer`, and the same processors on Wan 2.2's `transformer_2`."""
        with ExitStack() as stack:
            stack.enter_context(super().routed(plan, grid, text_tokens))
            if self.transformer_2 is not None:
                stack.enter_context(installed(self.transformer_2, self.processors))
            yield

    def expert(self, timestep: Tensor) -> nn.Module:
        """The transformer the pipeline runs at this diffusers timestep (Wan 2.2: high- or low-noise expert)."""
        if self.boundary is None:
            return self.transformer
        high = timestep >= self.boundary
        if bool(high.all()):
            return self.transformer
        if not bool(high.any()):
            return self.transformer_2
        raise ValueError(
            "Wan 2.2: the rows of one forward are on both sides of the experts' boundary "
            f"(timestep {self.boundary:g}); evaluate them at one time"
        )

    def _velocity(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        timestep = to_diffusers_sigma(t) * self.num_train_timesteps  # diffusers' time: sigma x 1000
        model = self.expert(timestep)
        if self.expand_timesteps:  # TI2V-5B: one timestep per video token (all equal in text-to-video)
            timestep = timestep[:, None].expand(x.shape[0], math.prod(self.grid(x)))
        v_diffusers = model(
            hidden_states=x.to(model.dtype),
            timestep=timestep,
            encoder_hidden_states=context.to(model.dtype),
            return_dict=False,
        )[0]
        return from_diffusers_velocity(v_diffusers.float())

    # --- text ------------------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """The pipeline's prompt encoding: {"context": (B, 512, 4096)} UMT5 tokens, zeros after each prompt's."""
        context, _ = self.pipe.encode_prompt(
            prompt=prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
            device=self.execution_device or self.transformer.device,
        )
        return {"context": context}

    def null(self, n: int) -> dict[str, Tensor]:
        """The unconditional inputs: the encoding of `negative_prompt` (default "", the pipeline's)."""
        return self.encode([self.negative_prompt] * n)

    # --- video -----------------------------------------------------------------------------------------
    def _groups(self) -> dict[str, list[nn.Module]]:
        groups = super()._groups()
        if self.transformer_2 is not None:
            groups["transformer"].append(self.transformer_2)
        return groups

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Video latents (B, C, F, h, w) -> videos (B, 3, frames, H, W) in [-1, 1], as the pipeline:
        z / (1 / latents_std) + latents_mean, then the Wan VAE."""
        self._place("vae")
        cfg = self.vae.config
        videos = []
        for chunk in latents.split(self.decode_batch):
            z = chunk.to(self.vae.device, self.vae.dtype)
            mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
            inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
            videos.append(self.vae.decode(z / inv_std + mean, return_dict=False)[0].float())
        return torch.cat(videos)


def load_wan(
    path: str,
    variant: str = "wan2_1_t2v_1_3b",
    height: int = 480,
    width: int = 832,
    num_frames: int = 81,
    dtype: str = "auto",
    vae_dtype: str = "float32",
    max_sequence_length: int = 512,
    negative_prompt: str = "",
    decode_batch: int = 1,
    offload: bool = False,
    download: bool = False,
    hub_id: str | None = None,
) -> WanDenoiser:
    """Wan 2.1 / 2.2 text-to-video from a local diffusers folder (a WanPipeline: transformer/ (and transformer_2/
    for Wan 2.2 A14B), vae/, text_encoder/ (UMT5), tokenizer/, scheduler/), never the hub unless download=true
    (then `hub_id`, by default the variant's). variant: the model config's name (`WAN_MODELS`); a folder holding
    another Wan model (its blocks, experts, expand_timesteps) is refused, naming the model=... that fits it.
    dtype: the transformer(s) and UMT5 (auto: bf16 on GPU, float32 on CPU); vae_dtype: the VAE (float32, as
    Wan's examples load it)."""
    if variant not in WAN_MODELS:
        raise ValueError(f"model.variant={variant!r} is not a Wan model here; choose one of {sorted(WAN_MODELS)}")
    expected = WAN_MODELS[variant]
    dtypes = {"default": dtype, "vae": vae_dtype}  # Wan's examples: the VAE in float32 beside a bf16 transformer
    pipe = load_pipeline(WanDenoiser.pipeline_class, path, family="Wan", hub_id=hub_id or expected.hub_id,
                         env=expected.env, dtype=dtypes, download=download)  # fmt: skip
    if pipe.transformer is not None:  # WanDenoiser refuses a transformer_2-only pipeline itself
        _check_variant(pipe, path, variant)
    return WanDenoiser(pipe, height=height, width=width, num_frames=num_frames, max_sequence_length=max_sequence_length,
                       negative_prompt=negative_prompt, decode_batch=decode_batch, offload=offload)  # fmt: skip
