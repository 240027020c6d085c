"""ERG on Stable Diffusion 3 through diffusers (the paper's appendix E), with the shared sampler.

    model = load_sd3("weights/stable-diffusion-3-medium-diffusers")        # or SD3Denoiser(pipe)
    config = SamplerConfig(steps=28, shift=3.0, schedule="flow_match_euler")  # the pipeline's own grid
    sampler = GuidedSampler(build_guidance(erg_sd3), model, config=config)    # configs/guidance/erg_sd3.yaml
    images = model.decode(sampler.sample_indices(range(4), prompts))          # in [-1, 1]

`SD3Denoiser` makes a `StableDiffusion3Pipeline` a model of the shared sampler (erg/sampler.py), in this
repo's conventions (erg/flow.py): it takes our time t (0 = noise) and returns our velocity x - eps;
diffusers' transformer takes sigma = 1 - t (times 1000) and predicts v_diffusers = eps - x = -v. Any
guidance config then runs on SD3; ERG's branch is the negative row of CFG's pair (two rows per image,
one forward per step), with Table 7's SD3 row in configs/guidance/erg_sd3.yaml.

- I-ERG (and PAG, SEG, SAG): `JointAttention` is an attention processor (diffusers' public processor
  API) computing SD3's joint attention through our seam, `erg.attention.attention`, with the per-row
  plan the sampler passes in the transformer's `joint_attention_kwargs`. Block i is attention layer i;
  the image tokens come first (as diffusers concatenates them), so image-level rectifiers touch the
  image queries only (SD3 normalises q after the projection: the temperature acts on the logits, by
  scaling the normalised q inside the seam). `joint_attention(transformer)` installs the processors and
  restores the previous ones (the same objects) on exit; `SD3Denoiser` installs them only for a forward
  that has a plan, so nothing stays installed after a call and a forward without a plan is diffusers' own.
- C-ERG: `erg.text_attention.AttentionTemperature` on the pipeline's text encoders, by name: clip_l
  (text_encoder), openclip_g (text_encoder_2), t5_xxl (text_encoder_3). Hooks exist only while the
  negative prompt is encoded (the conditioning's "c_erg" encoding: once per sampling run).
- The unconditional input is the pipeline's: its encoding of the empty prompt (its default negative).

`erg_pipeline_call` runs the pipeline's own `__call__` (its scheduler, latents, VAE and CFG) with ERG's
negative branch instead of the empty negative prompt, through the same processors and hooks.

diffusers is imported only where a pipeline is loaded: `erg` keeps importing torch only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from erg.attention import AttentionPlan, Site, attention
from erg.conditioning import Prompts
from erg.flow import from_diffusers_velocity, to_diffusers_sigma
from erg.guidance.base import COND, Condition, Linear

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
class JointAttention:
    """SD3's joint attention for diffusers' `Attention` module of block `layer`, through our seam.

    The same computation as diffusers' JointAttnProcessor2_0 (projections, qk RMSNorm, [image ; text]
    concatenation, attention, output projections; tested bit for bit), with the attention itself done by
    `erg.attention.attention(q, k, v, site, plan)`. `plan` and `grid` (the image tokens' (h, w)) arrive
    as keyword arguments from the transformer's `joint_attention_kwargs`.
    """

    def __init__(self, layer: int):
        self.layer = layer

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        plan: AttentionPlan | None = None,
        grid: tuple[int, int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError(
                f"JointAttention (block {self.layer}) computes SD3's joint attention: it needs the text tokens "
                "(encoder_hidden_states) and takes no attention mask"
            )
        B, N, _ = hidden_states.shape  # N image tokens

        def heads(x: Tensor) -> Tensor:  # (B, T, D) -> (B, heads, T, head_dim)
            return x.view(B, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        cq = heads(attn.add_q_proj(encoder_hidden_states))
        ck = heads(attn.add_k_proj(encoder_hidden_states))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        L = cq.shape[2]  # text tokens
        q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)  # image first
        site = Site(layer=self.layer, image=slice(0, N), text=slice(N, N + L), grid=grid)
        out = attention(q, k, v, site, plan)  # (B, heads, N + L, head_dim)
        out = out.transpose(1, 2).reshape(B, -1, attn.heads * q.shape[-1]).to(q.dtype)
        image, text = out[:, :N], out[:, N:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        image = attn.to_out[1](attn.to_out[0](image))  # projection, dropout
        return image, text


@contextmanager
def joint_attention(transformer: nn.Module) -> Iterator[dict[str, Any]]:
    """Route every block's joint attention of an SD3Transformer2DModel through `JointAttention` while
    active; the previous processors (the same objects) are set back on exit, also when the body raises.
    Yields the processors that were replaced (name -> processor)."""
    blocks = transformer.transformer_blocks
    dual = [i for i, block in enumerate(blocks) if getattr(block, "attn2", None) is not None]
    if dual:
        raise ValueError(
            f"blocks {dual} have SD3.5's extra image self-attention (dual attention), which ERG's SD3 integration "
            "does not route through the seam; use an SD3(-medium) transformer"
        )
    before = transformer.attn_processors
    ours = dict(before)
    for i in range(len(blocks)):
        name = f"transformer_blocks.{i}.attn.processor"
        if name not in ours:
            raise ValueError(f"{type(transformer).__name__} has no attention processor {name!r}")
        ours[name] = JointAttention(i)
    transformer.set_attn_processor(ours)
    try:
        yield before
    finally:
        transformer.set_attn_processor(dict(before))


# --- the model -------------------------------------------------------------------------------------------
class SD3Denoiser(nn.Module):
    """A StableDiffusion3Pipeline as a velocity model of the shared sampler (see the module docstring).

    resolution: image size in pixels (default: the transformer's sample size x the VAE factor, 1024 for
        SD3-medium); input_size = resolution / 8 latent pixels, in_channels = 16.
    max_sequence_length: T5 tokens (the pipeline's default 256).
    decode_batch: images decoded per VAE call (1024px decoding is memory-hungry).
    """

    def __init__(self, pipe: Any, resolution: int | None = None, max_sequence_length: int = 256, decode_batch: int = 4):
        super().__init__()
        self.pipe = pipe  # not a Module: its components are registered below, so .to() moves them all
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.text_encoders = nn.ModuleDict(
            {name: getattr(pipe, attr) for name, attr in SD3_ENCODERS.items() if getattr(pipe, attr) is not None}
        )
        factor = pipe.vae_scale_factor
        self.resolution = int(resolution or pipe.default_sample_size * factor)
        if self.resolution % (factor * self.transformer.config.patch_size):
            raise ValueError(
                f"resolution {self.resolution} is not a multiple of {factor * self.transformer.config.patch_size} "
                "(VAE factor x patch size)"
            )
        self.input_size = self.resolution // factor
        self.in_channels = int(self.transformer.config.in_channels)
        self.num_train_timesteps = int(pipe.scheduler.config.num_train_timesteps)
        self.max_sequence_length = int(max_sequence_length)
        self.decode_batch = int(decode_batch)

    @property
    def num_attention_layers(self) -> int:
        return len(self.transformer.transformer_blocks)

    def forward(
        self, x: Tensor, t: Tensor, context: Tensor, pooled: Tensor, plan: AttentionPlan | None = None
    ) -> Tensor:
        """Our velocity at (x_t, t). x: (B, 16, h, w) latents; t: (B,) in [0, 1], 0 = noise;
        context (B, L, 4096) / pooled (B, 2048): `encode`'s outputs; plan: rectifiers per block and row."""
        routed = nullcontext()
        kwargs = None
        if plan:
            plan.validate(self.num_attention_layers, x.shape[0])
            p = self.transformer.config.patch_size
            kwargs = {"plan": plan, "grid": (x.shape[-2] // p, x.shape[-1] // p)}
            routed = joint_attention(self.transformer)
        dtype = self.transformer.dtype
        timestep = to_diffusers_sigma(t) * self.num_train_timesteps  # diffusers' time: sigma x 1000
        with routed:
            v_diffusers = self.transformer(
                hidden_states=x.to(dtype),
                timestep=timestep,
                encoder_hidden_states=context.to(dtype),
                pooled_projections=pooled.to(dtype),
                joint_attention_kwargs=kwargs,
                return_dict=False,
            )[0]
        return from_diffusers_velocity(v_diffusers)

    # --- text ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """The pipeline's prompt encoding: {"context": (B, 77 + 77 -> 154 + T5 tokens, 4096), "pooled": (B, 2048)}."""
        context, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=next(self.transformer.parameters()).device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"context": context, "pooled": pooled}

    def conditioning(self) -> Prompts:
        """Prompts -> {"context", "pooled"}; null = the empty prompt; C-ERG on clip_l / openclip_g / t5_xxl."""
        return Prompts(self.encode, dict(self.text_encoders.items()), noisable=("context",),
                       null=lambda n: self.encode([""] * n))  # fmt: skip

    # --- images ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents (model space) -> images in [-1, 1], as the pipeline: z / scaling_factor + shift_factor."""
        cfg = self.vae.config
        images = []
        for chunk in latents.split(self.decode_batch):
            z = chunk.to(self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
            images.append(self.vae.decode(z, return_dict=False)[0].float())
        return torch.cat(images)


def load_sd3(
    path: str,
    resolution: int | None = 1024,
    dtype: str = "auto",
    text_encoder_3: bool = True,
    max_sequence_length: int = 256,
    decode_batch: int = 4,
) -> SD3Denoiser:
    """SD3(-medium) from a local diffusers folder (never the hub), as an `SD3Denoiser`.

    dtype: auto (bf16 on GPU, float32 on CPU) | bfloat16 | float16 | float32. text_encoder_3: false
    leaves T5-XXL out (the pipeline then feeds zeros for its tokens, and C-ERG cannot name t5_xxl).
    """
    folder = Path(str(path)).expanduser()
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"Stable Diffusion 3 weights not found: expected a diffusers pipeline folder (model_index.json, "
            f"transformer/, vae/, text_encoder*/ ...) at {folder}. Download stabilityai/stable-diffusion-3-medium-"
            f"diffusers on a machine with network (`hf download stabilityai/stable-diffusion-3-medium-diffusers "
            f"--local-dir {folder}`; the license must be accepted on its page), copy it here, or set model.path "
            "(or $SD3_PATH)."
        )
    from diffusers import StableDiffusion3Pipeline

    if dtype == "auto":
        torch_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    elif isinstance(getattr(torch, str(dtype), None), torch.dtype):
        torch_dtype = getattr(torch, str(dtype))
    else:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, bfloat16, float16 or float32")
    extra = {} if text_encoder_3 else {"text_encoder_3": None, "tokenizer_3": None}
    try:  # diffusers renamed `torch_dtype` to `dtype` (2026, following transformers)
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401

        extra["dtype"] = torch_dtype
    except ImportError:
        extra["torch_dtype"] = torch_dtype
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    return SD3Denoiser(pipe, resolution=resolution, max_sequence_length=max_sequence_length, decode_batch=decode_batch)


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
    model = SD3Denoiser(pipe, max_sequence_length=kwargs.get("max_sequence_length", 256))  # encodes as the pipeline
    conditioning = model.conditioning()
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    pos_inputs = conditioning.encode(prompts, Condition(COND))
    neg_inputs = conditioning.encode(prompts, neg.condition)
    transformer = pipe.transformer
    B = len(prompts)
    p = transformer.config.patch_size

    def plan_for_step(module: nn.Module, args: tuple, inputs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        pooled = inputs["pooled_projections"]
        if pooled.shape[0] != 2 * B or not torch.equal(pooled[:B], neg_inputs["pooled"].to(pooled)):
            raise RuntimeError(
                "the SD3 pipeline did not batch CFG as [negative rows ; positive rows]: ERG cannot tell its branch"
            )
        perturbation = neg.perturbation
        t = 1.0 - float(inputs["timestep"][0]) / model.num_train_timesteps  # our time: 0 = noise
        if perturbation is None or not perturbation.window.contains(t):
            return args, inputs
        h, w = inputs["hidden_states"].shape[-2:]
        plan = AttentionPlan.single(perturbation.rectifier, perturbation.layers, rows=slice(0, B))
        plan.validate(len(transformer.transformer_blocks), 2 * B)
        extra = dict(inputs.get("joint_attention_kwargs") or {})
        inputs = {**inputs, "joint_attention_kwargs": {**extra, "plan": plan, "grid": (h // p, w // p)}}
        return args, inputs

    with joint_attention(transformer):
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
