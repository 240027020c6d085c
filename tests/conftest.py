"""Shared fixtures: Hydra composition of the real configs, tiny models, small runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(min(2, torch.get_num_threads()))

# A DiT small enough for CPU tests, with the digits at 16px.
TINY_MODEL = [
    "model=dit_quickstart",
    "model.depth=2",
    "model.hidden_size=32",
    "model.num_heads=2",
]


def compose(config_name: str = "train", overrides: list[str] | None = None):
    """Compose a config of configs/ the way the entry point does (with `hydra.*` available)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [], return_hydra_config=False)


def small_run_overrides(run_dir: Path, steps: int, extra: list[str] | None = None) -> list[str]:
    return [
        *TINY_MODEL,
        f"run_dir={run_dir}",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=1000000",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "data.batch_size=16",
        "samples.every_n_steps=0",
        "samples.steps=2",
        "samples.per_class=1",
        "optim.lr=1e-3",
        *(extra or []),
    ]


def randomize(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with noise (DiT's zero-initialised adaLN would make outputs trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture
def tiny_dit():
    from models.checkpoints import build_dit

    model = build_dit(depth=3, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=2, num_classes=5)
    return randomize(model).eval()
