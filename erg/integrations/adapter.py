"""One way in for any diffusers transformer: the shared layer every family file of erg/integrations/ builds on.

A diffusers pipeline becomes a model of the shared sampler (erg/sampler.py) through a `DiffusersDenoiser`
subclass, one small file per family (sd3.py, sd35.py, flux.py, pixart.py, wan.py). What is shared lives here:

- the denoiser adapter: our time t (0 = noise) and velocity v = x - eps outside; the family's timestep /
  sigma / sign conventions only inside its `_velocity` (erg/flow.py: sigma = 1 - t, v_diffusers = -v);
- the attention seam inside diffusers: a family's attention processors (`SeamProcessor` subclasses, through
  diffusers' public processor API) compute its attention with `erg.attention.attention(q, k, v, site, plan)`.
  They are built once per adapter and installed ONLY for a forward that has a plan; the previous processors
  (the same objects) are set back right after, also when the forward raises (`installed`). A forward without
  a plan is diffusers' own code. The plan, the image-token grid and the text length of the running forward
  reach the processors through the adapter's `Routing` (not through the transformer's kwargs: not every
  family forwards attention kwargs to its processors);
- C-ERG on the family's text encoders: `conditioning()` hooks them by name (`encoders`) through
  erg/text_attention.py while the weak prompt is encoded (once per sampling run);
- the pipeline's own time grid (`time_grid`: a copy of its scheduler, set as its `__call__` sets it), VAE
  decoding, and loading from a local folder (`load_pipeline`: never the hub unless asked), bf16, and optional
  CPU offload (one component group on the GPU at a time: text encoders, transformer, VAE).

What a family file provides (a `DiffusersDenoiser` subclass):

    family: str                        the name in messages ("Flux.1")
    pipeline_class: str                the diffusers pipeline it wraps ("FluxPipeline"; `load_pipeline` checks it)
    encoders: dict[str, str]           C-ERG's encoder names -> pipeline attributes ({"t5_xxl": "text_encoder_2"})
    def attention_layers(self) -> list[AttentionLayer]
        every attention module that goes through the seam: its processor name in `transformer.attn_processors`,
        its layer index (forward order; several modules may share an index, e.g. SD3.5's two attentions of a
        block) and its processor, built once with `self.routing`;
    def forward(self, x, t, <the family's inputs>, plan=None) -> Tensor
        the sampler's call; one line: `return self.denoise(x, t, plan, context=context, ...)`;
    def _velocity(self, x, t, **inputs) -> Tensor
        one transformer call: x (B, C, h, w) latents in model space, t (B,) our time; returns our velocity;
    def _encode(self, prompts) -> dict[str, Tensor]
        the pipeline's prompt encoding, batch-first tensors named as `forward`'s inputs;
    def grid(self, x) -> tuple[int, ...]
        the image tokens' grid of a latent batch ((h, w) row-major; video: (frames, h, w));
  optional:
    def scheduler_kwargs(self, steps) -> dict     what the pipeline passes to `scheduler.set_timesteps`
    def text_tokens(self, inputs) -> int | None   text tokens of a forward (joint attention over [text ; image]
                                                  that the processor cannot see, e.g. Flux's single blocks)
    def blocks(self) -> dict[int, nn.Module]      layer index -> the transformer block(s) to skip for skip-layer
                                                  guidance (erg.attention.SkipBlock; a list where several models
                                                  take turns, Wan 2.2's experts); default none: the sampler
                                                  then refuses block skips for this family (skip=attention works)
    def decode(self, latents) -> Tensor           default: z / scaling_factor + shift_factor, the VAE
    latent_shape                                  default: (in_channels, input_size, input_size)
    null(n)                                       the unconditional inputs (default: the empty prompt's encoding)
    time_grid(steps)                              default: 1 - the sigmas of the pipeline's flow scheduler
    _groups()                                     the component groups offload moves (default: text, transformer, vae)
    latent_multiple (class attribute)             latent pixels per token side (resolution must be a multiple
                                                  of vae_scale_factor x it)

Inside a processor, `self.attend(q, k, v, image=..., text=...)` runs the seam: q, k, v (batch, heads, tokens,
head_dim) AFTER the family's qk-norm and RoPE (so a temperature scales the logits, never a projection that a
norm would undo), `image` / `text` the token ranges of the concatenated sequence. Without a plan it is exactly
`F.scaled_dot_product_attention(q, k, v)`.

diffusers is imported only where a pipeline is loaded: `erg` keeps importing torch only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from erg.attention import AttentionPlan, Site, SkipBlock, attention, skip_blocks
from erg.conditioning import Prompts
from erg.flow import to_diffusers_sigma

__all__ = [
    "AttentionLayer",
    "DiffusersDenoiser",
    "Routing",
    "SeamProcessor",
    "WeightsNotFound",
    "installed",
    "load_pipeline",
    "resolve_dtype",
    "skipping",
    "to_diffusers_sigma",
]


# --- the seam inside diffusers ---------------------------------------------------------------------------
@dataclass
class Routing:
    """What the seam processors of one adapter read during a planned forward (empty otherwise).

    plan: the per-row rectifiers; grid: the image tokens' grid; text_tokens: the text length of a joint
    sequence [text ; image] where the processor cannot tell it (None: the processor knows it)."""

    plan: AttentionPlan | None = None
    grid: tuple[int, ...] | None = None
    text_tokens: int | None = None

    def clear(self) -> None:
        self.plan, self.grid, self.text_tokens = None, None, None


class SeamProcessor:
    """Base of the family processors: the layer index of its attention module, and the routing it reads."""

    def __init__(self, layer: int, routing: Routing | None = None):
        self.layer = int(layer)
        self.routing = routing if routing is not None else Routing()

    def attend(self, q: Tensor, k: Tensor, v: Tensor, image: slice, text: slice | None = None) -> Tensor:
        """Attention through the seam. q, k, v: (batch, heads, tokens, head_dim), after qk-norm and RoPE."""
        site = Site(layer=self.layer, image=image, grid=self.routing.grid, text=text)
        return attention(q, k, v, site, self.routing.plan)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer})"


@dataclass(frozen=True)
class AttentionLayer:
    """An attention module that goes through the seam: its processor's name in `transformer.attn_processors`
    (e.g. "transformer_blocks.3.attn.processor"), its layer index, and our processor for it."""

    name: str
    layer: int
    processor: SeamProcessor = field(compare=False)


@contextmanager
def installed(transformer: nn.Module, processors: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Set `processors` (name in `transformer.attn_processors` -> processor) on `transformer` while active; every
    previous processor (the same objects) is set back on exit, also when the body raises. Yields the processors
    that were there before. A name the transformer lacks is an error (never a silent no-op).

    Only the named attention modules are touched (their public `set_processor`), not the whole module tree,
    so installing for one forward costs O(layers) Python calls."""
    modules, missing = {}, []
    for name in processors:
        try:
            module = transformer.get_submodule(name.removesuffix(".processor"))
        except AttributeError:
            module = None
        if not name.endswith(".processor") or not callable(getattr(module, "set_processor", None)):
            missing.append(name)
        else:
            modules[name] = module
    if missing:
        names = sorted(transformer.attn_processors)
        raise ValueError(
            f"{type(transformer).__name__} has no attention processor(s) {sorted(missing)[:3]}"
            f"{' ...' if len(missing) > 3 else ''}; its processors are {names[:3]} ..."
        )
    before = {name: module.processor for name, module in modules.items()}
    try:
        for name, processor in processors.items():
            modules[name].set_processor(processor)
        yield before
    finally:
        for name, processor in before.items():
            modules[name].set_processor(processor)


