"""Where images to evaluate come from, streamed as (uint8 NHWC batch, per-image records).

- a sample folder written by sample.py (`store.json` + shards, data/sample_store.py);
- a folder of PNG / JPG / WEBP images (recursive, sorted by path; decoded in DataLoader workers);
- an ADM-style `.npz` (`arr_0` uint8 NHWC), samples or a reference batch;
- a dataset config (a FlowDataModule such as data=digits, a split of it).

Every source knows its length and a fingerprint (what the reference-statistics cache keys on) and
applies the preprocessing protocol image by image. None of them holds more than one batch of images.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from data.imagefolder import UNREADABLE, warn_unreadable
from data.sample_store import SampleStore
from eval.io import npz_array_info, read_npz_batches
from eval.preprocess import Protocol

__all__ = [
    "DatasetSource",
    "FolderSource",
    "ImageSource",
    "NpzSource",
    "StoreSource",
    "open_source",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
Batch = tuple[np.ndarray, list[dict[str, Any]]]


def _digest(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class ImageSource:
    """Base class. `name` is short and human readable; `fingerprint` changes when the content may have."""

    kind = "images"

    def __init__(self, protocol: Protocol):
        self.protocol = protocol

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def name(self) -> str:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def batches(self, batch_size: int) -> Iterator[Batch]:
        raise NotImplementedError

    def identity(self) -> str:
        """`<kind>-<name>-<fingerprint>`, safe as part of a file name."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.name)[:48]
        return f"{self.kind}-{safe}-{self.fingerprint()}"


class StoreSource(ImageSource):
    kind = "samples"

    def __init__(self, root: str | Path, protocol: Protocol):
        super().__init__(protocol)
        self.store = SampleStore.open(root)

    def __len__(self) -> int:
        return self.store.num_samples

    @property
    def name(self) -> str:
        return self.store.root.resolve().name

    def fingerprint(self) -> str:
        shards = sorted(p for p in self.store.shard_dir.iterdir() if not p.name.startswith("."))
        return _digest(str(self.store.root.resolve()), [(p.name, _stat(p)) for p in shards])

    def batches(self, batch_size: int) -> Iterator[Batch]:
        for images, records in self.store.iter_batches(batch_size):
            if images.ndim != 4:
                raise ValueError(
                    f"{self.store.root} holds videos {tuple(images.shape[1:])} (frames, H, W, C), not images: the "
                    "image metrics (FID, PRDC, CLIPScore) do not apply to them"
                )
            yield self.protocol.apply(images), records


class NpzSource(ImageSource):
    kind = "npz"

    def __init__(self, path: str | Path, protocol: Protocol):
        super().__init__(protocol)
        self.path = Path(path)
        shape, dtype = npz_array_info(self.path)
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3):
            raise ValueError(
                f"{self.path}: arr_0 must hold uint8 images (N, H, W, C) with C in (1, 3) as ADM batches do, "
                f"got {dtype} {shape}"
            )
        self.shape = shape

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def name(self) -> str:
        return self.path.stem

    def fingerprint(self) -> str:
        return _digest(str(self.path.resolve()), _stat(self.path))

    def batches(self, batch_size: int) -> Iterator[Batch]:
        start = 0
        for images in read_npz_batches(self.path, batch_size):
            yield self.protocol.apply(images), [{"index": start + i} for i in range(len(images))]
            start += len(images)


class _ImageFiles(Dataset):
    """Item i: (i, the image as uint8 HWC) or (i, the error) for a file that cannot be read."""

    def __init__(self, files: list[Path], mode: str, protocol: Protocol):
        self.files, self.mode, self.protocol = files, mode, protocol

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | BaseException]:
        try:
            with Image.open(self.files[i]) as img:
                arr = np.array(img.convert(self.mode))
        except UNREADABLE as err:  # skipped and counted by FolderSource.batches
            return i, err
        return i, self.protocol.apply_one(arr[..., None] if arr.ndim == 2 else arr)


def _readable(items: list[tuple[int, np.ndarray | BaseException]]) -> tuple[list[tuple[int, np.ndarray]], list]:
    good = [(i, a) for i, a in items if isinstance(a, np.ndarray)]
    return good, [(i, a) for i, a in items if not isinstance(a, np.ndarray)]


