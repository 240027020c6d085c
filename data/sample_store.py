"""On-disk format of generated samples: shards of consecutive indices, written atomically.

    <root>/
      shards/00000000.npz        arr_0: uint8 (n, H, W, C) (ADM layout), index: int64 (n,)
      shards/00000000.jsonl      one JSON record per sample: {"index", "seed", "label", "prompt", ...}
      shards/00001000/           (format="png") one PNG per sample, 00001000.png, 00001001.png, ...
      shards/00001000.jsonl

Videos (text-to-video models, e.g. Wan) are stored the same way: arr_0 is uint8 (n, F, H, W, C), and in
PNG format each sample is a folder of its frames, shards/00001000/00001000/0000.png, 0001.png, ...

Shard k holds the sample indices [k * shard_size, (k + 1) * shard_size) (the last one may be
shorter). The records file is written first and the images last, each atomically, so a shard whose
images exist is complete: a rerun skips it, an interrupted shard is simply redone. Ranks of a
multi-GPU / multi-node job take disjoint shards (`shards_for_rank`): no duplicate, no gap.

`iter_batches` streams (images, records) in index order without loading everything, and
`export_adm_npz` writes the single `.npz` (`arr_0`, uint8 NHWC) that ADM-style evaluators read,
streaming through a memory-mapped file.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from models.io import atomic_write_bytes, atomic_write_text

__all__ = ["SampleStore", "shards_for_rank"]


def shards_for_rank(num_shards: int, rank: int, world_size: int) -> list[int]:
    """Shards handled by `rank`: strided, so every shard belongs to exactly one rank."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    return list(range(rank, num_shards, world_size))