@contextmanager
def skipping(blocks: Mapping[int, nn.Module | Sequence[nn.Module]], plan: AttentionPlan | None) -> Iterator[None]:
    """Skip-layer guidance inside diffusers' blocks: while active, each block whose layer a `SkipBlock` rule of
    `plan` names gives its skipped rows their input back (`erg.attention.skip_blocks`, bit for bit) on every
    stream it returns: a joint block (SD3, Flux) returns (encoder_hidden_states, hidden_states) from keyword
    inputs of the same names, a self + cross-attention block (PixArt, Wan) returns hidden_states, its first
    input. A layer may name several blocks (Wan 2.2's two experts: whichever runs is skipped). Removable
    forward hooks, registered for this forward only; a skipped layer the family has no block for is an error."""
    layers = sorted({i for r in (plan.rules if plan else ()) if isinstance(r.rectifier, SkipBlock) for i in r.layers})
    if not layers:
        yield
        return
    missing = [i for i in layers if i not in blocks]
    if missing:
        raise ValueError(f"skip-layer guidance names layers {missing}, which have no block to skip here")

    def hook(layer: int) -> Any:
        def put_back(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
            if isinstance(output, Tensor):  # one stream: hidden_states in, hidden_states out
                before = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0] if args else None
                if before is None or before.shape != output.shape:
                    raise RuntimeError(f"block {layer} did not take hidden_states of its output's shape")
                return skip_blocks(plan, layer, before, output)
            streams = (kwargs.get("encoder_hidden_states"), kwargs.get("hidden_states"))
            if not isinstance(output, tuple) or len(output) != 2 or streams[1] is None:
                raise RuntimeError(f"block {layer} did not return (encoder_hidden_states, hidden_states) as expected")
            return tuple(out if out is None or before is None else skip_blocks(plan, layer, before, out)
                         for before, out in zip(streams, output))  # fmt: skip

        return put_back

    modules = [(i, m) for i in layers for m in (blocks[i] if isinstance(blocks[i], Sequence) else [blocks[i]])]
    handles = [m.register_forward_hook(hook(i), with_kwargs=True) for i, m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# --- the adapter -----------------------------------------------------------------------------------------
class DiffusersDenoiser(nn.Module):
    """A diffusers pipeline as a velocity model of the shared sampler (see the module docstring).

    resolution: image size in pixels (default: the pipeline's default sample size x the VAE factor); the
        latents are resolution / vae_scale_factor pixels with `in_channels` channels (`latent_shape`).
    decode_batch: images per VAE call.
    offload: keep the components on the CPU and move one group (text encoders, transformer, VAE) to the
        execution device when it is used, the previous group back (diffusers' model offload, without
        accelerate). `.to(device)` then only chooses the execution device.
    """

    family: str = "diffusers"
    pipeline_class: str = ""
    encoders: ClassVar[dict[str, str]] = {}
    latent_multiple: int = 1  # latent pixels per token side (the transformer's patch size; Flux packs 2x2)

    def __init__(self, pipe: Any, resolution: int | None = None, decode_batch: int = 4, offload: bool = False):
        super().__init__()
        self.pipe = pipe  # not a Module: its components are registered below, so .to() moves them all
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.text_encoders = nn.ModuleDict(
            {name: getattr(pipe, attr) for name, attr in self.encoders.items() if getattr(pipe, attr, None) is not None}
        )
        self.vae_scale_factor = int(getattr(pipe, "vae_scale_factor", 8))
        multiple = self.vae_scale_factor * self.latent_multiple
        default = getattr(pipe, "default_sample_size", None)
        self.resolution = int(resolution or default * self.vae_scale_factor)
        if self.resolution % multiple:
            raise ValueError(
                f"{self.family}: resolution {self.resolution} is not a multiple of {multiple} (VAE factor "
                f"{self.vae_scale_factor} x {self.latent_multiple} latent pixels per token); e.g. model.resolution="
                f"{max(multiple, self.resolution // multiple * multiple)}"
            )
        self.input_size = self.resolution // self.vae_scale_factor
        self.decode_batch = int(decode_batch)
        self.routing = Routing()
        self._layers: list[AttentionLayer] = list(self.attention_layers())
        if not self._layers:
            raise ValueError(f"{self.family}: the transformer has no attention layer to route through the seam")
        self.offload = bool(offload)
        self._execution_device = torch.device("cpu")
        self._resident: str | None = None

    # --- what a family provides ------------------------------------------------------------------------
    def attention_layers(self) -> list[AttentionLayer]:
        raise NotImplementedError

    def _velocity(self, x: Tensor, t: Tensor, **inputs: Tensor) -> Tensor:
        raise NotImplementedError

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        raise NotImplementedError

    def grid(self, x: Tensor) -> tuple[int, ...]:
        raise NotImplementedError

    def text_tokens(self, inputs: Mapping[str, Tensor]) -> int | None:
        return None

    def blocks(self) -> dict[int, nn.Module]:
        return {}

    @property
    def supports_block_skip(self) -> bool:
        """Whether skip-layer guidance can skip whole blocks here (the family names its blocks)."""
        return bool(self.blocks())

    def scheduler_kwargs(self, steps: int) -> dict[str, Any]:
        return {"num_inference_steps": steps}

    # --- shape and layers ------------------------------------------------------------------------------
    @property
    def in_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.in_channels, self.input_size, self.input_size)

    @property
    def num_attention_layers(self) -> int:
        return 1 + max(layer.layer for layer in self._layers)

    @property
    def processors(self) -> dict[str, SeamProcessor]:
        """Our processors by name (built once: the same objects at every planned forward)."""
        return {layer.name: layer.processor for layer in self._layers}

    # --- the forward -----------------------------------------------------------------------------------
    def denoise(self, x: Tensor, t: Tensor, plan: AttentionPlan | None, **inputs: Tensor) -> Tensor:
        """Our velocity at (x_t, t); the family's processors are installed only if `plan` rectifies a layer."""
        self._place("transformer")
        device = self.execution_device if self.offload else x.device
        xs, ts = x.to(device), t.to(device)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        if not plan:
            return self._velocity(xs, ts, **inputs).to(x.device)
        plan.validate(self.num_attention_layers, x.shape[0])
        with self.routed(plan, self.grid(x), self.text_tokens(inputs)):
            return self._velocity(xs, ts, **inputs).to(x.device)

    @contextmanager
    def routed(self, plan: AttentionPlan | None, grid: tuple[int, ...] | None, text_tokens: int | None = None):
        """Our processors installed and reading `plan` while active (and the block skips it asks for);
        diffusers' processors back and the skip hooks removed on exit."""
        self.routing.plan, self.routing.grid, self.routing.text_tokens = plan, grid, text_tokens
        try:
            with installed(self.transformer, self.processors), skipping(self.blocks(), plan):
                yield
        finally:
            self.routing.clear()

    # --- text ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """The pipeline's prompt encoding (`_encode`), on the execution device."""
        self._place("text")
        return self._encode(list(prompts))

    def null(self, n: int) -> dict[str, Tensor]:
        """The unconditional inputs: the pipeline's encoding of the empty prompt (its default negative)."""
        return self.encode([""] * n)

    def conditioning(self) -> Prompts:
        """Prompts -> the forward's inputs; null = `null(n)`; C-ERG on the encoders named in `encoders`."""
        return Prompts(self.encode, dict(self.text_encoders.items()), noisable=("context",), null=self.null)

    # --- time ------------------------------------------------------------------------------------------
    def time_grid(self, steps: int) -> Tensor:
        """The steps + 1 times (ours: t = 1 - sigma, float64) that the pipeline's own scheduler samples, set
        on a copy of it as the pipeline's `__call__` sets it (the pipeline's scheduler is left untouched)."""
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(**self.scheduler_kwargs(steps))
        sigmas = scheduler.sigmas.detach().to("cpu", torch.float64)
        if sigmas.numel() != steps + 1:
            raise ValueError(f"{self.family}: the scheduler set {sigmas.numel()} sigmas for {steps} steps")
        return 1.0 - sigmas

    # --- images ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents (model space) -> images in [-1, 1], as the pipeline: z / scaling_factor + shift_factor."""
        self._place("vae")
        cfg = self.vae.config
        images = []
        for chunk in latents.split(self.decode_batch):
            z = chunk.to(self.vae.device, self.vae.dtype) / cfg.scaling_factor + (cfg.get("shift_factor") or 0.0)
            images.append(self.vae.decode(z, return_dict=False)[0].float())
        return torch.cat(images)

    # --- devices ---------------------------------------------------------------------------------------
    @property
    def execution_device(self) -> torch.device | None:
        """Where the components run when offloaded (the sampler keeps its state there); None without offload."""
        return self._execution_device if self.offload else None

    def _groups(self) -> dict[str, list[nn.Module]]:
        return {"text": list(self.text_encoders.values()), "transformer": [self.transformer], "vae": [self.vae]}

    def _place(self, group: str) -> None:
        """With offload: `group` on the execution device, the group used before it back on the CPU."""
        if not self.offload or self._resident == group:
            return
        groups = self._groups()
        if self._resident is not None:
            for module in groups[self._resident]:
                module.to("cpu")
        for module in groups[group]:
            module.to(self._execution_device)
        self._resident = group

    def to(self, *args: Any, **kwargs: Any) -> DiffusersDenoiser:
        """Without offload: `nn.Module.to`. With offload: only sets the execution device (the components move
        there one group at a time when used)."""
        if not self.offload:
            return super().to(*args, **kwargs)
        device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None:
            raise ValueError(f"{self.family}: with offload, set the dtype when loading (model.dtype), not with .to()")
        if device is not None:
            self._execution_device = torch.device(device)
            self._resident = None
            for modules in self._groups().values():
                for module in modules:
                    module.to("cpu")
        return self