def _stack_uint8(items: list[np.ndarray]) -> np.ndarray:
    shapes = {a.shape for a in items}
    if len(shapes) > 1:
        raise ValueError(
            f"images of different sizes in one folder ({sorted(shapes)[:3]}...): choose a protocol that "
            "brings them to one size, e.g. protocol.mode=resize protocol.size=256 (EvalGIM) or "
            "protocol.mode=center_crop protocol.size=256 (ADM)"
        )
    return np.stack(items)


class FolderSource(ImageSource):
    kind = "folder"

    def __init__(self, root: str | Path, protocol: Protocol, num_workers: int = 0):
        super().__init__(protocol)
        self.root = Path(root)
        self.files = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        self.mode = self._mode()
        self.num_workers = num_workers
        self.skipped: list[Path] = []

    def _mode(self) -> str:
        """Grey or RGB, from the first readable file."""
        for path in self.files:
            try:
                with Image.open(path) as img:
                    return "L" if img.mode in ("L", "1", "I;16", "I") else "RGB"
            except UNREADABLE:
                continue
        raise ValueError(f"none of the {len(self.files)} image files under {self.root} can be read")

    def __len__(self) -> int:
        return len(self.files)

    @property
    def name(self) -> str:
        return self.root.resolve().name

    def fingerprint(self) -> str:
        return _digest(str(self.root.resolve()), [(str(p.relative_to(self.root)), _stat(p)) for p in self.files])

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Images in file order; a file that cannot be read is skipped with a warning naming it and
        counted in `self.skipped` (the evaluation then has that many fewer images)."""
        loader = DataLoader(
            _ImageFiles(self.files, self.mode, self.protocol),
            batch_size=batch_size,
            num_workers=self.num_workers,
            collate_fn=_readable,
        )
        self.skipped = []
        for good, bad in loader:
            for i, err in bad:
                self.skipped.append(self.files[i])
                warn_unreadable(self.files[i], err, len(self.skipped))
            if good:
                yield _stack_uint8([a for _, a in good]), [{"index": i, "path": str(self.files[i])} for i, _ in good]


class DatasetSource(ImageSource):
    """A split of a FlowDataModule (pixel data in [-1, 1]), e.g. the digits' held-out split."""

    kind = "data"

    def __init__(self, dataset: Dataset, name: str, fingerprint: str, protocol: Protocol, num_workers: int = 0):
        super().__init__(protocol)
        self.dataset, self._name, self._fingerprint = dataset, name, fingerprint
        self.num_workers = num_workers

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def name(self) -> str:
        return self._name

    def fingerprint(self) -> str:
        return self._fingerprint

    def batches(self, batch_size: int) -> Iterator[Batch]:
        from data.base import collate_dicts
        from data.transforms import to_uint8

        loader = DataLoader(self.dataset, batch_size=batch_size, num_workers=self.num_workers, collate_fn=collate_dicts)
        start = 0
        for batch in loader:
            images = to_uint8(batch["x"]).numpy()
            labels = batch["y"].tolist() if isinstance(batch.get("y"), torch.Tensor) else [None] * len(images)
            records = [{"index": start + i, "label": labels[i]} for i in range(len(images))]
            yield self.protocol.apply(images), records
            start += len(images)


def open_source(path: str | Path, protocol: Protocol, num_workers: int = 0) -> ImageSource:
    """A sample folder (store.json), an image folder, or an ADM `.npz`, chosen by what `path` is."""
    path = Path(str(path)).expanduser()
    if path.is_file() and path.suffix == ".npz":
        return NpzSource(path, protocol)
    if path.is_dir() and (path / "store.json").is_file():
        return StoreSource(path, protocol)
    if path.is_dir():
        return FolderSource(path, protocol, num_workers)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: give a sample folder written by sample.py, a folder of PNG/JPG images, "
            "or an ADM-style .npz (arr_0: uint8 NHWC)"
        )
    raise ValueError(f"{path} is neither a folder nor an .npz file")