def _save_png(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


def _load_png(path: Path) -> np.ndarray:
    arr = np.array(Image.open(path))
    return arr[..., None] if arr.ndim == 2 else arr


class SampleStore:
    def __init__(self, root: str | Path, num_samples: int, shard_size: int = 1000, image_format: str = "npz"):
        if num_samples < 1 or shard_size < 1:
            raise ValueError(f"num_samples and shard_size must be >= 1, got {num_samples}, {shard_size}")
        if image_format not in ("npz", "png"):
            raise ValueError(f"image format must be 'npz' or 'png', got {image_format!r}")
        self.root = Path(root)
        self.num_samples = num_samples
        self.shard_size = shard_size
        self.image_format = image_format
        self.shard_dir = self.root / "shards"

    @classmethod
    def open(cls, root: str | Path) -> SampleStore:
        """Open an existing store for reading (its layout is read from `store.json`)."""
        meta_path = Path(root) / "store.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{root} is not a sample folder written by sample.py (no store.json)")
        meta = json.loads(meta_path.read_text())
        return cls(root, meta["num_samples"], meta["shard_size"], meta["image_format"])

    # --- layout ----------------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_indices(self, shard: int) -> range:
        start = shard * self.shard_size
        return range(start, min(start + self.shard_size, self.num_samples))

    def _stem(self, shard: int) -> str:
        return f"{shard * self.shard_size:08d}"

    def _images_path(self, shard: int) -> Path:
        suffix = ".npz" if self.image_format == "npz" else ""
        return self.shard_dir / f"{self._stem(shard)}{suffix}"

    def _records_path(self, shard: int) -> Path:
        return self.shard_dir / f"{self._stem(shard)}.jsonl"

    def is_done(self, shard: int) -> bool:
        return self._images_path(shard).exists() and self._records_path(shard).is_file()

    def missing_shards(self, shards: list[int] | None = None) -> list[int]:
        candidates = range(self.num_shards) if shards is None else shards
        return [s for s in candidates if not self.is_done(s)]

    def write_layout(self) -> None:
        """Record the layout (idempotent; refuses to reinterpret an existing store differently)."""
        meta = {"num_samples": self.num_samples, "shard_size": self.shard_size, "image_format": self.image_format}
        path = self.root / "store.json"
        if path.is_file():
            old = json.loads(path.read_text())
            if old != meta:
                raise ValueError(
                    f"{self.root} already holds samples written with {old}; now asked for {meta}. "
                    "Use another output folder (or the same settings) so existing samples are not mixed."
                )
            return
        atomic_write_text(path, json.dumps(meta, indent=2))

    # --- writing ---------------------------------------------------------------------------------
    def write_shard(self, shard: int, images: np.ndarray, records: list[dict[str, Any]]) -> None:
        """Write shard `shard`: images uint8 (n, H, W, C) (or videos (n, F, H, W, C)) for its indices, with one
        record each."""
        indices = list(self.shard_indices(shard))
        if images.dtype != np.uint8 or images.ndim not in (4, 5) or len(images) != len(indices):
            raise ValueError(
                f"shard {shard} needs uint8 images of shape ({len(indices)}, H, W, C) or videos "
                f"({len(indices)}, F, H, W, C), got {images.dtype} {images.shape}"
            )
        if [r["index"] for r in records] != indices:
            raise ValueError(f"shard {shard} records must carry indices {indices[0]}..{indices[-1]} in order")
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._records_path(shard), "".join(json.dumps(r) + "\n" for r in records))
        if self.image_format == "npz":
            buf = io.BytesIO()
            np.savez(buf, arr_0=images, index=np.asarray(indices, dtype=np.int64))
            atomic_write_bytes(self._images_path(shard), buf.getvalue())
            return
        final = self._images_path(shard)
        tmp = Path(tempfile.mkdtemp(dir=self.shard_dir, prefix=f".{final.name}."))
        try:
            for i, img in zip(indices, images):
                if img.ndim == 3:
                    _save_png(img, tmp / f"{i:08d}.png")
                    continue
                (tmp / f"{i:08d}").mkdir()
                for f, frame in enumerate(img):  # a video: one PNG per frame
                    _save_png(frame, tmp / f"{i:08d}" / f"{f:04d}.png")
            if final.exists():  # a previous, interrupted attempt cannot leave a complete folder behind
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # --- reading ---------------------------------------------------------------------------------
    def read_records(self, shard: int) -> list[dict[str, Any]]:
        with open(self._records_path(shard)) as f:
            return [json.loads(line) for line in f if line.strip()]

    def read_images(self, shard: int) -> np.ndarray:
        path = self._images_path(shard)
        if self.image_format == "npz":
            with np.load(path) as data:
                return data["arr_0"]
        images = []
        for i in self.shard_indices(shard):
            if (path / f"{i:08d}.png").is_file():
                images.append(_load_png(path / f"{i:08d}.png"))
            else:  # a video's frames
                images.append(np.stack([_load_png(f) for f in sorted((path / f"{i:08d}").glob("*.png"))]))
        return np.stack(images)

    def iter_batches(self, batch_size: int = 256) -> Iterator[tuple[np.ndarray, list[dict[str, Any]]]]:
        """(uint8 NHWC images, or NFHWC videos, records) in index order over the complete store, shard by shard."""
        missing = self.missing_shards()
        if missing:
            raise FileNotFoundError(
                f"{self.root} is incomplete: {len(missing)} of {self.num_shards} shards missing "
                f"(first: {missing[0]}); rerun sample.py with the same settings to finish it"
            )
        for shard in range(self.num_shards):
            images, records = self.read_images(shard), self.read_records(shard)
            for start in range(0, len(images), batch_size):
                yield images[start : start + batch_size], records[start : start + batch_size]

    def export_adm_npz(self, path: str | Path) -> Path:
        """One ADM-style `.npz` (`arr_0`: uint8 NHWC, all samples in index order), streamed to disk."""
        first = self.read_images(0)
        shape = (self.num_samples, *first.shape[1:])
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmpdir:
            npy = Path(tmpdir) / "arr_0.npy"
            out = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=shape)
            pos = 0
            for images, _ in self.iter_batches(batch_size=self.shard_size):
                out[pos : pos + len(images)] = images
                pos += len(images)
            out.flush()
            del out
            tmp_zip = Path(tmpdir) / "out.npz"
            with zipfile.ZipFile(tmp_zip, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                zf.write(npy, arcname="arr_0.npy")
            os.replace(tmp_zip, path)
        return path
