"""Atomic file writes and image files: a file appears complete or not at all."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

__all__ = ["atomic_write_bytes", "atomic_write_text", "image_grid", "save_image"]


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
