"""Image preprocessing shared by the image DataModules (and the webdataset readers)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = ["center_crop_arr", "to_model_range", "to_uint8"]


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop (used by DiT): halve with a box filter while the image is at least twice the
    target, resize the short side to `image_size` with bicubic, then crop the centre square.

    Returns a uint8 array (image_size, image_size, channels).
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def to_model_range(arr: np.ndarray) -> torch.Tensor:
    """uint8 HWC (or HW) -> float CHW in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(arr))
    if x.ndim == 2:
        x = x[:, :, None]
    return x.permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float (..., C, H, W) in [-1, 1] -> uint8 (..., H, W, C), as images are stored on disk."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1)
