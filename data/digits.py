"""scikit-learn's handwritten digits as a DataModule: the offline quickstart's real data.

1,797 real 8x8 grey images of the digits 0-9 (UCI, bundled with scikit-learn: no download),
upsampled to a small power-of-two size and scaled to [-1, 1], with a stratified held-out split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from data.base import FlowDataModule

__all__ = ["DigitsDataModule", "TensorImageDataset", "load_digits_tensors"]


def load_digits_tensors(image_size: int = 16, channels: int = 1) -> tuple[Tensor, Tensor]:
    """All digits as (images in [-1, 1] of shape (N, channels, size, size), labels (N,))."""
    from sklearn.datasets import load_digits

    if image_size < 8 or image_size & (image_size - 1):
        raise ValueError(f"data.image_size must be a power of two >= 8, got {image_size}")
    if channels not in (1, 3):
        raise ValueError(f"digits are grey images: data.channels must be 1 or 3, got {channels}")
    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1).mul(2).sub(1)
    if channels == 3:
        x = x.expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(digits.target).long()


class TensorImageDataset(Dataset):
    def __init__(self, images: Tensor, labels: Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.images[i], "y": self.labels[i]}


class DigitsDataModule(FlowDataModule):
    """Handwritten digits, class-conditional (10 classes) or unconditional (num_classes=0)."""

    def __init__(
        self,
        image_size: int = 16,
        channels: int = 1,
        num_classes: int = 10,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        seed: int = 0,
        input_size: int | None = None,
        val_batch_size: int | None = None,
    ):
        if input_size is not None and input_size != image_size:
            raise ValueError(f"digits are pixels: data.input_size ({input_size}) must equal data.image_size")
        if num_classes not in (0, 10):
            raise ValueError(f"digits have 10 classes (or 0 for unconditional), got num_classes={num_classes}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        super().__init__(image_size, channels, num_classes, batch_size, num_workers, seed, val_batch_size)
        self.image_size = image_size
        self.val_fraction = val_fraction

    def split(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Stratified train / held-out split, fixed by `seed`."""
        from sklearn.model_selection import train_test_split

        x, y = load_digits_tensors(self.image_size, self.channels)
        idx_train, idx_val = train_test_split(
            torch.arange(len(y)).numpy(),
            test_size=self.val_fraction,
            random_state=self.seed,
            stratify=y.numpy(),
        )
        idx_train, idx_val = torch.from_numpy(idx_train), torch.from_numpy(idx_val)
        return (x[idx_train], y[idx_train]), (x[idx_val], y[idx_val])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        (xt, yt), (xv, yv) = self.split()
        self.train_set = TensorImageDataset(xt, yt)
        self.val_set = TensorImageDataset(xv, yv)
