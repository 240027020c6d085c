"""Image grids of the same seeds across methods: one row per run, one column per sample index (spread
evenly over the samples, so class-ordered samples show one column per class).

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
from models.io import atomic_write_bytes, label_font, text_width

__all__ = ["method_grid", "spread_samples"]


def spread_samples(root: str | Path, num: int) -> tuple[np.ndarray, list[dict]]:
    """`num` samples (uint8 NHWC) spread evenly over a sample folder's indices, with their records: sample.py
    orders samples by class (index i -> classes[i // per_class]), so num = the number of classes gives one
    column per class."""
    store = SampleStore.open(root)
    n = store.num_samples
    wanted = sorted({(j * n) // min(num, n) for j in range(min(num, n))})
    images, records = [], []
    for shard in sorted({i // store.shard_size for i in wanted}):
        start = shard * store.shard_size
        rows = [i - start for i in wanted if i // store.shard_size == shard]
        shard_images, shard_records = store.read_images(shard), store.read_records(shard)
        images.append(shard_images[rows])
        records += [shard_records[r] for r in rows]
    return np.concatenate(images), records


def _pairing(records: list[dict]) -> list[tuple]:
    return [(r.get("index"), r.get("seed"), r.get("label"), r.get("prompt")) for r in records]


def method_grid(rows: list[tuple[str, str | Path]], path: str | Path, num: int = 8, min_size: int = 64) -> Path:
    """rows: [(label, sample folder)] -> PNG grid; images enlarged (nearest) to at least `min_size` px."""
    if not rows:
        raise ValueError("no runs to show")
    loaded = [(label, *spread_samples(folder, num)) for label, folder in rows]
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
    font = label_font()
    label_w = 12 + max(text_width(font, label) for label, _, _ in loaded)
    canvas = Image.new("RGB", (label_w + n * (cell_w + gap), len(loaded) * (cell_h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images, _) in enumerate(loaded):
        y = r * (cell_h + gap)
        draw.text((4, y + cell_h // 2 - 8), label, fill="black", font=font)
        for j, img in enumerate(images):
            tile = Image.fromarray(img[..., 0] if c == 1 else img).convert("RGB")
            canvas.paste(tile.resize((cell_w, cell_h), Image.NEAREST), (label_w + j * (cell_w + gap), y))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
