"""Atomic file writes and image files: a file appears complete or not at all."""

from __future__ import annotations

import contextlib
import glob
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch
from PIL import Image
from torch import Tensor

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text", "image_grid", "save_image", "stale_temporaries"]


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """Open `path` for writing so that it appears complete or not at all: the bytes go to a temporary file
    beside it (`.<name>.<random>.tmp`: the same folder, so the same filesystem), which is flushed, fsync'ed
    and renamed over `path` when the block ends. A kill at any byte, a full disk or an exception leaves the
    previous `path` untouched (an exception also removes the temporary file; a SIGKILL cannot, see
    `stale_temporaries`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def stale_temporaries(path: str | Path) -> list[Path]:
    """Temporary files `atomic_open(path)` left behind when its process was killed mid-write."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (the directory entry), where the filesystem supports it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and platforms) cannot fsync a directory
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (`atomic_open`)."""
    with atomic_open(path) as f:
        f.write(data)
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def image_grid(images: Tensor, nrow: int, min_size: int = 0) -> Tensor:
    """(N, C, H, W) floats in [-1, 1] -> one uint8 (H', W', C) grid with 2-pixel gaps, row-major.

    Images smaller than `min_size` are enlarged by an integer factor (nearest) for viewing.
    """
    from torchvision.utils import make_grid

    if min_size and images.shape[-1] < min_size:
        factor = -(-min_size // images.shape[-1])
        images = images.repeat_interleave(factor, dim=-1).repeat_interleave(factor, dim=-2)
    grid = make_grid(images.float().clamp(-1, 1), nrow=nrow, padding=2, normalize=True, value_range=(-1, 1))
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0).cpu()


def label_font(size: int = 13):
    """The font of row labels in image grids: Pillow's bundled one at a size that renders spaces (its
    default size drops them: "Noguidance"); the bitmap default on Pillow < 10.1."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def text_width(font, text: str) -> int:
    return int(font.getlength(text)) if hasattr(font, "getlength") else 6 * len(text)


def save_image(path: str | Path, image: Tensor) -> Path:
    """Save a uint8 (H, W, C) image as PNG, atomically."""
    arr = image.cpu().numpy()
    if arr.shape[-1] == 1:
        arr = arr[..., 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
