"""Image grids of the same seeds across methods: one row per run, one column per sample index.

Samples are paired across methods (sample i's noise depends only on (seed, i)), so column j shows what
each method makes of the same noise and condition. The records' seeds and labels/prompts are checked:
runs sampled with different seeds or conditions are refused rather than shown side by side.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.sample_store import SampleStore
from models.io import atomic_write_bytes

__all__ = ["first_samples", "method_grid"]


def first_samples(root: str | Path, num: int) -> tuple[np.ndarray, list[dict]]:
    """The first `num` samples (uint8 NHWC) of a sample folder, with their records."""
    store = SampleStore.open(root)
    images, records = [], []
    for shard in range(store.num_shards):
        if sum(map(len, images)) >= num:
            break
        images.append(store.read_images(shard))
        records += store.read_records(shard)
    return np.concatenate(images)[:num], records[:num]


def _pairing(records: list[dict]) -> list[tuple]:
    return [(r.get("index"), r.get("seed"), r.get("label"), r.get("prompt")) for r in records]


def method_grid(rows: list[tuple[str, str | Path]], path: str | Path, num: int = 8, min_size: int = 64) -> Path:
    """rows: [(label, sample folder)] -> PNG grid; images enlarged (nearest) to at least `min_size` px."""
    if not rows:
        raise ValueError("no runs to show")
    loaded = [(label, *first_samples(folder, num)) for label, folder in rows]
    ref_label, ref_images, ref_records = loaded[0]
    for label, images, records in loaded[1:]:
        if images.shape[1:] != ref_images.shape[1:] or len(images) != len(ref_images):
            raise ValueError(f"{label}: samples of shape {images.shape} vs {ref_images.shape} for {ref_label}")
        if _pairing(records) != _pairing(ref_records):
            raise ValueError(
                f"{label} and {ref_label} were not sampled from the same seeds and conditions: a grid across "
                "methods only makes sense for paired samples (same sample.py seed, classes / prompts)"
            )
    n, h, w, c = ref_images.shape
    factor = max(1, -(-min_size // h))
    cell_h, cell_w, gap = h * factor, w * factor, 2
    label_w = 8 + 7 * max(len(label) for label, _, _ in loaded)
    canvas = Image.new("RGB", (label_w + n * (cell_w + gap), len(loaded) * (cell_h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images, _) in enumerate(loaded):
        y = r * (cell_h + gap)
        draw.text((4, y + cell_h // 2 - 6), label, fill="black")
        for j, img in enumerate(images):
            tile = Image.fromarray(img[..., 0] if c == 1 else img).convert("RGB")
            canvas.paste(tile.resize((cell_w, cell_h), Image.NEAREST), (label_w + j * (cell_w + gap), y))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
