"""Read model weights from the checkpoint formats users have, and build models from configs.

Formats recognised by `read_state_dict`:
- a bare state dict (the released DiT / SiT files, e.g. `SiT-XL-2-256x256.pt`), `.pt` or `.safetensors`;
- a DiT/SiT training checkpoint `{"model": ..., "ema": ..., "opt": ..., "args": ...}`;
- a checkpoint of this repo (Lightning: `state_dict` with `model.*` and `ema.*` entries).
EMA weights are preferred where present (they are what sampling and evaluation use).
Everything is read with `torch.load(weights_only=True)`: no code from a checkpoint is executed.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.dit import DiT, dit_preset
from models.runtime import ConfigError

__all__ = ["build_dit", "describe_mismatch", "load_into", "read_checkpoint", "read_state_dict", "state_dict_sizes"]


def read_checkpoint(path: str | Path, what: str = "checkpoint", mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint file safely (no pickled code). `what` is the config key or option that named
    the file: every error says which setting to fix (a missing file, a file that is not a checkpoint,
    a pickle refused because it holds Python objects). mmap: map the tensors instead of reading them
    (a resume only needs the step and config of a checkpoint that may hold tens of GB)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what}={path}: checkpoint file not found (check the path)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise ConfigError(f"{what}={path} is not a readable .safetensors file ({_first_line(err)}): "
                              "a truncated copy? Copy it again or name another file") from err  # fmt: skip
    # DiT/SiT training checkpoints store their argparse options next to the weights.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:
            refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
            if refused:  # a pickle of Python objects (not garbage: that fails otherwise)
                name = refused.group(1)
                raise ConfigError(
                    f"{what}={path} was refused: it pickles {name}, and unpickling it would run code from the "
                    "file; checkpoints are read as weights only (tensors, numbers, strings). Re-save its weights "
                    "where it was made, as a plain state dict (torch.save(model.state_dict(), ...)) or as "
                    ".safetensors"
                ) from err
            raise _unreadable(path, what, err) from err
        except Exception as err:
            raise _unreadable(path, what, err) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _unreadable(path: Path, what: str, err: BaseException) -> ConfigError:
    return ConfigError(
        f"{what}={path} is not a readable checkpoint ({_first_line(err)}): a truncated or unfinished copy, or "
        "not a PyTorch / .safetensors file. Copy it again or name another checkpoint"
    )


def _strip(prefix: str, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def read_state_dict(path: str | Path, prefer_ema: bool = True, what: str = "checkpoint") -> dict[str, Tensor]:
    """The model state dict stored in `path`, in the DiT/SiT key layout."""
    ckpt = read_checkpoint(path, what)
    if "state_dict" in ckpt and isinstance(ckpt["state_dict"], dict):  # this repo (Lightning)
        sd = ckpt["state_dict"]
        order = ("ema.", "model.") if prefer_ema else ("model.", "ema.")
        for prefix in order:
            found = _strip(prefix, sd)
            if found:
                return found
        return sd
    if "model" in ckpt and isinstance(ckpt["model"], dict):  # DiT/SiT training checkpoint
        return ckpt["ema"] if prefer_ema and isinstance(ckpt.get("ema"), dict) else ckpt["model"]
    # Bare state dict; strip DDP / torch.compile wrappers if the file was saved from one.
    for wrapper in ("module.", "_orig_mod."):
        if ckpt and all(k.startswith(wrapper) for k in ckpt):
            ckpt = _strip(wrapper, ckpt)
    return ckpt


def state_dict_sizes(sd: dict[str, Tensor]) -> dict[str, int]:
    """The config sizes a DiT / MMDiT state dict implies (what a user sets: depth, hidden_size, ...),
    read from the shapes of the layers both families share; keys a family lacks are left out."""
    sizes: dict[str, int] = {}
    blocks = {k.split(".")[1] for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if blocks:
        sizes["depth"] = len(blocks)
    proj = sd.get("x_embedder.proj.weight")
    if proj is not None and proj.ndim == 4:
        sizes["hidden_size"], sizes["in_channels"], sizes["patch_size"] = (int(d) for d in proj.shape[:3])
        pos = sd.get("pos_embed")
        if pos is not None and pos.ndim == 3:
            sizes["input_size"] = round(math.sqrt(pos.shape[1])) * sizes["patch_size"]
        final = sd.get("final_layer.linear.weight")
        if final is not None:
            sizes["out_channels"] = int(final.shape[0]) // sizes["patch_size"] ** 2
    table = sd.get("y_embedder.embedding_table.weight")
    if table is not None:
        sizes["num_classes"] = int(table.shape[0]) - 1  # the last row is the null class
    for key, name in (("context_embedder.weight", "context_dim"), ("y_embedder.mlp.0.weight", "pooled_dim")):
        if key in sd:
            sizes[name] = int(sd[key].shape[1])
    return sizes


def describe_mismatch(model_sd: dict[str, Tensor], ckpt_sd: dict[str, Tensor]) -> str:
    """Which sizes differ between a checkpoint and a model ("depth 2 in the checkpoint vs 4 in the
    model, ..."), or, for another architecture, which weights do not match."""
    ours, theirs = state_dict_sizes(model_sd), state_dict_sizes(ckpt_sd)
    differ = [k for k in ours if k in theirs and theirs[k] != ours[k]]
    sizes = [f"{k} {theirs[k]} in the checkpoint vs {ours[k]} in the model" for k in differ]
    if sizes:
        return "sizes differ: " + ", ".join(sizes)
    shapes = [f"{k} {list(ckpt_sd[k].shape)} in the checkpoint vs {list(v.shape)}" for k, v in model_sd.items()
              if k in ckpt_sd and ckpt_sd[k].shape != v.shape]  # fmt: skip
    missing = [k for k in model_sd if k not in ckpt_sd]
    unexpected = [k for k in ckpt_sd if k not in model_sd]
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} weight(s) of other shapes, e.g. {'; '.join(shapes[:2])}")
    if missing:
        parts.append(f"{len(missing)} weight(s) of the model missing from the checkpoint, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} weight(s) of the checkpoint the model lacks, e.g. {unexpected[0]}")
    return "; ".join(parts) or "the weights do not match"


