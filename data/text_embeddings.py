"""Text-encoder embeddings cached in shards: THE on-disk format (written by
scripts/precompute_text_embeddings.py, read by the shard DataModule), and the text stack of a run
that trains on them (`CachedTextConditioner`: no encoder weight is loaded or run).

A folder of cached shards holds, next to the shards:
    text_embeddings.json   the manifest: the encoders (config identity, sizes, compute dtype), the stack's
                           padding and null input, the caption sources, the storage dtype
    null_encodings.pt      {"null": {encoder: {"tokens" (1, L, d), "mask" (1, L), "pooled" (1, p)}},
                            "prompts": [...], "prompt_encodings": {encoder: {same, (n, ...)}}} in float32:
                           the empty prompt of each encoder (so training never loads an encoder for it)
                           and the encodings of extra prompts (the sample grids' samples.prompts)

Each sample keeps all its original members and gains, per caption source s (`txt`, `json-<field>`)
present in it and per encoder e:
    te.json                {"sources": [s, ...], "length": {e: {s: number of real tokens}}}
    te.<e>.<s>.tokens.npy  (n, d): n = the real tokens (mask) when the stack zeroes padding
                           (text_encoder.padding=zeros), else all L positions (the encoder's outputs at
                           padding positions are fed to the MMDiT and cannot be recomputed)
    te.<e>.<s>.pooled.npy  (p,)
The mask is a prefix (tokenizers pad on the right; the writer checks it): mask = [True] * length.

Storage dtype (`--dtype`), .npy holds it as:
    bfloat16  int16 view of the bf16 bits (numpy has no bf16): the default. On GPU the encoders run in
              bf16 (dtype=auto), so this is bit-for-bit what training would compute on the fly, at half
              of float32's size; float16 would be exact for bf16 values only inside its range
              (|x| < 65504, and full precision only above 6.1e-5).
    float16   for float32 encoders (CPU): relative rounding 2^-11 instead of bf16's 2^-8.
    float32   exact for float32 encoders (tests, small runs).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from data.shards import DataConfigError
from models.runtime import ConfigError
from models.text_encoders import TextCondition, TextEncoding, TextStack

__all__ = [
    "MANIFEST",
    "NULLS",
    "STORAGE_DTYPES",
    "CachedTextConditioner",
    "check_identity",
    "decode_sample",
    "encode_sample",
    "encoder_identity",
    "read_manifest",
    "resolve_folder",
    "source_tag",
]

MANIFEST = "text_embeddings.json"
NULLS = "null_encodings.pt"
STORAGE_DTYPES = ("bfloat16", "float16", "float32")
INDEX_MEMBER = "te.json"
# Encoder config keys that do not change the numbers (where the weights are read from, the device).
_NOT_IDENTITY = ("device", "path", "tokenizer_path", "dtype")


def source_tag(member: str, field: str | None) -> str:
    """("txt", None) -> "txt"; ("json", "long_caption") -> "json-long_caption" (a tar member name part)."""
    if field is None:
        return member
    if "." in field:
        raise DataConfigError(f"caption field {field!r}: cached text embeddings need field names without dots")
    return f"{member}-{field}"


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return x.detach().to(torch.bfloat16).cpu().view(torch.int16).numpy()
    return x.detach().to(getattr(torch, dtype)).cpu().numpy()


def _from_storage(data: bytes, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
    return (t.view(torch.bfloat16) if dtype == "bfloat16" else t).float()


def encode_sample(rows: Mapping[str, Mapping[str, Any]], dtype: str, valid_only: bool) -> dict[str, bytes]:
    """One sample's members. rows: source tag -> encoder -> TextEncoding of that caption, one row
    (tokens (L, d), mask (L,), pooled (p,))."""
    members: dict[str, bytes] = {}
    lengths: dict[str, dict[str, int]] = {}
    for tag, encodings in rows.items():
        for name, enc in encodings.items():
            mask = enc.mask.bool().cpu()
            n = int(mask.sum())
            if not bool(mask[:n].all()):
                raise ValueError(f"encoder {name}: padding is not on the right (mask {mask.int().tolist()})")
            tokens = enc.tokens[:n] if valid_only else enc.tokens
            members[f"te.{name}.{tag}.tokens.npy"] = _npy(_to_storage(tokens, dtype))
            members[f"te.{name}.{tag}.pooled.npy"] = _npy(_to_storage(enc.pooled, dtype))
            lengths.setdefault(name, {})[tag] = n
    members[INDEX_MEMBER] = json.dumps({"sources": list(rows), "length": lengths}).encode()
    return members


def decode_sample(sample: Mapping[str, Any], tag: str, manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The cached encodings of caption source `tag` of a sample, as the encoders give them on the fly:
    encoder -> {"tokens": float32 (L, d) (zeros past the stored tokens), "mask": bool (L,), "pooled": (p,)}."""
    if INDEX_MEMBER not in sample:
        raise DataConfigError(
            f"sample {sample.get('__key__')} of {sample.get('__url__')} has no cached text embeddings (te.json): "
            "data.text_embeddings reads shards written by scripts/precompute_text_embeddings.py; point data.shards "
            "(and data.val_shards) at its output, or drop data.text_embeddings to run the encoders on the fly"
        )
    index = json.loads(sample[INDEX_MEMBER])
    out = {}
    for name, info in manifest["encoders"].items():
        L, d = info["max_length"], info["hidden_size"]
        n = index["length"][name][tag]
        stored = _from_storage(sample[f"te.{name}.{tag}.tokens.npy"], manifest["dtype"])
        tokens = torch.zeros(L, d)
        tokens[: stored.shape[0]] = stored
        mask = torch.zeros(L, dtype=torch.bool)
        mask[:n] = True
        pooled = _from_storage(sample[f"te.{name}.{tag}.pooled.npy"], manifest["dtype"])
        out[name] = {"tokens": tokens, "mask": mask, "pooled": pooled}
    return out


