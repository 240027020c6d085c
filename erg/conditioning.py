"""How a model is conditioned: the user's conditions (class labels, prompts) -> model inputs per branch.

A `Conditioning` turns a batch of conditions into the keyword tensors a model's forward takes
(`model(x, t, plan=..., **inputs)`), for each condition kind a guidance branch can ask for:
"cond" (the user's), "null" (null class / empty prompt) and "c_erg" (ERG's weak condition). The
sampler encodes each kind once per run and concatenates the rows of the branches that share a
forward. `noisable` names the tensors CADS may noise.

- `ClassLabels`: class-conditional models with a label embedding (DiT, SiT). Inputs are the label
  embeddings (`class_embedding`), so CADS can noise them. These models have no text encoder: ERG's
  weak condition ("c_erg") is the null class and C-ERG's temperature has nothing to act on (a no-op,
  warned about once).
- `Unconditional`: no condition at all (every kind is the same, empty input).
- `Prompts`: text-conditioned models. `encode(prompts)` is the model's text encoding (its text
  encoders, issue 6); "c_erg" runs it inside C-ERG's `AttentionTemperature` on the named encoders.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn

from erg.guidance.base import NULL, RECTIFIED, Condition, TextTemperature
from erg.text_attention import AttentionTemperature, EncoderLayout

__all__ = ["ClassLabels", "Conditioning", "Prompts", "Unconditional", "conditioning_for"]


class Conditioning(ABC):
    noisable: tuple[str, ...] = ()

    @abstractmethod
    def encode(self, conditions: Any, condition: Condition) -> dict[str, Tensor]:
        """Model inputs for `conditions` (one per sample) under a branch's `condition` kind."""

    def batch_size(self, conditions: Any) -> int | None:
        return len(conditions) if conditions is not None else None


class Unconditional(Conditioning):
    def encode(self, conditions: Any, condition: Condition) -> dict[str, Tensor]:
        if conditions is not None:
            raise ValueError("this model is unconditional: sample it without classes or prompts")
        return {}


class ClassLabels(Conditioning):
    """Labels (B,) -> {"class_embedding": (B, D)} through the model's label embedding (`y_embedder`)."""

    noisable = ("class_embedding",)

    def __init__(self, model: nn.Module):
        if getattr(model, "y_embedder", None) is None or getattr(model, "null_class", None) is None:
            raise ValueError(f"{type(model).__name__} has no label embedding (y_embedder / null_class)")
        self.model = model
        self._warned = False

    def encode(self, conditions: Any, condition: Condition) -> dict[str, Tensor]:
        if conditions is None:
            raise ValueError("this model is class-conditional: give one class label per sample")
        device = self.model.y_embedder.embedding_table.weight.device
        labels = torch.as_tensor(conditions, dtype=torch.long, device=device)
        num_classes = self.model.num_classes
        if labels.ndim != 1 or (labels.numel() and not (int(labels.min()) >= 0 and int(labels.max()) < num_classes)):
            raise ValueError(f"class labels must be a 1D list of ids in [0, {num_classes}), got {conditions!r}")
        if condition.kind in (NULL, RECTIFIED):
            if condition.text is not None and not self._warned:
                warnings.warn(
                    "C-ERG (guidance.text) has no text encoder to act on in a class-conditional model: "
                    "its weak condition is the null class",
                    stacklevel=2,
                )
                self._warned = True
            labels = torch.full_like(labels, self.model.null_class)
        return {"class_embedding": self.model.y_embedder(labels)}


class Prompts(Conditioning):
    """Text conditioning: prompts -> `encode(prompts)` (a dict of batch-first tensors).

    encoders: the attention-based text encoders by the names C-ERG's config uses (`guidance.text.
    layers`), each a module (with an optional `EncoderLayout` when its architecture is not in
    `erg.text_attention.ENCODER_LAYOUTS`).
    null: the unconditional inputs for n samples (default: `encode` of n empty prompts).
    """

    def __init__(
        self,
        encode: Callable[[list[str]], dict[str, Tensor]],
        encoders: Mapping[str, nn.Module | tuple[nn.Module, EncoderLayout]],
        noisable: Sequence[str] = ("context",),
        null: Callable[[int], dict[str, Tensor]] | None = None,
    ):
        self._encode = encode
        self.encoders = {k: v if isinstance(v, tuple) else (v, None) for k, v in encoders.items()}
        self.noisable = tuple(noisable)
        self._null = null or (lambda n: encode([""] * n))

    def check(self, text: TextTemperature) -> None:
        """C-ERG's encoders and layer ranges against this model's text encoders, before any sampling
        (the hooks are only built, not installed)."""
        for name, layers in text.layers:
            if name not in self.encoders:
                raise ValueError(
                    f"guidance.text.layers names text encoder {name!r}; this model's encoders are "
                    f"{sorted(self.encoders)}: key guidance.text.layers by those names"
                )
            module, layout = self.encoders[name]
            try:
                AttentionTemperature(module, text.tau, layers, layout, name=name)
            except ValueError as err:
                raise ValueError(f"guidance.text.layers.{name}={list(layers)}: {err}") from err

    def encode(self, conditions: Any, condition: Condition) -> dict[str, Tensor]:
        prompts = list(conditions)
        if condition.kind == NULL:
            return self._null(len(prompts))
        if condition.kind != RECTIFIED or condition.text is None:
            return self._encode(prompts)
        with ExitStack() as stack:
            for name, layers in condition.text.layers:
                if name not in self.encoders:
                    raise ValueError(
                        f"guidance.text.layers names text encoder {name!r}; this model's encoders are "
                        f"{sorted(self.encoders)}"
                    )
                module, layout = self.encoders[name]
                stack.enter_context(AttentionTemperature(module, condition.text.tau, layers, layout, name=name))
            return self._encode(prompts)


def conditioning_for(model: nn.Module) -> Conditioning:
    """How to condition `model`: its own `conditioning()` if it has one (text-to-image models with
    their encoders), else class labels (DiT family with classes) or nothing (unconditional)."""
    if callable(getattr(model, "conditioning", None)):
        return model.conditioning()
    if getattr(model, "num_classes", 0):
        return ClassLabels(model)
    return Unconditional()
