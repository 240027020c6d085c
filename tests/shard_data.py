"""Tiny datasets on disk for the shard tests: the bundled digits as image files and as shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from data.digits import load_digits_tensors

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digit_images(n: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The first n digits as uint8 (n, size, size) images and their labels."""
    x, y = load_digits_tensors(size)
    images = ((x[:n, 0] + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    return images, y[:n].numpy()


def write_digit_folder(root: Path, n: int = 60, size: int = 16) -> Path:
    """ImageFolder layout: root/<digit>/<index>.png (grey)."""
    images, labels = digit_images(n, size)
    for i, (img, label) in enumerate(zip(images, labels)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(folder / f"{i:04d}.png")
    return root


def write_captioned_digits(root: Path, n: int = 40, size: int = 16) -> Path:
    """image + caption files: i.png with i.txt (a long caption) and i.json (a short one), as
    img2dataset writes them; every fifth image has only the .json."""
    images, labels = digit_images(n, size)
    root.mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels)):
        Image.fromarray(img, mode="L").save(root / f"{i:04d}.png")
        if i % 5:
            (root / f"{i:04d}.txt").write_text(f"a handwritten digit {WORDS[label]}, white on black")
        (root / f"{i:04d}.json").write_text(json.dumps({"short_caption": WORDS[label], "key": f"{i:04d}"}))
    return root
