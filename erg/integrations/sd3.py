"""ERG on Stable Diffusion 3 through diffusers (the paper's appendix E), with the shared sampler.

    model = load_sd3("weights/stable-diffusion-3-medium-diffusers")        # or SD3Denoiser(pipe)
    config = SamplerConfig(steps=28, shift=3.0, schedule="flow_match_euler")  # the pipeline's own grid
    sampler = GuidedSampler(build_guidance(erg_sd3), model, config=config)    # configs/guidance/erg_sd3.yaml
    images = model.decode(sampler.sample_indices(range(4), prompts))          # in [-1, 1]

The SD3 family on the shared layer (erg/integrations/adapter.py); this file holds only what is SD3's:

- conventions: the transformer takes sigma = 1 - t times 1000 and predicts v_diffusers = eps - x = -v;
- attention: `JointAttention` is diffusers' JointAttnProcessor2_0 (projections, qk RMSNorm, [image ; text]
  concatenation, output projections; tested bit for bit) with the attention itself through the seam. Block i's
  joint attention is attention layer i; the image tokens come first, so image-level rectifiers touch the image
  queries only (SD3 normalises q after the projection: the temperature acts on the logits, by scaling the
  normalised q inside the seam). The same processor computes SD3.5-medium's extra image self-attention
  (erg/integrations/sd35.py); a plain SD3 transformer refuses blocks that have one;
- C-ERG: the pipeline's text encoders by name: clip_l (text_encoder), openclip_g (text_encoder_2), t5_xxl
  (text_encoder_3); hooks exist only while the negative prompt is encoded (once per sampling run);
- the unconditional input is the pipeline's: its encoding of the empty prompt (its default negative).

Any guidance config runs on SD3; ERG's branch is the negative row of CFG's pair (two rows per image, one
forward per step), with Table 7's SD3 row in configs/guidance/erg_sd3.yaml. `erg_pipeline_call` runs the
pipeline's own `__call__` (its scheduler, latents, VAE and CFG) with ERG's negative branch instead of the
empty negative prompt, through the same processors and hooks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from erg.attention import AttentionPlan
from erg.flow import from_diffusers_velocity, to_diffusers_sigma
from erg.guidance.base import COND, Condition, Linear
from erg.integrations.adapter import AttentionLayer, DiffusersDenoiser, Routing, SeamProcessor, installed, load_pipeline

__all__ = [
    "SD3_ENCODERS",
    "JointAttention",
    "SD3Denoiser",
    "erg_pipeline_call",
    "joint_attention",
    "load_sd3",
]

# C-ERG's names for the pipeline's text encoders (configs/guidance/erg_sd3.yaml, Table 7's SD3 row).
SD3_ENCODERS = {"clip_l": "text_encoder", "openclip_g": "text_encoder_2", "t5_xxl": "text_encoder_3"}


# --- the attention processor ---------------------------------------------------------------------------
class JointAttention(SeamProcessor):
    """SD3's attention for diffusers' `Attention` module of block `layer`, through our seam.

    With text tokens (encoder_hidden_states): the joint attention over [image ; text]; without (SD3.5's
    extra image self-attention, `attn2`): self-attention over the image tokens. The same computation as
    diffusers' JointAttnProcessor2_0, with the attention itself done by `erg.attention.attention`.
    """

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if attention_mask is not None:
            raise ValueError(f"JointAttention (block {self.layer}) computes SD3's attention, which takes no mask")
        B, N, _ = hidden_states.shape  # N image tokens

        def heads(x: Tensor) -> Tensor:  # (B, T, D) -> (B, heads, T, head_dim)
            return x.view(B, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if encoder_hidden_states is None:  # SD3.5's image self-attention
            out = self.attend(q, k, v, image=slice(0, N))
            out = out.transpose(1, 2).reshape(B, -1, attn.heads * q.shape[-1]).to(q.dtype)
            return attn.to_out[1](attn.to_out[0](out))
        cq = heads(attn.add_q_proj(encoder_hidden_states))
        ck = heads(attn.add_k_proj(encoder_hidden_states))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        L = cq.shape[2]  # text tokens
        q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)  # image first
        out = self.attend(q, k, v, image=slice(0, N), text=slice(N, N + L))  # (B, heads, N + L, head_dim)
        out = out.transpose(1, 2).reshape(B, -1, attn.heads * q.shape[-1]).to(q.dtype)
        image, text = out[:, :N], out[:, N:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        image = attn.to_out[1](attn.to_out[0](image))  # projection, dropout
        return image, text


def sd3_attention_layers(transformer: nn.Module, routing: Routing, dual: bool) -> list[AttentionLayer]:
    """Block i's joint attention (and with `dual`, its extra image self-attention) is attention layer i."""
    blocks = transformer.transformer_blocks
    layers = []
    for i, block in enumerate(blocks):
        layers.append(AttentionLayer(f"transformer_blocks.{i}.attn.processor", i, JointAttention(i, routing)))
        if getattr(block, "attn2", None) is not None:
            if not dual:
                extra = [j for j, b in enumerate(blocks) if getattr(b, "attn2", None) is not None]
                raise ValueError(
                    f"blocks {extra} have SD3.5's extra image self-attention (dual attention): this is an SD3.5 "
                    "transformer; use model=sd35_medium (erg.integrations.sd35)"
                )
            layers.append(AttentionLayer(f"transformer_blocks.{i}.attn2.processor", i, JointAttention(i, routing)))
    return layers


