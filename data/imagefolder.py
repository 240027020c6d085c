"""Users' own images as a DataModule: one sub-folder per class (torchvision's ImageFolder layout).

    root/
      cat/ 001.jpg 002.png ...
      dog/ ...

Images are centre-cropped and resized as ADM/DiT do (`center_crop_arr`), optionally flipped, and
scaled to [-1, 1]. A fixed, seeded fraction is held out for validation. An image that cannot be read
(truncated, corrupt, not an image) is skipped with a warning naming the file and counted, as broken
shards are (`data/skipped_samples` in the logs): the next readable image of the listing takes its
place, so batches keep their size and a resumed run reads what an uninterrupted one reads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from data.base import DataErrorLog, FlowDataModule, collate_dicts
from data.transforms import center_crop_arr, to_model_range
from models.runtime import ConfigError

__all__ = ["UNREADABLE", "ImageFolderDataModule", "count_class_folders", "find_images", "warn_unreadable"]

log = logging.getLogger("erg.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# What PIL raises for a file it cannot read: truncated or corrupt data, or not an image at all
# (UnidentifiedImageError is an OSError; some decoders raise SyntaxError or ValueError).
UNREADABLE = (OSError, SyntaxError, ValueError)
MAX_CONSECUTIVE_UNREADABLE = 100


def warn_unreadable(path: Path, err: BaseException, skipped: int) -> None:
    """The warning for a skipped image file: the file, why, and how many were skipped so far."""
    log.warning("skipped unreadable image %s (%s: %s); %d skipped so far", path, type(err).__name__, err, skipped)


def _check_root(root: str | Path) -> Path:
    path = Path(str(root)).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"image folder not found: {path}. Set data.root to a folder with one sub-folder of images per class."
        )
    return path


def find_images(root: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(image path, class index) pairs and the sorted class names."""
    path = _check_root(root)
    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ConfigError(f"{path} has no class sub-folders: put each class's images in its own folder")
    samples = [
        (f, c)
        for c, name in enumerate(classes)
        for f in sorted((path / name).rglob("*"))
        if f.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not samples:
        raise ConfigError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
    return samples, classes


def count_class_folders(root: str) -> int:
    """Number of class sub-folders of `root` (an OmegaConf resolver: `${class_count:${data.root}}`)."""
    return len(find_images(root)[1])


class ImageFolderDataset(Dataset):
    """Items {"x", "y", "skipped"}: "skipped" counts the unreadable files this copy of the dataset (one
    per DataLoader worker) has skipped so far, for `collate_counted`."""

    def __init__(self, samples: list[tuple[Path, int]], image_size: int, channels: int, random_flip: bool):
        self.samples = samples
        self.image_size = image_size
        self.mode = {1: "L", 3: "RGB"}[channels]
        self.random_flip = random_flip
        self.skipped = 0
        self._warned: set[Path] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        for offset in range(MAX_CONSECUTIVE_UNREADABLE):  # an unreadable file: the next one stands in
            path, label = self.samples[(i + offset) % len(self.samples)]
            try:
                with Image.open(path) as img:
                    arr = center_crop_arr(img.convert(self.mode), self.image_size)
                break
            except UNREADABLE as err:
                self.skipped += 1
                if path not in self._warned:
                    self._warned.add(path)
                    warn_unreadable(path, err, self.skipped)
        else:
            raise RuntimeError(
                f"{MAX_CONSECUTIVE_UNREADABLE} unreadable images in a row (last: {path}): check data.root"
            )
        x = to_model_range(arr)
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"x": x, "y": torch.tensor(label), "skipped": self.skipped}


def collate_counted(items: list[dict[str, Any]]) -> dict[str, Any]:
    """collate_dicts + `data_errors` in the shards' convention (data.base.DataErrorLog): this worker's
    skipped files so far."""
    skipped = max(item.pop("skipped", 0) for item in items)
    batch = collate_dicts(items)
    info = get_worker_info()
    batch["data_errors"] = (f"imagefolder.{info.id if info is not None else 0}", (), skipped)
    return batch


class ImageFolderDataModule(FlowDataModule):
    collate = staticmethod(collate_counted)

    def __init__(
        self,
        root: str,
        image_size: int = 64,
        channels: int = 3,
        num_classes: int | None = None,
        batch_size: int = 64,
        val_fraction: float = 0.01,
        random_flip: bool = True,
        num_workers: int = 4,
        seed: int = 0,
        input_size: int | None = None,
        val_batch_size: int | None = None,
    ):
        if channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 or 3 for images, got {channels}")
        if input_size is not None and input_size != image_size:
            raise ValueError(f"pixel data: data.input_size ({input_size}) must equal data.image_size")
        samples, classes = find_images(root)
        if num_classes is None:
            num_classes = len(classes)
        elif num_classes not in (0, len(classes)):
            raise ValueError(
                f"data.num_classes={num_classes} but {root} has {len(classes)} class folders: set "
                f"data.num_classes={len(classes)} (or 0 for an unconditional model)"
            )
        super().__init__(image_size, channels, num_classes, batch_size, num_workers, seed, val_batch_size)
        self.root = root
        self.image_size = image_size
        self.classes = classes
        self.samples = samples
        self.val_fraction = val_fraction
        self.random_flip = random_flip

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(self.samples), generator=g).tolist()
        n_val = max(1, round(self.val_fraction * len(self.samples))) if self.val_fraction > 0 else 0
        val = [self.samples[i] for i in sorted(perm[:n_val])]
        train = [self.samples[i] for i in sorted(perm[n_val:])]
        self.train_set = ImageFolderDataset(train, self.image_size, self.channels, self.random_flip)
        self.val_set = ImageFolderDataset(val or train[:1], self.image_size, self.channels, random_flip=False)

    def callbacks(self) -> list[Any]:
        return [DataErrorLog()]  # data/skipped_samples: unreadable images
