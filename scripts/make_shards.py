"""Pack images (with class labels or captions) into webdataset shards of N samples.

    # ImageFolder layout (one sub-folder per class, e.g. ImageNet's train/): .jpg/.png/.webp + .cls + .json
    python scripts/make_shards.py --input /data/imagenet/train --out /data/shards/imagenet --prefix train

    # image + caption files with the same stem (a.jpg + a.txt and/or a.json, as img2dataset writes them)
    python scripts/make_shards.py --layout captions --input /data/pairs --out /data/shards/pairs

The samples are put in a fixed pseudo-random order (seeded by --seed; shards then mix classes)
and numbered by their position in the sorted listing of the input (the sample key). Shard s holds
samples [s N, (s + 1) N) of that order. Each shard is written atomically, so a shard that exists is
complete: rerunning the same command after an interruption writes only the missing shards, and
the result is byte-identical to an uninterrupted run. `<prefix>.manifest.json` records the inputs
and settings; a rerun with other inputs or settings into the same folder is refused.
Images are stored as they are (their original bytes); the loader decodes and centre-crops them. A
file that is not a readable image is skipped with a warning naming it and counted (the summary line
says how many); its shard holds the other samples. A progress bar (rate, ETA) shows on a terminal.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.imagefolder import IMAGE_EXTENSIONS, UNREADABLE, find_images, warn_unreadable
from data.shard_writer import check_manifest, write_shard
from models.cli import add_progress_flag, progress, reported
from models.runtime import ConfigError

log = logging.getLogger("erg.make_shards")

STORED_AS_IS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}  # others are re-encoded as PNG


# --- listing ---------------------------------------------------------------------------------------
def list_imagefolder(root: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One entry per image: relative path, class index; plus what the manifest records."""
    pairs, classes = find_images(root)
    items = [{"path": str(p.relative_to(root)), "cls": c, "class": classes[c]} for p, c in pairs]
    return items, {"classes": classes}