@contextmanager
def joint_attention(transformer: nn.Module) -> Iterator[dict[str, Any]]:
    """Route every block's attention of an SD3Transformer2DModel through `JointAttention` (without a plan:
    plain attention) while active; the previous processors (the same objects) are set back on exit, also when
    the body raises. Yields the processors that were replaced (name -> processor)."""
    layers = sd3_attention_layers(transformer, Routing(), dual=True)
    with installed(transformer, {layer.name: layer.processor for layer in layers}) as before:
        yield before


# --- the model -------------------------------------------------------------------------------------------
class SD3Denoiser(DiffusersDenoiser):
    """A StableDiffusion3Pipeline as a velocity model of the shared sampler (see the module docstring).

    resolution: image size in pixels (default: the transformer's sample size x the VAE factor, 1024 for
        SD3-medium); input_size = resolution / 8 latent pixels, in_channels = 16.
    max_sequence_length: T5 tokens (the pipeline's default 256).
    decode_batch: images decoded per VAE call (1024px decoding is memory-hungry).
    offload: components on the CPU between uses (adapter.DiffusersDenoiser).
    """

    family = "Stable Diffusion 3"
    pipeline_class = "StableDiffusion3Pipeline"
    encoders = SD3_ENCODERS
    dual_attention = False  # SD3.5-medium's extra self-attention: erg/integrations/sd35.py

    def __init__(
        self,
        pipe: Any,
        resolution: int | None = None,
        max_sequence_length: int = 256,
        decode_batch: int = 4,
        offload: bool = False,
    ):
        self.latent_multiple = int(pipe.transformer.config.patch_size)
        super().__init__(pipe, resolution=resolution, decode_batch=decode_batch, offload=offload)
        self.num_train_timesteps = int(pipe.scheduler.config.num_train_timesteps)
        self.max_sequence_length = int(max_sequence_length)

    def attention_layers(self) -> list[AttentionLayer]:
        return sd3_attention_layers(self.transformer, self.routing, dual=self.dual_attention)

    def grid(self, x: Tensor) -> tuple[int, int]:
        p = self.transformer.config.patch_size
        return (x.shape[-2] // p, x.shape[-1] // p)  # PatchEmbed's tokens, row-major

    def forward(
        self, x: Tensor, t: Tensor, context: Tensor, pooled: Tensor, plan: AttentionPlan | None = None
    ) -> Tensor:
        """Our velocity at (x_t, t). x: (B, 16, h, w) latents; t: (B,) in [0, 1], 0 = noise;
        context (B, L, 4096) / pooled (B, 2048): `encode`'s outputs; plan: rectifiers per block and row."""
        return self.denoise(x, t, plan, context=context, pooled=pooled)

    def _velocity(self, x: Tensor, t: Tensor, context: Tensor, pooled: Tensor) -> Tensor:
        dtype = self.transformer.dtype
        timestep = to_diffusers_sigma(t) * self.num_train_timesteps  # diffusers' time: sigma x 1000
        v_diffusers = self.transformer(
            hidden_states=x.to(dtype),
            timestep=timestep,
            encoder_hidden_states=context.to(dtype),
            pooled_projections=pooled.to(dtype),
            return_dict=False,
        )[0]
        return from_diffusers_velocity(v_diffusers)

    def scheduler_kwargs(self, steps: int) -> dict[str, Any]:
        """As the pipeline's `__call__`: the step count, and its resolution-dependent mu where the scheduler
        shifts dynamically (SD3's does not)."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        kwargs: dict[str, Any] = {"num_inference_steps": steps}
        cfg = self.pipe.scheduler.config
        if cfg.get("use_dynamic_shifting", None):
            h, w = self.grid(torch.empty(1, 1, self.input_size, self.input_size, device="meta"))
            kwargs["mu"] = calculate_shift(
                h * w, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16),
            )  # fmt: skip
        return kwargs

    # --- text ------------------------------------------------------------------------------------------
    def _encode(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """The pipeline's prompt encoding: {"context": (B, 77 + 77 -> 154 + T5 tokens, 4096), "pooled": (B, 2048)}."""
        context, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=self.execution_device or self.transformer.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"context": context, "pooled": pooled}


