"""The paper's COCO'14 evaluation set from a local COCO download: a prompt file and its reference images.

    python scripts/make_coco_prompts.py --annotations /data/coco/annotations/captions_val2014.json \
        --images /data/coco/val2014 --out /data/coco14_val           # the 40,504 val images, one caption each
    python scripts/make_coco_prompts.py ... --limit 5000 --out /data/coco5k      # a seeded subset (COCO-5K)

Writes under --out:
    prompts.txt      one caption per line; line i is the prompt of sample i (sample.py prompts=... per_prompt=1)
    reference/       the reference images, `<i:06d>_<image_id>.jpg`, symbolic links to --images (or copies
                     with --copy); evaluate.py benchmark=coco14 reads them (reference.path)
    pairs.jsonl      {"index", "image_id", "file", "caption", "caption_id"} per line: which image and caption
    manifest.json    what was chosen and how (annotation file hash, seed, caption rule, counts)

One caption per image (the paper's "40k COCO'14 validation captions" are the 40,504 validation image-
caption pairs): `--caption random` (default) draws one of the image's ~5 captions from (seed, image id);
`--caption first` takes the one with the smallest annotation id. Captions are stripped and their inner
whitespace (COCO has a few newlines) collapsed to single spaces. Images are ordered by image id
(`--limit N`: N of them drawn with the seed, then ordered by id).

Re-running with the same arguments is instant (the manifest matches); other arguments into the same
--out are refused, so an evaluation set never mixes two selections. Files appear atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.io import atomic_write_text  # noqa: E402

MANIFEST = "manifest.json"


def clean(caption: str) -> str:
    return " ".join(caption.split())


def _digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def select_pairs(annotations: dict[str, Any], images_dir: Path, rule: str, seed: int, limit: int | None):
    """[(image_id, file name, caption, caption id)], ordered by image id."""
    if "images" not in annotations or "annotations" not in annotations:
        raise ValueError("not a COCO captions file: expected 'images' and 'annotations' (captions_val2014.json)")
    files = {img["id"]: img["file_name"] for img in annotations["images"]}
    captions: dict[int, list[tuple[int, str]]] = {}
    for ann in annotations["annotations"]:
        text = clean(str(ann.get("caption", "")))
        if text:
            captions.setdefault(ann["image_id"], []).append((ann["id"], text))
    ids = sorted(i for i in files if i in captions)
    if limit is not None:
        if not 0 < limit <= len(ids):
            raise ValueError(f"--limit {limit}: choose 1..{len(ids)} (images with a caption)")
        ids = sorted(random.Random(seed).sample(ids, limit))
    missing = [files[i] for i in ids if not (images_dir / files[i]).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(ids)} images are not in {images_dir} (first: {missing[0]}); point --images "
            "at the val2014 folder of the same COCO release"
        )
    pairs = []
    for image_id in ids:
        options = sorted(captions[image_id])  # by annotation id
        if rule == "first":
            caption_id, text = options[0]
        else:
            caption_id, text = random.Random(f"{seed}/{image_id}").choice(options)
        pairs.append((image_id, files[image_id], text, caption_id))
    return pairs


def build_reference(pairs: list, images_dir: Path, out: Path, copy: bool) -> None:
    """reference/ with one file per pair, written into a temporary folder that is renamed when complete."""
    final = out / "reference"
    tmp = Path(tempfile.mkdtemp(prefix=".reference.", dir=out))
    try:
        for i, (image_id, name, _, _) in enumerate(pairs):
            src = (images_dir / name).resolve()
            dst = tmp / f"{i:06d}_{image_id}{src.suffix.lower()}"
            if copy:
                shutil.copyfile(src, dst)
            else:
                os.symlink(src, dst)
        if final.exists():
            shutil.rmtree(final)  # only reached when the manifest said this folder is incomplete
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", type=Path, required=True, help="captions_val2014.json")
    parser.add_argument("--images", type=Path, required=True, help="the val2014 image folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--caption", choices=("random", "first"), default="random", help="which caption per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="a seeded subset of N images (e.g. 5000)")
    parser.add_argument("--copy", action="store_true", help="copy the reference images instead of linking them")
    args = parser.parse_args(argv)

    if not args.annotations.is_file():
        raise SystemExit(f"--annotations {args.annotations}: no such file (COCO's annotations/captions_val2014.json)")
    if not args.images.is_dir():
        raise SystemExit(f"--images {args.images}: no such folder (COCO's val2014/)")
    settings = {
        "annotations": str(args.annotations.resolve()),
        "annotations_sha1": _digest(args.annotations),
        "images": str(args.images.resolve()),
        "caption": args.caption,
        "seed": args.seed,
        "limit": args.limit,
        "copy": args.copy,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path = args.out / MANIFEST
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("settings") != settings:
            raise SystemExit(
                f"{args.out} already holds an evaluation set made with other settings ({manifest_path}); "
                "use another --out so that two selections are never mixed"
            )
        if old.get("complete"):
            print(f"{args.out}: already complete ({old['count']} prompts)")
            return old

    pairs = select_pairs(json.loads(args.annotations.read_text()), args.images, args.caption, args.seed, args.limit)
    atomic_write_text(manifest_path, json.dumps({"settings": settings, "complete": False}, indent=1))
    build_reference(pairs, args.images, args.out, args.copy)
    atomic_write_text(args.out / "prompts.txt", "".join(f"{text}\n" for _, _, text, _ in pairs))
    records = (
        json.dumps({"index": i, "image_id": image_id, "file": name, "caption": text, "caption_id": caption_id})
        for i, (image_id, name, text, caption_id) in enumerate(pairs)
    )
    atomic_write_text(args.out / "pairs.jsonl", "".join(r + "\n" for r in records))
    manifest = {"settings": settings, "complete": True, "count": len(pairs)}
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    print(
        f"{len(pairs)} prompts -> {args.out / 'prompts.txt'}; reference images -> {args.out / 'reference'}\n"
        f"  sample: python sample.py checkpoint=... prompts={args.out / 'prompts.txt'} per_prompt=1 ...\n"
        f"  evaluate: COCO14_EVAL={args.out} python evaluate.py benchmark=coco14 samples=..."
    )
    return manifest


if __name__ == "__main__":
    main()