# --- loading ---------------------------------------------------------------------------------------------
class WeightsNotFound(FileNotFoundError):
    """A local pipeline folder is missing or incomplete (the message names what is expected and how to get it)."""


def resolve_dtype(dtype: str) -> torch.dtype:
    """auto (bf16 on GPU, float32 on CPU) | bfloat16 | float16 | float32."""
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if isinstance(getattr(torch, str(dtype), None), torch.dtype):
        return getattr(torch, str(dtype))
    raise ValueError(f"unknown dtype {dtype!r}; use auto, bfloat16, float16 or float32")


def _dtype_kwarg(torch_dtype: torch.dtype) -> dict[str, torch.dtype]:
    try:  # diffusers renamed `torch_dtype` to `dtype` (2026, following transformers)
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401

        return {"dtype": torch_dtype}
    except ImportError:
        return {"torch_dtype": torch_dtype}


WEIGHT_COMPONENTS = ("transformer", "vae", "unet", "text_encoder")  # name prefixes: weights in *.safetensors
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "*.model", "vocab.json", "vocab.txt", "tokenizer_config.json")


def check_pipeline_folder(
    folder: Path, pipeline_class: str, family: str, hub_id: str, env: str, overridden: Iterable[str] = ()
) -> dict[str, Any]:
    """The folder's model_index.json, after checking that it is a `pipeline_class` folder whose components
    (transformer*/, vae/, text encoders and their *.safetensors, tokenizer*/ with a tokenizer file, scheduler/)
    are all there; else one clear error. overridden: components the caller passes to `from_pretrained` itself
    (e.g. text_encoder_3=None: T5 left out), not read from the folder, so not checked."""
    how = (
        f"Download {hub_id} on a machine with network (`hf download {hub_id} --local-dir {folder}`; accept its "
        f"license on its page first if it is gated), copy it here, and set model.path (or ${env}); or let "
        "this run download it with model.download=true."
    )
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise WeightsNotFound(
            f"{family} weights not found: expected a diffusers pipeline folder ({pipeline_class}: model_index.json, "
            f"transformer/, vae/, scheduler/, text_encoder*/, tokenizer*/) at {folder}. {how}"
        )
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as err:
        raise WeightsNotFound(f"{index_file} is not readable JSON ({err}); {how}") from None
    if index.get("_class_name") != pipeline_class:
        raise WeightsNotFound(
            f"{folder} holds a {index.get('_class_name')!r} pipeline, but model={family} needs a {pipeline_class} "
            f"folder ({hub_id}); point model.path at the right folder or choose the model config that matches it"
        )
    skip = set(overridden)
    missing = []
    for name, spec in index.items():
        if name.startswith("_") or name in skip or not isinstance(spec, list) or spec[0] is None:
            continue  # metadata, a component the caller provides (or leaves out), or one saved without
        sub = folder / name
        if not sub.is_dir():
            missing.append(f"{name}/")
        elif name.startswith(WEIGHT_COMPONENTS) and not any(sub.glob("*.safetensors")):
            missing.append(f"{name}/*.safetensors")
        elif name.startswith("tokenizer") and not any(any(sub.glob(f)) for f in TOKENIZER_FILES):
            missing.append(f"{name}/ tokenizer files ({', '.join(TOKENIZER_FILES)})")
    if missing:
        raise WeightsNotFound(f"{family} folder {folder} is incomplete: missing {', '.join(missing)}. {how}")
    return index