def load_sd3(
    path: str,
    resolution: int | None = 1024,
    dtype: str = "auto",
    text_encoder_3: bool = True,
    max_sequence_length: int = 256,
    decode_batch: int = 4,
    offload: bool = False,
    download: bool = False,
) -> SD3Denoiser:
    """SD3(-medium) from a local diffusers folder (never the hub, unless download=true), as an `SD3Denoiser`.

    dtype: auto (bf16 on GPU, float32 on CPU) | bfloat16 | float16 | float32. text_encoder_3: false
    leaves T5-XXL out (the pipeline then feeds zeros for its tokens, and C-ERG cannot name t5_xxl).
    """
    extra = {} if text_encoder_3 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = load_pipeline(
        SD3Denoiser.pipeline_class, path, family="Stable Diffusion 3", hub_id="stabilityai/stable-diffusion-3-medium-"
        "diffusers", env="SD3_PATH", dtype=dtype, download=download, **extra,
    )  # fmt: skip
    return SD3Denoiser(pipe, resolution=resolution, max_sequence_length=max_sequence_length,
                       decode_batch=decode_batch, offload=offload)  # fmt: skip


# --- the pipeline's own loop -----------------------------------------------------------------------------
def erg_pipeline_call(pipe: Any, prompt: str | list[str], guidance: Any, **kwargs: Any) -> Any:
    """`pipe(prompt, ...)` with a CFG-shaped guidance method's negative branch in place of the empty prompt.

    guidance: a built `erg.guidance.Guidance` with branches "pos" and "neg" combined as
        pos + (w - 1)(pos - neg) (cfg, erg, i_erg, c_erg configs; e.g. build_guidance(erg_sd3 config)).
    kwargs: the pipeline's other arguments (num_inference_steps, generator, latents, height, output_type...).

    The pipeline batches CFG as [negative rows ; positive rows]: the negative prompt embeddings are ERG's
    C-ERG encoding, and a forward pre-hook on the transformer gives the negative rows I-ERG's plan at the
    times t = 1 - sigma > kappa (it checks that those rows carry the negative encoding). Processors and
    the hook are removed when the call returns.
    """
    names = sorted(b.name for b in guidance.branches)
    combine = guidance.combine
    if names != ["neg", "pos"] or not isinstance(combine, Linear) or len(combine.terms) != 1:
        raise ValueError(
            f"erg_pipeline_call runs methods of CFG's shape, pos + (w - 1)(pos - neg) (cfg, erg, i_erg, c_erg); "
            f"{guidance.name} has branches {names}: sample it with SD3Denoiser and the shared sampler instead"
        )
    if any(k in kwargs for k in ("guidance_scale", "negative_prompt", "negative_prompt_embeds", "prompt_embeds")):
        raise ValueError("erg_pipeline_call sets the guidance scale and both prompt encodings itself")
    if kwargs.get("num_images_per_prompt", 1) != 1:
        raise ValueError("erg_pipeline_call samples one image per prompt: repeat a prompt in the list for more")
    scale = combine.terms[0].scale + 1.0
    if scale <= 1.0:
        raise ValueError(f"guidance scale {scale} <= 1: the pipeline then runs no negative branch")
    neg = guidance.branch("neg")
    dual = any(getattr(b, "attn2", None) is not None for b in pipe.transformer.transformer_blocks)
    if dual:  # an SD3.5-medium pipeline
        from erg.integrations.sd35 import SD35Denoiser as denoiser
    else:
        denoiser = SD3Denoiser
    model = denoiser(pipe, max_sequence_length=kwargs.get("max_sequence_length", 256))  # encodes as the pipeline
    conditioning = model.conditioning()
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    pos_inputs = conditioning.encode(prompts, Condition(COND))
    neg_inputs = conditioning.encode(prompts, neg.condition)
    transformer = pipe.transformer
    B = len(prompts)

    def plan_for_step(module: nn.Module, args: tuple, inputs: dict[str, Any]) -> None:
        pooled = inputs["pooled_projections"]
        if pooled.shape[0] != 2 * B or not torch.equal(pooled[:B], neg_inputs["pooled"].to(pooled)):
            raise RuntimeError(
                "the SD3 pipeline did not batch CFG as [negative rows ; positive rows]: ERG cannot tell its branch"
            )
        model.routing.clear()
        perturbation = neg.perturbation
        t = 1.0 - float(inputs["timestep"][0]) / model.num_train_timesteps  # our time: 0 = noise
        if perturbation is None or not perturbation.window.contains(t):
            return  # our processors without a plan: plain attention
        plan = AttentionPlan.single(perturbation.rectifier, perturbation.layers, rows=slice(0, B))
        plan.validate(model.num_attention_layers, 2 * B)
        model.routing.plan, model.routing.grid = plan, model.grid(inputs["hidden_states"])

    with installed(transformer, model.processors):
        hook = transformer.register_forward_pre_hook(plan_for_step, with_kwargs=True)
        try:
            return pipe(
                prompt_embeds=pos_inputs["context"],
                pooled_prompt_embeds=pos_inputs["pooled"],
                negative_prompt_embeds=neg_inputs["context"],
                negative_pooled_prompt_embeds=neg_inputs["pooled"],
                guidance_scale=scale,
                **kwargs,
            )
        finally:
            hook.remove()
            model.routing.clear()
