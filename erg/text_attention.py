"""C-ERG's mechanism: a reversible temperature on the self-attention logits of a text encoder.

    with AttentionTemperature(t5, tau=0.01, layers=(0, 24)):
        weak_tokens = t5(**tokens).last_hidden_state      # phi_c^tau of eq. (10)
    # hooks are gone here; the encoder is exactly what it was

Third-party encoders (transformers' T5, Llama, CLIP, BERT, ...) do not go through our attention seam,
so the temperature is applied with named, removable forward hooks on the module whose output is
the query *right before* the logits q k^T (the paper's Listing 1 hooks the query projection:
output *= tau). Scaling that q by tau scales the logits by tau. Where an architecture normalises q
after the projection (qk-norm), scaling the projection's output would be undone by the norm, so
the hook goes on the norm's output instead; `ENCODER_LAYOUTS` says which module per architecture.

Two scopes (`scope=`):
- "query" (default, the paper's Listing 1): the hook on the query scales q k^T only. For BERT, Llama,
  CLIP and Qwen3 that is the whole logit. T5's logit is q k^T + a learned relative position bias (no
  1/sqrt(d)): Listing 1 leaves the bias unscaled.
- "logits": tau times the whole logit, T5's relative position bias included. T5 computes the bias in
  block 0 and passes it on to every later block, so for each block in the range a forward pre-hook
  hands its attention tau x the bias (computing it with the module's own `compute_bias` in block 0), and
  a forward hook passes the unscaled bias on: blocks outside the range see exactly the plain bias.
  Needs transformers >= 5 (where T5 adds the padding mask outside the bias). UMT5 (Wan's encoder) computes
  a bias in every block from that block's own relative-attention embedding and passes none on: there a
  forward hook scales that embedding's output (`EncoderLayout.bias_table`) in the blocks of the range.
  On architectures without an additive bias, "logits" is "query".

Ranges are [l_min, l_max) as in the paper's Listing 1 (`range(l_min, l_max)`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

__all__ = ["ENCODER_LAYOUTS", "SCOPES", "AttentionTemperature", "EncoderLayout", "encoder_layout"]

SCOPES = ("query", "logits")


@dataclass(frozen=True)
class EncoderLayout:
    """Where an encoder architecture keeps its self-attention queries.

    blocks: dotted paths (first that exists wins) from the model to the list of transformer blocks.
    query: dotted path inside a block to the module whose output is the query that enters q k^T.
    note: what scaling that output does to the logits (shown in errors and `repr`).
    bias: dotted path inside a block to the attention module that adds a learned bias to the logits,
        passed in (and returned) as its `position_bias` (T5, mT5); None when the logits have none.
    bias_table: dotted path inside a block to the module whose output is that block's own additive bias,
        computed there and passed to no other block (UMT5's `relative_attention_bias` embedding); None else.
    """

    blocks: tuple[str, ...]
    query: str
    note: str
    bias: str | None = None
    bias_table: str | None = None


ENCODER_LAYOUTS: dict[str, EncoderLayout] = {
    "bert": EncoderLayout(
        ("encoder.layer", "layer"),
        "attention.self.query",
        "logits = q k^T / sqrt(d) + mask: scaling the query projection scales the logits by tau",
    ),
    "t5": EncoderLayout(
        ("encoder.block", "block"),
        "layer.0.SelfAttention.q",
        "T5 logits = q k^T + relative position bias, without 1/sqrt(d): scaling the query projection "
        "scales the content term only, exactly as the paper's Listing 1 does (scope='logits' scales the bias too)",
        bias="layer.0.SelfAttention",
    ),
    "llama": EncoderLayout(
        ("model.layers", "layers"),
        "self_attn.q_proj",
        "RoPE is linear in q, so scaling q before RoPE scales the logits by tau; grouped-query attention "
        "shares keys, not queries",
    ),
    "clip_text_model": EncoderLayout(
        ("text_model.encoder.layers", "encoder.layers"),
        "self_attn.q_proj",
        "logits = q k^T / sqrt(d) + causal mask: scaling the query projection scales the logits by tau",
    ),
    "qwen3": EncoderLayout(
        ("model.layers", "layers"),
        "self_attn.q_norm",
        "q is RMS-normalised per head after the projection (qk-norm), which would undo a scaled projection: "
        "the hook scales the normalised q, i.e. the logits",
    ),
}
ENCODER_LAYOUTS["clip"] = ENCODER_LAYOUTS["clip_text_model"]
ENCODER_LAYOUTS["mt5"] = ENCODER_LAYOUTS["t5"]  # mT5's attention is T5's: block 0's bias passed on
ENCODER_LAYOUTS["umt5"] = EncoderLayout(
    ("encoder.block", "block"),
    "layer.0.SelfAttention.q",
    "UMT5 logits = q k^T + a relative position bias of each block's own, without 1/sqrt(d): scaling the query "
    "projection scales the content term only, as the paper's Listing 1 does (scope='logits' scales the bias too)",
    bias_table="layer.0.SelfAttention.relative_attention_bias",
)


def encoder_layout(encoder: nn.Module) -> EncoderLayout:
    """The layout of a transformers model, looked up by its `config.model_type`."""
    model_type = getattr(getattr(encoder, "config", None), "model_type", None)
    if model_type not in ENCODER_LAYOUTS:
        raise ValueError(
            f"no attention layout known for encoder {type(encoder).__name__} (model_type={model_type!r}); "
            f"known: {sorted(ENCODER_LAYOUTS)}. Pass layout=EncoderLayout(blocks=..., query=..., note=...) "
            "naming the module whose output is the query that enters q k^T"
        )
    return ENCODER_LAYOUTS[model_type]


def _get(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def _blocks(encoder: nn.Module, layout: EncoderLayout) -> tuple[str, Sequence[nn.Module]]:
    for path in layout.blocks:
        try:
            return path, _get(encoder, path)
        except (AttributeError, IndexError):
            continue
    raise ValueError(f"{type(encoder).__name__} has none of the block lists {layout.blocks} its layout names")


class AttentionTemperature:
    """Context manager: attention logits of blocks [l_min, l_max) of `encoder` times `tau` while active.

    Hooks are registered on entry and removed on exit (also when the body raises). `hooks` names
    every hooked module while active; `repr` prints them. tau = 1 is an exact no-op (x * 1.0).
    """

    def __init__(
        self,
        encoder: nn.Module,
        tau: float,
        layers: tuple[int, int] | Sequence[int],
        layout: EncoderLayout | None = None,
        name: str = "encoder",
        scope: str = "query",
    ):
        if not tau > 0:
            raise ValueError(f"C-ERG temperature tau_c must be > 0, got {tau}")
        if scope not in SCOPES:
            raise ValueError(f"C-ERG scope of {name} must be one of {SCOPES}, got {scope!r}")
        if len(layers) != 2:
            raise ValueError(f"C-ERG layers of {name} must be [l_min, l_max], got {list(layers)}")
        l_min, l_max = int(layers[0]), int(layers[1])
        self.layout = layout or encoder_layout(encoder)
        self.blocks_path, blocks = _blocks(encoder, self.layout)
        if not 0 <= l_min < l_max <= len(blocks):
            raise ValueError(
                f"C-ERG layers [{l_min}, {l_max}) of {name} are not a range inside its {len(blocks)} blocks "
                f"(need 0 <= l_min < l_max <= {len(blocks)})"
            )
        self.encoder, self.tau, self.layers, self.name = encoder, float(tau), (l_min, l_max), name
        self.scope = scope
        self.targets = {
            f"{self.blocks_path}.{i}.{self.layout.query}": _get(blocks[i], self.layout.query)
            for i in range(l_min, l_max)
        }
        # scope="logits" on a layout with an additive bias (T5): the attention modules whose bias is scaled
        self.bias_targets: dict[str, nn.Module] = {}
        if scope == "logits" and self.layout.bias is not None:
            self.bias_targets = {
                f"{self.blocks_path}.{i}.{self.layout.bias}": _get(blocks[i], self.layout.bias)
                for i in range(l_min, l_max)
            }
            for path, module in self.bias_targets.items():
                compute = getattr(module, "compute_bias", None)
                if compute is None or "past_seen_tokens" not in inspect.signature(compute).parameters:
                    raise ValueError(
                        f"C-ERG scope='logits' on {name} scales T5's relative position bias per block, which needs "
                        f"transformers >= 5 ({path} has no compute_bias(..., past_seen_tokens)); upgrade "
                        "transformers or use scope='query' (the paper's Listing 1)"
                    )
        # scope="logits" where each block computes its own bias (UMT5): the modules whose output is that bias
        self.bias_tables: dict[str, nn.Module] = {}
        if scope == "logits" and self.layout.bias_table is not None:
            self.bias_tables = {
                f"{self.blocks_path}.{i}.{self.layout.bias_table}": _get(blocks[i], self.layout.bias_table)
                for i in range(l_min, l_max)
            }
        self.hooks: dict[str, Any] = {}
        self._unscaled: dict[int, Tensor] = {}

    def _scale(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        return output * self.tau

    def _scale_bias(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """Before a T5 attention: hand it tau x its position bias (computed here in block 0, as it would)."""
        bias = kwargs.get("position_bias")
        if bias is None:
            if kwargs.get("key_value_states") is not None or kwargs.get("cache") is not None:
                raise RuntimeError(f"{self!r}: scope='logits' applies to encoder self-attention only")
            hidden = args[0] if args else kwargs["hidden_states"]
            if not module.has_relative_attention_bias:  # no bias to scale: the module adds zeros
                return args, kwargs
            n = hidden.shape[1]
            bias = module.compute_bias(n, n, device=hidden.device, past_seen_tokens=0)
        self._unscaled[id(module)] = bias
        return args, {**kwargs, "position_bias": bias * self.tau}

    def _restore_bias(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        """After it: pass the unscaled bias on to the next blocks (output = (hidden, position_bias, ...))."""
        bias = self._unscaled.pop(id(module), None)
        if bias is None:
            return output
        return (output[0], bias, *output[2:])

    def __enter__(self) -> AttentionTemperature:
        if self.hooks:
            raise RuntimeError(f"{self!r} is already active")
        for path, module in self.targets.items():
            self.hooks[path] = module.register_forward_hook(self._scale)
        for path, module in self.bias_targets.items():
            self.hooks[f"{path}:position_bias"] = module.register_forward_pre_hook(self._scale_bias, with_kwargs=True)
            self.hooks[f"{path}:restore_bias"] = module.register_forward_hook(self._restore_bias, with_kwargs=True)
        for path, module in self.bias_tables.items():
            self.hooks[path] = module.register_forward_hook(self._scale)
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.hooks.values():
            handle.remove()
        self.hooks.clear()
        self._unscaled.clear()

    def __repr__(self) -> str:
        state = f"active on {list(self.hooks)}" if self.hooks else "inactive"
        l_min, l_max = self.layers
        return (
            f"AttentionTemperature({self.name}, tau={self.tau}, layers=[{l_min}, {l_max}), scope={self.scope}, {state})"
        )
