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
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.dit import DiT, dit_preset

__all__ = ["build_dit", "load_into", "read_checkpoint", "read_state_dict"]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file safely (no pickled code). Raises a clear error for a missing file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path} (check model.checkpoint / ckpt paths)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # DiT/SiT training checkpoints store their argparse options next to the weights.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pragma: no cover - depends on the file
            raise RuntimeError(
                f"could not read {path} as a weights-only checkpoint ({err}). Convert it to a plain "
                "state dict or a .safetensors file."
            ) from err


def _strip(prefix: str, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def read_state_dict(path: str | Path, prefer_ema: bool = True) -> dict[str, Tensor]:
    """The model state dict stored in `path`, in the DiT/SiT key layout."""
    ckpt = read_checkpoint(path)
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


def load_into(model: nn.Module, path: str | Path, prefer_ema: bool = True, describe: str = "") -> nn.Module:
    """Load the weights of `path` into `model` with strict=True, explaining a mismatch."""
    sd = read_state_dict(path, prefer_ema=prefer_ema)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise RuntimeError(
            f"checkpoint {path} does not fit the configured model {describe}. Check the model config "
            f"(architecture, input size, channels, num_classes, learn_sigma) against the checkpoint.\n{err}"
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
        load_into(model, checkpoint, prefer_ema=prefer_ema, describe=f"{arch or 'DiT'} {params}")
    return model


build_dit.forwards_to = DiT  # config checks: build_dit's **kwargs are DiT's arguments
