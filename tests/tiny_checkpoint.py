"""A tiny class-conditional DiT saved as a checkpoint of this repo (no training, no download)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import randomize

TINY = {
    "_target_": "models.checkpoints.build_dit",
    "arch": None, "depth": 4, "hidden_size": 32, "num_heads": 2, "patch_size": 2,
    "input_size": 8, "in_channels": 1, "num_classes": 3, "learn_sigma": False, "checkpoint": None,
}  # fmt: skip


def fake_checkpoint(path: Path, seed: int = 0) -> Path:
    """Lightning layout: state_dict with ema.* (random) and model.* (zeros: the EMA must win) + the run config."""
    from hydra.utils import instantiate

    model = randomize(instantiate(TINY), std=0.1, seed=seed)
    state = {f"ema.{k}": v for k, v in model.state_dict().items()}
    state.update({f"model.{k}": torch.zeros_like(v) for k, v in model.state_dict().items()})
    torch.save({"state_dict": state, "config": {"model": dict(TINY)}}, path)
    return path


TINY_MMDIT = {
    "_target_": "models.mmdit.build_mmdit",
    "arch": None, "depth": 3, "hidden_size": 32, "num_heads": 2, "patch_size": 2, "input_size": 8,
    "in_channels": 1, "context_dim": 384, "pooled_dim": 384, "checkpoint": None,  # MiniLM's widths
}  # fmt: skip


def fake_mmdit_checkpoint(path: Path, seed: int = 0) -> Path:
    """A text-to-image checkpoint of this repo's layout: a tiny MMDiT for the MiniLM text encoder."""
    from hydra.utils import instantiate

    model = randomize(instantiate(TINY_MMDIT), std=0.1, seed=seed)
    torch.save({"state_dict": {f"ema.{k}": v for k, v in model.state_dict().items()},
                "config": {"model": dict(TINY_MMDIT)}}, path)  # fmt: skip
    return path
