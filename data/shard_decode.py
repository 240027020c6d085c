"""Turn one webdataset sample (a dict of raw bytes per member) into what the model trains on.

Conventions read (the members users already have):
    images    .jpg .jpeg .png .webp        ImageNet-style shards, img2dataset output
    latents   .npy (C, h, w) model-space latent; .flip.npy, the latent of the mirrored image
              (scripts/precompute_latents.py --flip)
    labels    .cls (an integer as text)
    captions  .txt, and chosen fields of .json (img2dataset writes its caption there; recaptioned
              data may carry several): one source is drawn at random per sample, as the paper mixes
              long and short captions.

Output: {"x": float (C, H, W), "y": int (-1 without labels), "key": str} (+ "caption": str, and with
cached text embeddings (data/text_embeddings.py) "text_encodings": that caption's encodings per encoder).
A corrupt sample raises (the stream skips and counts it); a sample that cannot match the config
(latent shape, label out of range, missing labels for a class-conditional model) raises
DataConfigError, which stops the run with the fix in the message.
"""

from __future__ import annotations

import io
import json
import random
from typing import Any

import numpy as np
import torch
from PIL import Image

from data.shards import DataConfigError
from data.text_embeddings import decode_sample, source_tag
from data.transforms import center_crop_arr, to_model_range

__all__ = ["IMAGE_MEMBERS", "SampleDecoder", "caption_texts", "decode_image", "parse_caption_sources"]

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
KINDS = ("images", "latents")


def decode_image(sample: dict[str, Any], image_size: int, channels: int = 3) -> torch.Tensor:
    """The sample's image, ADM centre-cropped to image_size: float (channels, size, size) in [-1, 1]."""
    member = next((m for m in IMAGE_MEMBERS if m in sample), None)
    if member is None:
        raise ValueError(f"sample {sample.get('__key__')} has no image ({', '.join(IMAGE_MEMBERS)})")
    with Image.open(io.BytesIO(sample[member])) as img:
        arr = center_crop_arr(img.convert("L" if channels == 1 else "RGB"), image_size)
    return to_model_range(arr)


def parse_caption_sources(sources: list[str] | None) -> list[tuple[str, str | None]]:
    """["txt", "json:caption", "json:short_caption"] -> [("txt", None), ("json", "caption"), ...]."""
    out: list[tuple[str, str | None]] = []
    for source in sources or []:
        member, _, field = str(source).partition(":")
        if member == "txt" and not field:
            out.append(("txt", None))
        elif member == "json" and field:
            out.append(("json", field))
        else:
            raise DataConfigError(
                f"caption source {source!r} not understood: use 'txt' or 'json:<field>', e.g. "
                "data.captions=[txt,json:short_caption]"
            )
    return out


class SampleDecoder:
    """Picklable (it travels to DataLoader workers); called as decoder(sample, rng=...)."""

    def __init__(
        self,
        kind: str,
        input_size: int,
        channels: int,
        num_classes: int,
        image_size: int | None = None,
        captions: list[str] | None = None,
        random_flip: bool = False,
        text_embeddings: dict[str, Any] | None = None,
    ):
        if kind not in KINDS:
            raise DataConfigError(f"data.kind must be one of {KINDS}, got {kind!r}")
        if kind == "images" and channels not in (1, 3):
            raise DataConfigError(f"image shards: data.channels must be 1 or 3, got {channels}")
        self.kind = kind
        self.input_size = input_size
        self.channels = channels
        self.num_classes = num_classes
        self.image_size = image_size or input_size
        self.captions = parse_caption_sources(captions)
        self.random_flip = random_flip
        self.text_embeddings = text_embeddings  # the cache's manifest (data.text_embeddings), or None
        if text_embeddings is not None:
            if not self.captions:
                raise DataConfigError("data.text_embeddings needs data.captions (the sources whose encodings to read)")
            tags = [source_tag(m, f) for m, f in self.captions]
            missing = [t for t in tags if t not in text_embeddings["sources"]]
            if missing:
                raise DataConfigError(
                    f"data.captions names caption source(s) {missing} that the cached text embeddings do not hold "
                    f"(they hold {text_embeddings['sources']}): re-run scripts/precompute_text_embeddings.py with "
                    "--captions listing every source of data.captions, or drop those sources from data.captions"
                )

    def __call__(self, sample: dict[str, Any], rng: random.Random | None = None) -> dict[str, Any]:
        flip = self.random_flip and rng is not None and rng.random() < 0.5
        x = self._latent(sample, flip) if self.kind == "latents" else self._image(sample, flip)
        out: dict[str, Any] = {"x": x, "y": self._label(sample), "key": sample["__key__"]}
        if self.captions:
            tag, out["caption"] = self._caption(sample, rng)
            if self.text_embeddings is not None:
                out["text_encodings"] = decode_sample(sample, tag, self.text_embeddings)
        return out

    # --- model input -------------------------------------------------------------------------------
    def _image(self, sample: dict[str, Any], flip: bool) -> torch.Tensor:
        x = decode_image(sample, self.image_size, self.channels)  # (C, H, W) in [-1, 1]
        return x.flip(-1) if flip else x

    def _latent(self, sample: dict[str, Any], flip: bool) -> torch.Tensor:
        if "npy" not in sample:
            raise ValueError(f"sample {sample['__key__']} has no .npy latent")
        if flip and "flip.npy" not in sample:
            raise DataConfigError(
                "data.random_flip=true but the latent shards hold no mirrored latents (.flip.npy): write them with "
                "scripts/precompute_latents.py --flip, or set data.random_flip=false"
            )
        arr = np.load(io.BytesIO(sample["flip.npy" if flip else "npy"]), allow_pickle=False)
        expected = (self.channels, self.input_size, self.input_size)
        if arr.shape != expected:
            raise DataConfigError(
                f"latent of shape {arr.shape} in {sample.get('__url__')}, but the data config expects {expected} "
                "(data.channels, data.input_size): set them to match the autoencoder the shards were made with"
            )
        return torch.from_numpy(arr.astype(np.float32, copy=False))

    # --- conditioning ------------------------------------------------------------------------------
    def _label(self, sample: dict[str, Any]) -> int:
        if "cls" not in sample:
            if self.num_classes > 0:
                raise DataConfigError(
                    f"data.num_classes={self.num_classes} but shard samples have no .cls label "
                    f"({sample.get('__url__')}): set data.num_classes=0 for an unconditional model"
                )
            return -1
        label = int(sample["cls"].decode().strip())
        if self.num_classes > 0 and not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} outside [0, {self.num_classes}) in sample {sample['__key__']}")
        return label

    def _caption(self, sample: dict[str, Any], rng: random.Random | None) -> tuple[str, str]:
        """(source tag, caption): one of the sample's non-empty caption sources."""
        available = caption_texts(sample, self.captions)
        if not available:
            raise ValueError(f"sample {sample['__key__']} has none of the caption sources {self.captions}")
        # Training draws a source at random; evaluation (no rng) takes the first available one.
        return rng.choice(available) if rng is not None else available[0]


def caption_texts(sample: dict[str, Any], sources: list[tuple[str, str | None]]) -> list[tuple[str, str]]:
    """The sample's non-empty captions, in the order of `sources` (parsed): [(source tag, text), ...]."""
    meta = None
    available = []
    for member, field in sources:
        if member == "txt":
            text = sample.get("txt", b"").decode("utf-8").strip()
        else:
            if meta is None:
                meta = json.loads(sample["json"]) if "json" in sample else {}
            value = meta.get(field)
            text = value.strip() if isinstance(value, str) else ""
        if text:
            available.append((source_tag(member, field), text))
    return available