def load_into(
    model: nn.Module, path: str | Path, prefer_ema: bool = True, describe: str = "", what: str = "checkpoint"
) -> nn.Module:
    """Load the weights of `path` into `model` with strict=True; a mismatch says which sizes differ."""
    sd = read_state_dict(path, prefer_ema=prefer_ema, what=what)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        mismatch = describe_mismatch(model.state_dict(), sd)
        raise ConfigError(
            f"{what}={path} does not fit the configured model {describe}: {mismatch}. Set the model config to the "
            "checkpoint's sizes, or name a checkpoint of this model"
        ) from err
    return model


def build_dit(
    arch: str | None = None,
    checkpoint: str | None = None,
    prefer_ema: bool = True,
    **kwargs: Any,
) -> DiT:
    """Build a DiT from a named preset ('DiT-XL/2', 'SiT-XL/2', ...) plus overrides, then load weights.

    Explicit keyword arguments (depth, hidden_size, ...) override the preset, so a custom size is
    `arch=None, depth=6, hidden_size=192, num_heads=3, patch_size=2`.
    """
    params: dict[str, Any] = dit_preset(arch) if arch else {}
    params.update({k: v for k, v in kwargs.items() if v is not None})
    missing = [k for k in ("depth", "hidden_size", "num_heads", "patch_size") if k not in params]
    if missing:
        raise ValueError(f"model config needs `arch` (e.g. DiT-XL/2) or explicit {missing}")
    model = DiT(**params)
    if checkpoint:
        load_into(model, checkpoint, prefer_ema, arch or "DiT", what="model.checkpoint")
    return model


build_dit.forwards_to = DiT  # config checks: build_dit's **kwargs are DiT's arguments