def list_captioned(root: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One entry per image that has a caption file (.txt) and/or a metadata file (.json) next to it."""
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise ConfigError(f"--input {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) under it")
    items, lonely = [], []
    for p in images:
        txt, meta = p.with_suffix(".txt"), p.with_suffix(".json")
        if not txt.is_file() and not meta.is_file():
            lonely.append(p)
            continue
        items.append({"path": str(p.relative_to(root)), "txt": txt.is_file(), "json": meta.is_file()})
    if lonely:
        raise ConfigError(
            f"{len(lonely)} image(s) have no caption (.txt) or metadata (.json) file with the same stem, e.g. "
            f"{lonely[0]}: add them or remove those images"
        )
    return items, {}


def shuffled(items: list[dict[str, Any]], seed: int | None) -> list[int]:
    """The write order: by a hash of (seed, path), stable across Python and numpy versions."""
    if seed is None:
        return list(range(len(items)))
    digest = lambda i: hashlib.blake2b(f"{seed}/{items[i]['path']}".encode(), digest_size=16).digest()
    return sorted(range(len(items)), key=digest)


def listing_digest(items: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(item, sort_keys=True).encode() + b"\n")
    return h.hexdigest()


# --- samples ---------------------------------------------------------------------------------------
def image_member(path: Path) -> tuple[str, bytes]:
    """(member name, bytes) of an image file: stored as it is (checked to be an image), others as PNG.
    Raises one of data.imagefolder.UNREADABLE for a file that is not a readable image."""
    member = STORED_AS_IS.get(path.suffix.lower())
    if member is not None:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            img.verify()  # header and structure (PNG checksums); cheap, no full decode
        return member, data
    with Image.open(path) as img:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    return "png", buf.getvalue()


def sample_members(root: Path, index: int, item: dict[str, Any]) -> dict[str, Any]:
    """The tar members of one sample: image bytes under their format's name, label or captions."""
    path = root / item["path"]
    image = image_member(path)
    sample: dict[str, Any] = {"__key__": f"{index:09d}", image[0]: image[1]}
    if "cls" in item:
        sample["cls"] = str(item["cls"])
        sample["json"] = json.dumps({"path": item["path"], "class": item["class"]}, sort_keys=True)
    else:
        if item["txt"]:
            sample["txt"] = path.with_suffix(".txt").read_bytes()
        if item["json"]:
            sample["json"] = path.with_suffix(".json").read_bytes()
    return sample


def write_one(root: Path, path: Path, entries: list[tuple[int, dict[str, Any]]]) -> tuple[int, list[str]]:
    """Write one shard; returns (samples written, the unreadable image files skipped)."""
    skipped: list[str] = []

    def readable() -> Any:
        for i, item in entries:
            try:
                yield sample_members(root, i, item)
            except UNREADABLE as err:
                skipped.append(item["path"])
                warn_unreadable(root / item["path"], err, len(skipped))

    return write_shard(path, readable()), skipped


# --- main ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, type=Path, help="image folder")
    p.add_argument("--out", required=True, type=Path, help="output folder for the shards")
    p.add_argument("--layout", choices=("imagefolder", "captions"), default="imagefolder")
    p.add_argument("--prefix", default="train", help="shard names: <prefix>-000000.tar ...")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="order of the samples across shards")
    p.add_argument("--no-shuffle", action="store_true", help="keep the sorted input order")
    p.add_argument("--workers", type=int, default=1, help="shards written in parallel")
    add_progress_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.samples_per_shard < 1:
        raise ConfigError(f"--samples-per-shard must be >= 1, got {args.samples_per_shard}")
    root = args.input.expanduser().resolve()
    if not root.is_dir():
        layout = "one sub-folder of images per class" if args.layout == "imagefolder" else "images with .txt / .json"
        raise ConfigError(f"--input {args.input}: no such folder (the images to pack: {layout})")
    lister = list_imagefolder if args.layout == "imagefolder" else list_captioned
    items, extra = lister(root)
    seed = None if args.no_shuffle else args.seed
    order = shuffled(items, seed)
    n_shards = -(-len(items) // args.samples_per_shard)
    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    pattern = f"{out}/{args.prefix}-{{000000..{n_shards - 1:06d}}}.tar"
    plan = {
        "format": "webdataset", "layout": args.layout, "input": str(root), "samples": len(items),
        "samples_per_shard": args.samples_per_shard, "shards": n_shards, "seed": seed,
        "listing_sha256": listing_digest(items), "pattern": pattern, **extra,
    }  # fmt: skip
    check_manifest(out / f"{args.prefix}.manifest.json", plan)

    todo = []
    for s in range(n_shards):
        path = out / f"{args.prefix}-{s:06d}.tar"
        if not path.is_file():
            chunk = order[s * args.samples_per_shard : (s + 1) * args.samples_per_shard]
            todo.append((path, [(i, items[i]) for i in chunk]))
    log.info("%d samples -> %d shards (%d to write) in %s", len(items), n_shards, len(todo), out)
    bar = progress(total=sum(len(e) for _, e in todo), unit="img", desc="shards", enabled=args.progress)
    skipped: list[str] = []
    if args.workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            for (_, entries), (_, bad) in zip(todo, pool.map(write_one, [root] * len(todo), *zip(*todo))):
                skipped += bad
                bar.update(len(entries))
    else:
        for path, entries in todo:
            skipped += write_one(root, path, entries)[1]
            bar.update(len(entries))
    bar.close()
    note = f"; {len(skipped)} unreadable image(s) skipped (named above), e.g. {skipped[0]}" if skipped else ""
    print(f"{len(items)} samples in {n_shards} shards ({len(todo)} written now): {pattern}{note}")
    return {"pattern": pattern, "shards": n_shards, "written": len(todo), "samples": len(items), "skipped": skipped}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with reported(writes="--out <folder>"):
        main()
