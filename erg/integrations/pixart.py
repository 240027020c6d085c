"""ERG on PixArt-Sigma through diffusers, with the shared sampler.

    model = load_pixart_sigma("weights/PixArt-Sigma-XL-2-1024-MS")                    # or PixArtDenoiser(pipe)
    config = SamplerConfig(steps=20, schedule="pipeline")                             # the pipeline's timesteps
    sampler = GuidedSampler(build_guidance(erg_pixart_sigma), model, config=config)   # configs/guidance/
    images = model.decode(sampler.sample_indices(range(4), prompts))                  # in [-1, 1]

The PixArt-Sigma family on the shared layer (erg/integrations/adapter.py); this file holds only what is its own:

- attention: each of the 28 blocks (diffusers' BasicTransformerBlock) has a self-attention over the image tokens
  (attn1) and a cross-attention from them to T5's tokens (attn2). Attention layer i of the seam is block i's
  SELF-attention: I-ERG, PAG, SEG and SAG act there (every token is an image token, on the (h/2, w/2) patch grid,
  row-major). `SelfAttention` is diffusers' AttnProcessor2_0 for it (tested bit for bit) with the attention itself
  through the seam; the cross-attention keeps diffusers' processor, so text reaches ERG through C-ERG only;
- C-ERG: T5-XXL (the pipeline's text_encoder, 24 blocks) by the name t5_xxl; its 300 tokens come with their
  padding mask (the cross-attention's encoder_attention_mask), as in the pipeline;
- the unconditional input is the pipeline's: its encoding of the empty prompt (its default negative);
- time: PixArt-Sigma is NOT a flow model but a DDPM one (variance preserving, 1000 linear betas, epsilon
  prediction, and a learned sigma in its last 4 output channels, which the pipeline drops and so do we).
  `_velocity` converts at the boundary (erg/flow.py): our x_t is its x_s = x_t / m(t), m = sqrt(t^2 + (1 - t)^2),
  at alpha_bar = t^2 / (t^2 + (1 - t)^2); its timestep is the (fractional) k with alphas_cumprod[k] = alpha_bar,
  interpolated in log-SNR; its epsilon (or v_prediction / sample) output becomes our velocity (`velocity_from_vp`).
  t outside its trained range (k in [0, 999], t in about [0.0064, 0.99]) is an error, not a silent clamp.
- the grid (`time_grid`): the pipeline's scheduler's timesteps mapped to our t, then its final alpha_bar (1:
  the data). The sampler starts at t_0 > 0 from m(t_0) x noise (`initial_noise_scale`), which is the pipeline's latents
  = noise in its own space. A DDIM step (eta = 0) re-noises the same (x0_hat, eps_hat) at the next alpha_bar, as
  our Euler step does at the next t: on these grids our sampler IS DDIM.

What is equal, and what is not (tests/test_pixart.py): with guidance=none / cfg our sampler equals the pipeline's
own loop with DDIMScheduler (eta 0, no clipping or thresholding) on the same latents, to float tolerance, where
DDIM's step stride equals the spacing of its timesteps (leading spacing, or trailing with steps dividing 1000);
DDIM on other grids steps to t - 1000 // steps while the next evaluation is at the next listed timestep, which
no one-time sampler reproduces. The pipeline's default DPM-Solver++ (2nd order, multistep) is not Euler: with it,
our sampler takes DDIM (first-order) steps on the same timesteps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from erg.attention import AttentionPlan
from erg.flow import marginal_std, velocity_from_vp, vp_alpha_bar, vp_time
from erg.integrations.adapter import AttentionLayer, DiffusersDenoiser, SeamProcessor, load_pipeline

__all__ = ["PIXART_ENCODERS", "PixArtDenoiser", "SelfAttention", "load_pixart_sigma"]

# C-ERG's name for the pipeline's text encoder (configs/guidance/erg_pixart_sigma.yaml).
PIXART_ENCODERS = {"t5_xxl": "text_encoder"}
PREDICTIONS = ("epsilon", "v_prediction", "sample")


class SelfAttention(SeamProcessor):
    """PixArt's self-attention (a block's attn1) through the seam: diffusers' AttnProcessor2_0 for a
    self-attention without mask, norms or residual (PixArt's), the attention itself by `self.attend`."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError(
                f"PixArt's self-attention (block {self.layer}) takes (B, N, D) image tokens without a mask or "
                "encoder states; this is not PixArt's attn1"
            )
        if attn.spatial_norm is not None or attn.group_norm is not None:
            raise ValueError(f"block {self.layer}'s attention has a spatial / group norm that PixArt's has not")
        B, N, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = k.shape[-1] // attn.heads

        def heads(x: Tensor) -> Tensor:  # (B, N, D) -> (B, heads, N, head_dim)
            return x.view(B, -1, attn.heads, head_dim).transpose(1, 2)

        q, k, v = heads(q), heads(k), heads(v)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = self.attend(q, k, v, image=slice(0, N))  # every token is an image token
        out = out.transpose(1, 2).reshape(B, -1, attn.heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class PixArtDenoiser(DiffusersDenoiser):
    """A PixArtSigmaPipeline as a velocity model of the shared sampler (see the module docstring).

    resolution: image size in pixels (default: the transformer's sample size x the VAE factor, 1024 for
        PixArt-Sigma-XL-2-1024-MS); latents are resolution / 8 pixels with 4 channels.
    max_sequence_length: T5 tokens (the pipeline's default 300).
    clean_caption: the pipeline's caption cleaning (its default; without bs4 / ftfy it warns and skips it).
    decode_batch, offload: adapter.DiffusersDenoiser.
    """

    family = "PixArt-Sigma"
    pipeline_class = "PixArtSigmaPipeline"
    encoders = PIXART_ENCODERS

    def __init__(
        self,
        pipe: Any,
        resolution: int | None = None,
        max_sequence_length: int = 300,
        clean_caption: bool = True,
        decode_batch: int = 4,
        offload: bool = False,
    ):
        config = pipe.transformer.config
        self.latent_multiple = int(config.patch_size)
        resolution = resolution or int(config.sample_size) * int(pipe.vae_scale_factor)
        super().__init__(pipe, resolution=resolution, decode_batch=decode_batch, offload=offload)
        self.max_sequence_length = int(max_sequence_length)
        self.clean_caption = bool(clean_caption)
        scheduler = pipe.scheduler.config
        self.prediction_type = scheduler.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTIONS:
            raise ValueError(
                f"PixArt-Sigma: the scheduler's prediction_type {self.prediction_type!r} is none of {PREDICTIONS}"
            )
        # learned sigma: twice the latent channels, the second half a variance the pipeline drops
        self.learned_sigma = int(config.out_channels) == 2 * int(config.in_channels)
        alphas_cumprod = pipe.scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
        self.alphas_cumprod = alphas_cumprod
        # log-SNR per training timestep, decreasing in k (for the fractional timestep of any t)
        a = alphas_cumprod.clamp(1e-30, 1.0)
        self._log_snr = torch.log(a) - torch.log1p(-a.clamp(max=1 - 1e-16))

    def attention_layers(self) -> list[AttentionLayer]:
        return [
            AttentionLayer(f"transformer_blocks.{i}.attn1.processor", i, SelfAttention(i, self.routing))
            for i in range(len(self.transformer.transformer_blocks))
        ]

    def blocks(self) -> dict[int, nn.Module]:
        """Block i is layer i (skip-layer guidance skips the whole block: self-attention, cross-attention, MLP)."""
        return dict(enumerate(self.transformer.transformer_blocks))

    def grid(self, x: Tensor) -> tuple[int, int]:
        p = self.transformer.config.patch_size
        return (x.shape[-2] // p, x.shape[-1] // p)  # PatchEmbed's tokens, row-major

    def forward(
        self, x: Tensor, t: Tensor, context: Tensor, context_mask: Tensor, plan: AttentionPlan | None = None
    ) -> Tensor:
        """Our velocity at (x_t, t). x: (B, 4, h, w) latents; t: (B,) in [0, 1], 0 = noise; context (B, L, 4096)
        and context_mask (B, L): `encode`'s T5 tokens and their padding mask; plan: rectifiers per block and row."""
        return self.denoise(x, t, plan, context=context, context_mask=context_mask)

    # --- time ------------------------------------------------------------------------------------------
    def timestep(self, t: Tensor) -> Tensor:
        """The model's (fractional) timestep k at our t: alphas_cumprod[k] = alpha_bar(t), linear in log-SNR."""
        a = vp_alpha_bar(t.double()).clamp(1e-30, 1.0)
        log_snr = torch.log(a) - torch.log1p(-a.clamp(max=1 - 1e-16))
        table = self._log_snr.to(log_snr.device)  # decreasing in k
        T = table.numel()
        tol = 1e-4  # float32 rounding of t at the ends of the trained range
        if bool((log_snr > table[0] + tol).any() or (log_snr < table[-1] - tol).any()):
            lo, hi = float(vp_time(self.alphas_cumprod[-1])), float(vp_time(self.alphas_cumprod[0]))
            raise ValueError(
                f"PixArt-Sigma (a DDPM model) was trained on timesteps 0..{T - 1}, our t in [{lo:.4g}, {hi:.4g}]; "
                f"it was asked for t = {t.min().item():.4g}..{t.max().item():.4g}. Sample it on its pipeline's grid: "
                "sampler=pixart_sigma (schedule=pipeline), not a grid from t = 0"
            )
        x = (-log_snr).clamp(-table[0], -table[-1])  # increasing
        i = torch.searchsorted(-table, x.contiguous()).clamp(1, T - 1)
        x0, x1 = -table[i - 1], -table[i]
        return (i - 1).double() + (x - x0) / (x1 - x0)

    def initial_noise_scale(self, t0: float) -> float:
        """The sampler starts from m(t_0) x noise (erg/sampler.py): the pipeline's latents = noise at its first
        timestep, in our space (x_t = m(t) x_s; m(t_0) ~ 0.994 at timestep 999)."""
        return float(marginal_std(t0))

    def time_grid(self, steps: int) -> Tensor:
        """The pipeline's scheduler's timesteps (set on a copy, as its `__call__` sets them) in our t, then the
        alpha_bar after the last step (DDIM's final_alpha_cumprod; 1, the data, for DPM-Solver and DDPM)."""
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(**self.scheduler_kwargs(steps))
        timesteps = scheduler.timesteps.detach().to("cpu")
        if timesteps.numel() != steps:
            raise ValueError(f"PixArt-Sigma: the scheduler set {timesteps.numel()} timesteps for {steps} steps")
        final = float(getattr(scheduler, "final_alpha_cumprod", 1.0))
        alpha_bars = torch.cat([self.alphas_cumprod[timesteps.long()], torch.tensor([final], dtype=torch.float64)])
        return vp_time(alpha_bars)

    def _velocity(self, x: Tensor, t: Tensor, context: Tensor, context_mask: Tensor) -> Tensor:
        dtype = self.transformer.dtype
        m = marginal_std(t).view(-1, 1, 1, 1)
        out = self.transformer(
            hidden_states=(x / m).to(dtype),  # its x_s
            encoder_hidden_states=context.to(dtype),
            encoder_attention_mask=context_mask,
            timestep=self.timestep(t).to(torch.float32),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]
        if self.learned_sigma:
            out = out[:, : x.shape[1]]  # the pipeline's noise_pred.chunk(2, dim=1)[0]
        return velocity_from_vp(x, out.float(), t, self.prediction_type)

    # --- text ------------------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """The pipeline's prompt encoding: {"context": (B, 300, 4096) T5 tokens, "context_mask": (B, 300)}."""
        context, mask, _, _ = self.pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            device=self.execution_device or self.transformer.device,
            clean_caption=self.clean_caption,
            max_sequence_length=self.max_sequence_length,
        )
        return {"context": context, "context_mask": mask}


def load_pixart_sigma(
    path: str,
    resolution: int | None = None,
    dtype: str = "auto",
    max_sequence_length: int = 300,
    clean_caption: bool = True,
    decode_batch: int = 4,
    offload: bool = False,
    download: bool = False,
) -> PixArtDenoiser:
    """PixArt-Sigma from a local diffusers folder (a PixArtSigmaPipeline: transformer/, vae/, text_encoder/ (T5),
    tokenizer/, scheduler/), never the hub unless download=true. dtype: auto (bf16 on GPU, float32 on CPU) |
    bfloat16 | float16 | float32."""
    pipe = load_pipeline(
        PixArtDenoiser.pipeline_class, path, family="PixArt-Sigma", hub_id="PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
        env="PIXART_SIGMA_PATH", dtype=dtype, download=download,
    )  # fmt: skip
    return PixArtDenoiser(pipe, resolution=resolution, max_sequence_length=max_sequence_length,
                          clean_caption=clean_caption, decode_batch=decode_batch, offload=offload)  # fmt: skip
