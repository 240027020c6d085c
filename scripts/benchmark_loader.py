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
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.shard_decode import SampleDecoder
from data.shard_writer import write_shard
from data.shards import TrainStream, expand_urls
from scripts.benchmark import Budget, Report, config_from_args, write_results


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


@dataclass(frozen=True)
class LoaderBench:
    """Sizes of the loader benchmark (see the module docstring); workers: the DataLoader worker counts."""

    shards: str | None = None
    synthetic_samples: int = 20000
    samples_per_shard: int = 1000
    shape: tuple[int, int, int] = (4, 32, 32)
    workers: tuple[int, ...] = (8,)
    batch_size: int = 32
    shuffle_buffer: int = 5000
    batches: int = 200
    warmup: int = 20
    flip: bool = True


def measure(urls: list[str], decoder: SampleDecoder, cfg: LoaderBench, workers: int) -> dict:
    stream = TrainStream(urls, decoder, cfg.batch_size, seed=0, shuffle_buffer=cfg.shuffle_buffer)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None,
        persistent_workers=False, pin_memory=False,
    )  # fmt: skip
    it = iter(loader)
    for _ in range(cfg.warmup):
        next(it)
    start = time.perf_counter()
    n = 0
    for _ in range(cfg.batches):
        batch = next(it)
        n += batch["x"].shape[0]
    elapsed = time.perf_counter() - start
    del it
    return {"workers": workers, "batch_size": cfg.batch_size, "samples": n, "seconds": elapsed,
            "samples_per_s": n / elapsed}  # fmt: skip


def run(cfg: LoaderBench, budget: Budget | None = None, report: Report | None = None) -> list[dict]:
    """samples/s per worker count (synthetic shards in a temporary folder unless `cfg.shards`); a worker
    count that would not fit `budget` at the last measured time is skipped with a line."""
    budget = budget or Budget()
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="loader_bench_") as tmp:
        if cfg.shards is None:
            source = synthetic_latent_shards(Path(tmp), cfg.synthetic_samples, cfg.samples_per_shard, cfg.shape)
        else:
            source = cfg.shards
        urls = expand_urls(source)
        decoder = SampleDecoder("latents", input_size=cfg.shape[1], channels=cfg.shape[0], num_classes=1000,
                                random_flip=cfg.flip)  # fmt: skip
        for w in cfg.workers:
            last = results[-1].get("seconds", 0.0) if results else 0.0  # timed part; warm-up batches come on top
            reason = budget.skip_reason(last * (1 + cfg.warmup / cfg.batches), "the last count's time")
            if reason:
                r = {"workers": w, "batch_size": cfg.batch_size, "skipped": reason}
            else:
                r = measure(urls, decoder, cfg, w)
            print(json.dumps(r), flush=True)
            results.append(r)
            if report:
                report(results)
    return results


def markdown(results: list[dict], cfg: LoaderBench, train: dict | None) -> str:
    shape = ",".join(str(v) for v in cfg.shape)
    lines = [
        f"Latent-shard loader, {shape} latents, batch {cfg.batch_size}, shuffle buffer {cfg.shuffle_buffer}",
        "",
        f"Host: {platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch "
        f"{torch.__version__}; data: "
        f"{'synthetic shards (' + str(cfg.synthetic_samples) + ' samples)' if cfg.shards is None else cfg.shards}; "
        f"{cfg.batches} timed batches after {cfg.warmup}",
        "",
        "| workers | samples/s | vs training img/s per GPU |",
        "|---|---|---|",
    ]
    for r in results:
        if "samples_per_s" not in r:
            lines.append(f"| {r['workers']} | {r['skipped']} | |")
            continue
        ratio = f"{r['samples_per_s'] / train['img_per_s']:.1f}x" if train else "n/a"
        lines.append(f"| {r['workers']} | {r['samples_per_s']:.0f} | {ratio} |")
    if train:
        device, rate = train.get("device", "?"), train["img_per_s"]
        lines += ["", f"Training step (scripts/benchmark.py, {device}): {rate:.0f} img/s per GPU "
                  f"(batch {train['batch_size']}, {train['mode']})."]  # fmt: skip
    return "\n".join(lines) + "\n"


def fastest(results: list[dict], device: str = "?") -> dict | None:
    """The fastest measured configuration of scripts/benchmark.py's results (None if none was measured)."""
    measured = [r for r in results if "img_per_s" in r]
    return {**max(measured, key=lambda r: r["img_per_s"]), "device": device} if measured else None


def best_training_rate(path: Path) -> dict:
    """The fastest configuration in a scripts/benchmark.py --json file."""
    data = json.loads(path.read_text())
    best = fastest(data["results"], data.get("device", "?"))
    if best is None:
        raise ValueError(f"--train-json {path}: no measured training step in it (every row skipped or failed)")
    return best


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
    p.add_argument("--no-flip", dest="flip", action="store_false")
    p.add_argument("--train-json", type=Path, default=None, help="scripts/benchmark.py --json output to compare")
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    args.shape = tuple(int(v) for v in args.shape.split(","))
    args.workers = tuple(int(w) for w in args.workers.split(","))
    cfg = config_from_args(LoaderBench, args)
    results = run(cfg)
    train = best_training_rate(args.train_json) if args.train_json else None
    table = markdown(results, cfg, train)
    print(table)
    summary = {"host": platform.node(), "shape": cfg.shape, "results": results, "train": train}
    write_results(args.out, args.json, table, summary)
    return results


if __name__ == "__main__":
    main()
