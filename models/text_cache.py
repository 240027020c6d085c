"""The text-encoder stack of a run that reads cached embeddings (`data.text_embeddings`): no encoder
weight is loaded or run.

`CachedTextConditioner` is a `TextStack` (the same dropout, null input, padding and layout code as
the live `TextConditioner`) whose sizes and null encodings come from the cache folder
(data/text_embeddings.py), after checking that the run's text_encoder config names the encoders the
cache was written with. Training feeds it the batches' cached encodings (`condition`); the sample
grids get the prompts the writer stored (`--prompt`, e.g. samples.prompts). The run's text_encoder
config is still saved in its checkpoints, so sample.py builds the real encoders (and C-ERG) from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from data.text_embeddings import MANIFEST, NULLS, check_identity, read_manifest
from models.runtime import ConfigError
from models.text_encoders import TextCondition, TextEncoding, TextStack

__all__ = ["CachedTextConditioner"]


class CachedTextConditioner(TextStack):
    """Args:
    folder: the cache folder (text_embeddings.json + null_encodings.pt next to the shards).
    config: the run's text_encoder config (resolved); its stack settings (drop_prob, layout,
        pooled_from, declared widths) apply as for the live stack.
    """

    def __init__(self, folder: str | Path, config: Mapping[str, Any]):
        folder = Path(folder)
        manifest = read_manifest(folder)
        check_identity(manifest, config, folder)
        sizes = {n: (e["hidden_size"], e["pooled_size"], e["max_length"]) for n, e in manifest["encoders"].items()}
        super().__init__(
            sizes,
            drop_prob=config.get("drop_prob", math.sqrt(0.1)),
            null_input=config.get("null_input", "empty_prompt"),
            layout=config.get("layout", "separate"),
            pooled_from=config.get("pooled_from"),
            context_dim=config.get("context_dim"),
            pooled_dim=config.get("pooled_dim"),
            padding=config.get("padding", "encoder"),
        )
        self.folder = folder
        self.encoders: dict[str, Any] = {}  # no weights: nothing for C-ERG to rectify during training
        stored = torch.load(folder / NULLS, map_location="cpu", weights_only=True)
        for name in self.names:
            self.set_null(name, TextEncoding(**stored["null"][name]))
        self.prompts = list(stored.get("prompts", []))
        for name in self.names:
            for key, value in stored.get("prompt_encodings", {}).get(name, {}).items():
                self.register_buffer(f"_prompt_{key}_{name}", value, persistent=False)

    def forward(
        self, prompts: Sequence[str], drop: Mapping[str, Tensor] | None = None, use_cache: bool = False
    ) -> TextCondition:
        """The stored encodings of the prompts the writer was given (`--prompt`, and always "")."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, got a single string")
        unknown = [p for p in prompts if p not in self.prompts]
        if unknown:
            raise ConfigError(
                f"prompt(s) {unknown[:3]} are not in the cached text embeddings ({self.folder / MANIFEST}): this "
                "run reads cached encodings and loads no text encoder. Store them with "
                "scripts/precompute_text_embeddings.py --prompt ... (e.g. the run's samples.prompts), or turn the "
                "sample grids off (samples.every_n_steps=0)"
            )
        parts = {}
        for name in self.names:
            table = [getattr(self, f"_prompt_{k}_{name}") for k in ("tokens", "mask", "pooled")]
            index = torch.tensor([self.prompts.index(p) for p in prompts], device=table[0].device)
            parts[name] = TextEncoding(*(t[index] for t in table))
        return self.condition(parts, drop)
