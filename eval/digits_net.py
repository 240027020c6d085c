"""A small CNN classifier of the quickstart digits: its penultimate layer is the quickstart's feature space.

Inception-v3 features of 16 x 16 grey digits mean little (and its weights may not be on a laptop), so
the quickstart evaluates in the feature space of a classifier trained on the digits' train split
(`scripts/train_feature_net.py`); the held-out split is never seen, neither by it nor by the
generative model, and is the quickstart's reference set.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.io import atomic_write_bytes

__all__ = ["DigitsFeatureNet", "load_digits_net", "save_digits_net"]


class DigitsFeatureNet(nn.Module):
    """(B, 1, S, S) in [-1, 1] -> logits (B, 10); `features` gives the (B, feature_dim) penultimate layer."""

    def __init__(self, image_size: int = 16, width: int = 32, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.config = {"image_size": image_size, "width": width, "feature_dim": feature_dim, "num_classes": num_classes}
        w = width
        self.conv = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),  # (B, w, S, S)
            nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),  # (B, 2w, S/2, S/2)
            nn.GELU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1),  # (B, 4w, S/4, S/4)
            nn.GELU(),
        )
        self.fc = nn.Linear(4 * w * (image_size // 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return F.gelu(self.fc(self.conv(x).flatten(1)))  # (B, feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def save_digits_net(path: str | Path, net: DigitsFeatureNet, meta: dict[str, Any]) -> Path:
    """Atomically save weights, architecture and training facts (held-out accuracy, split)."""
    buf = io.BytesIO()
    torch.save({"state_dict": net.state_dict(), "config": net.config, "meta": meta}, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_digits_net(path: str | Path) -> tuple[DigitsFeatureNet, dict[str, Any]]:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    net = DigitsFeatureNet(**saved["config"])
    net.load_state_dict(saved["state_dict"])
    return net.eval(), saved.get("meta", {})