def load_pipeline(
    pipeline_class: str,
    path: str,
    *,
    family: str,
    hub_id: str,
    env: str,
    dtype: str | Mapping[str, str] = "auto",
    download: bool = False,
    **components: Any,
) -> Any:
    """A diffusers pipeline from a local folder in diffusers' layout (never the hub, unless `download`).

    dtype: one for every component (`resolve_dtype`), or per component name with a "default" (e.g. Wan's VAE in
        float32 beside a bf16 transformer: {"default": "auto", "vae": "float32"}).
    download: if the folder is missing, fetch `hub_id` into it first (huggingface_hub.snapshot_download; the
        user asks for it explicitly with model.download=true). components: overrides passed to
        `from_pretrained` (e.g. text_encoder_3=None to leave T5 out).
    """
    folder = Path(str(path)).expanduser()
    if download and not (folder / "model_index.json").is_file():
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id=hub_id, local_dir=str(folder))
    check_pipeline_folder(folder, pipeline_class, family, hub_id, env, overridden=components)
    import diffusers

    cls = getattr(diffusers, pipeline_class)
    if isinstance(dtype, Mapping):  # diffusers takes {component: dtype, "default": dtype}
        torch_dtype: Any = {"default": resolve_dtype("auto"), **{str(k): resolve_dtype(v) for k, v in dtype.items()}}
    else:
        torch_dtype = resolve_dtype(dtype)
    pipe = cls.from_pretrained(str(folder), local_files_only=True, **_dtype_kwarg(torch_dtype), **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe
