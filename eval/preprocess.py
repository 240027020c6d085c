"""Preprocessing protocols: how an image on disk becomes the uint8 image a feature extractor sees.

Evaluators disagree here, and FIDs computed under different protocols are not comparable
(REFERENCE.md, Metrics): EvalGIM (the paper's evaluator) resizes real images to 256 x 256 without a
centre crop; ADM's reference batches are centre-cropped (box-halving + bicubic, `center_crop_arr`).
The protocol's id is therefore part of every cached statistic and of every metrics record, and
`scripts/make_tables.py` refuses to put numbers from different protocols in one table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from data.transforms import center_crop_arr

__all__ = ["PROTOCOL_MODES", "Protocol"]

PROTOCOL_MODES = ("none", "resize", "center_crop")


@dataclass(frozen=True)
class Protocol:
    """mode: `none` (images as stored; they must share one size), `resize` (EvalGIM: resize to
    size x size, no crop, bicubic), `center_crop` (ADM: `center_crop_arr` to size)."""

    mode: str = "none"
    size: int | None = None

    def __post_init__(self):
        if self.mode not in PROTOCOL_MODES:
            raise ValueError(f"protocol.mode must be one of {PROTOCOL_MODES}, got {self.mode!r}")
        if self.mode != "none" and (self.size is None or self.size < 1):
            raise ValueError(f"protocol.mode={self.mode} needs protocol.size (e.g. protocol.size=256)")
        if self.mode == "none" and self.size is not None:
            raise ValueError("protocol.mode=none keeps images as stored: leave protocol.size unset (null)")

    @property
    def id(self) -> str:
        return {"none": "asis", "resize": f"resize{self.size}", "center_crop": f"admcrop{self.size}"}[self.mode]

    def apply_one(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W, C) -> uint8 (S, S, C) under this protocol."""
        if self.mode == "none" or image.shape[0] == image.shape[1] == self.size:
            return image
        channels = image.shape[-1]
        pil = Image.fromarray(image[..., 0] if channels == 1 else image)
        if self.mode == "resize":
            out = np.asarray(pil.resize((self.size, self.size), resample=Image.BICUBIC))
        else:
            out = center_crop_arr(pil, self.size)
        return out[..., None] if out.ndim == 2 else out

    def apply(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, C) -> uint8 (N, S, S, C)."""
        if self.mode == "none" or images.shape[1] == images.shape[2] == self.size:
            return images
        return np.stack([self.apply_one(img) for img in images])
