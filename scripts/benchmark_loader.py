"""Latent-shard loader benchmark: samples/s of the training data path alone (no model), per number of
DataLoader workers, next to the training step rate it has to keep up with.

    # synthetic DiT-XL/2 256px latents (4x32x32 float32 + mirrored latent + label), 8 workers
    python scripts/benchmark_loader.py --workers 8 --out docs/benchmarks/loader_<machine>.md

    # your own latent shards, several worker counts, compared with scripts/benchmark.py's output
    python scripts/benchmark_loader.py --shards /data/latents/imagenet256 --workers 1,4,8 \\
        --train-json train_dit_xl2_h100.json

What is timed is exactly the training data path of one GPU (data/shards.TrainStream through a
torch DataLoader): resampled shards, tar reading, shuffle buffer, .npy decode, flip choice,
batching, collation; batches are consumed on the host (no copy to the GPU). The first
`--warmup` batches (worker start, buffer fill) are not timed. Data loading keeps up when the
loader's samples/s per process is above the training img/s per GPU (with `--train-json`, the
table says by how much). Page cache: synthetic shards are freshly written (in memory);
real shards read from network storage are slower the first time.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.shard_decode import SampleDecoder
from data.shard_writer import write_shard
from data.shards import TrainStream, expand_urls
from scripts.benchmark import write_results


def synthetic_latent_shards(folder: Path, samples: int, per_shard: int, shape: tuple[int, int, int]) -> str:
    """Random latents in the layout precompute_latents.py writes (.npy, .flip.npy, .cls)."""
    rng = np.random.default_rng(0)

    def npy(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    for s in range(-(-samples // per_shard)):
        keys = range(s * per_shard, min((s + 1) * per_shard, samples))
        write_shard(folder / f"train-{s:06d}.tar", (
            {"__key__": f"{i:09d}", "npy": npy(rng.standard_normal(shape, dtype=np.float32)),
             "flip.npy": npy(rng.standard_normal(shape, dtype=np.float32)), "cls": str(i % 1000)}
            for i in keys
        ))  # fmt: skip
    return str(folder)


def measure(urls: list[str], decoder: SampleDecoder, args: argparse.Namespace, workers: int) -> dict:
    stream = TrainStream(urls, decoder, args.batch_size, seed=0, shuffle_buffer=args.shuffle_buffer)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None,
        persistent_workers=False, pin_memory=False,
    )  # fmt: skip
    it = iter(loader)
    for _ in range(args.warmup):
        next(it)
    start = time.perf_counter()
    n = 0
    for _ in range(args.batches):
        batch = next(it)
        n += batch["x"].shape[0]
    elapsed = time.perf_counter() - start
    del it
    return {"workers": workers, "batch_size": args.batch_size, "samples": n, "seconds": elapsed,
            "samples_per_s": n / elapsed}  # fmt: skip


def markdown(results: list[dict], args: argparse.Namespace, train: dict | None) -> str:
    lines = [
        f"# Latent-shard loader, {args.shape} latents, batch {args.batch_size}, shuffle buffer {args.shuffle_buffer}",
        "",
        f"Host: {platform.node()} ({platform.processor() or platform.machine()}), torch {torch.__version__}; "
        f"data: {'synthetic shards in ' + str(args.synthetic_dir) if args.shards is None else args.shards}",
        "",
        "| workers | samples/s | vs training img/s per GPU |",
        "|---|---|---|",
    ]
    for r in results:
        ratio = f"{r['samples_per_s'] / train['img_per_s']:.1f}x" if train else "n/a"
        lines.append(f"| {r['workers']} | {r['samples_per_s']:.0f} | {ratio} |")
    if train:
        device, rate = train.get("device", "?"), train["img_per_s"]
        lines += ["", f"Training step (scripts/benchmark.py, {device}): {rate:.0f} img/s per GPU "
                  f"(batch {train['batch_size']}, {train['mode']})."]  # fmt: skip
    return "\n".join(lines) + "\n"


def best_training_rate(path: Path) -> dict:
    """The fastest configuration in a scripts/benchmark.py --json file."""
    data = json.loads(path.read_text())
    best = max(data["results"], key=lambda r: r["img_per_s"])
    return {**best, "device": data.get("device", "?")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default=None, help="latent shards to read (default: write synthetic ones)")
    p.add_argument("--synthetic-samples", type=int, default=20000)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--shape", default="4,32,32", help="latent shape C,H,W (DiT-XL/2 at 256px: 4,32,32)")
    p.add_argument("--workers", default="8", help="comma-separated worker counts")
    p.add_argument("--batch-size", type=int, default=32, help="per-GPU batch (DiT: 256 over 8 GPUs)")
    p.add_argument("--shuffle-buffer", type=int, default=5000)
    p.add_argument("--batches", type=int, default=200, help="timed batches")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--train-json", type=Path, default=None, help="scripts/benchmark.py --json output to compare")
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    with tempfile.TemporaryDirectory(prefix="loader_bench_") as tmp:
        args.synthetic_dir = Path(tmp)
        if args.shards is None:
            source = synthetic_latent_shards(Path(tmp), args.synthetic_samples, args.samples_per_shard, shape)
        else:
            source = args.shards
        urls = expand_urls(source)
        decoder = SampleDecoder("latents", input_size=shape[1], channels=shape[0], num_classes=1000,
                                random_flip=not args.no_flip)  # fmt: skip
        results = [measure(urls, decoder, args, int(w)) for w in args.workers.split(",")]
    train = best_training_rate(args.train_json) if args.train_json else None
    table = markdown(results, args, train)
    print(table)
    summary = {"host": platform.node(), "shape": shape, "results": results, "train": train}
    write_results(args.out, args.json, table, summary)
    return results


if __name__ == "__main__":
    main()