def resolve_folder(text_embeddings: str | bool | None, shards: Any) -> Path | None:
    """data.text_embeddings -> the folder holding the manifest: a path, or true = the (one) folder of
    the local shards in data.shards; None / false = the encoders run on the fly."""
    if text_embeddings is None or text_embeddings is False:
        return None
    if text_embeddings is True or str(text_embeddings).lower() == "true":
        from data.shards import expand_urls

        folders = sorted({str(Path(u).parent) for u in expand_urls(shards) if "://" not in u and "pipe:" not in u})
        if len(folders) != 1:
            raise DataConfigError(
                f"data.text_embeddings=true takes the manifest from the shards' folder, but data.shards spans "
                f"{len(folders)} local folders ({folders[:3]}): set data.text_embeddings=<the folder holding "
                f"{MANIFEST}>"
            )
        return Path(folders[0])
    return Path(str(text_embeddings)).expanduser()


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DataConfigError(
            f"data.text_embeddings: no {MANIFEST} in {folder}. Write the cached shards first "
            "(python scripts/precompute_text_embeddings.py --shards ... --out <folder> text_encoder=<the run's>), "
            "then set data.shards=<folder> and data.text_embeddings=true"
        )
    return json.loads(path.read_text())


def encoder_identity(node: Mapping[str, Any]) -> dict[str, Any]:
    """What of an encoder's config determines its numbers: the class (`_target_`), the weights' folder
    NAME (the same weights may sit at another path on another machine), max length, hidden layer and
    family options (e.g. normalize)."""
    identity = {k: v for k, v in node.items() if k not in _NOT_IDENTITY}
    for key in ("path", "tokenizer_path"):
        if node.get(key):
            identity[f"{key}_name"] = Path(str(node[key])).name
    return identity


def check_identity(manifest: Mapping[str, Any], config: Mapping[str, Any], folder: Path) -> None:
    """The run's text_encoder config must name the encoders the cache was written with, by the same
    identity; the stack's padding and null input change the stored numbers too."""
    fix = (
        f"re-run scripts/precompute_text_embeddings.py with this run's text_encoder config into a new folder, or "
        f"train with the text_encoder config the cache was written with ({folder / MANIFEST})"
    )
    cached, wanted = manifest["encoders"], dict(config.get("encoders") or {})
    if list(cached) != list(wanted):
        missing = [n for n in wanted if n not in cached]
        why = f"missing from the cache: {missing}" if missing else "order differs"
        raise DataConfigError(
            f"the cached text embeddings in {folder} hold encoders {list(cached)}, the run's text_encoder names "
            f"{list(wanted)} ({why}): {fix}"
        )
    problems = []
    for name, node in wanted.items():
        made, now = cached[name]["identity"], encoder_identity(node)
        for key in sorted(set(made) | set(now)):
            if made.get(key) != now.get(key):
                problems.append(f"{name}.{key}: cache {made.get(key)!r} vs config {now.get(key)!r}")
        dtype = node.get("dtype", "auto")
        if dtype not in (None, "auto") and dtype != cached[name]["compute_dtype"]:
            problems.append(f"{name}.dtype: cache computed in {cached[name]['compute_dtype']} vs config {dtype}")
    for key, default in (("padding", "encoder"), ("null_input", "empty_prompt")):
        if manifest[key] != config.get(key, default):
            problems.append(f"text_encoder.{key}: cache {manifest[key]!r} vs config {config.get(key, default)!r}")
    if problems:
        raise DataConfigError(
            f"the cached text embeddings in {folder} were written by another encoder setup ({'; '.join(problems)}): "
            + fix
        )


# --- the stack of a run on cached embeddings ------------------------------------------------------
class CachedTextConditioner(TextStack):
    """The text-encoder stack of a run that reads cached embeddings (`data.text_embeddings`).

    A `TextStack` (the same dropout, null input, padding and layout code as the live `TextConditioner`)
    whose sizes and null encodings come from the cache folder, after checking that the run's
    text_encoder config names the encoders the cache was written with. Training feeds it the batches'
    cached encodings (`condition`); the sample grids get the prompts the writer stored (`--prompt`,
    e.g. samples.prompts). The run's text_encoder config is still saved in its checkpoints, so
    sample.py builds the real encoders (and C-ERG) from it.

    Args:
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
