"""Evaluation benchmark: Inception-v3 feature throughput (img/s at 256 px) and PRDC time (N x N).

    python scripts/benchmark_eval.py --weights /w/weights-inception-2015-12-05-6726825d.pth   # GPU: 50k x 50k PRDC
    python scripts/benchmark_eval.py --device cpu --prdc-n 10000 --skip-inception              # CPU: 10k x 10k PRDC
    python scripts/benchmark_eval.py --out docs/benchmarks/eval_<gpu>.md --json eval_<gpu>.json

Inception: uint8 images already on the device (the network's throughput, as the issue's 4,600 img/s
reference point; decoding is not included), fp32, batch --batch-size, --inception-images images after
warm-up. Without --weights (and no file in torch hub's cache) it runs on random weights: the speed is
the same, and the table says so. PRDC: random 2048-d float32 features, real = fake = --prdc-n points,
k = 3, blocks of --chunk-size (eval/prdc.py), exact (the default) and with plain float32 comparisons.
FID: the float64 FID of two 2048 x 2048 covariances (scipy sqrtm and the eigh method), the fixed cost
of every FID. Targets (issue 5, one H100): features >= 4,000 img/s, PRDC 50k x 50k < 60 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.features import INCEPTION_FILE, InceptionV3Features, write_random_inception_weights
from eval.fid import frechet_distance
from eval.prdc import compute_prdc
from models.io import atomic_write_text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--weights", help=f"{INCEPTION_FILE} (default: torch hub cache, else random weights)")
    p.add_argument("--backend", default="torch-fidelity", choices=["torch-fidelity", "torchmetrics"])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--inception-images", type=int, default=10_000, help="images timed (after warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up batches")
    p.add_argument("--prdc-n", type=int, default=50_000, help="real = fake = N points")
    p.add_argument("--prdc-dim", type=int, default=2048)
    p.add_argument("--chunk-size", type=int, default=8192)
    p.add_argument("--fid-dim", type=int, default=2048, help="dimension of the FID matrix square root (0: skip)")
    p.add_argument("--skip-inception", action="store_true")
    p.add_argument("--skip-prdc", action="store_true")
    p.add_argument("--out", help="write a markdown table here")
    p.add_argument("--json", help="write the results as JSON here")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_inception(args: argparse.Namespace, device: torch.device) -> dict:
    weights, random_weights = args.weights, False
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    tmp = None
    if not weights and not cached.is_file():
        tmp = tempfile.TemporaryDirectory()
        weights, random_weights = str(write_random_inception_weights(Path(tmp.name) / "random.pth")), True
    ext = InceptionV3Features(weights, backend=args.backend, download=False).to(device).eval()
    g = torch.Generator(device=device).manual_seed(0)
    batch = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), generator=g, device=device,
                          dtype=torch.uint8)  # fmt: skip
    for _ in range(args.warmup):
        ext(batch)
    sync(device)
    n_batches = max(1, -(-args.inception_images // args.batch_size))
    start = time.perf_counter()
    for _ in range(n_batches):
        feats = ext(batch)
    sync(device)
    seconds = time.perf_counter() - start
    if tmp is not None:
        tmp.cleanup()
    assert feats.shape == (args.batch_size, 2048) and torch.isfinite(feats).all()
    images = n_batches * args.batch_size
    return {
        "images": images,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "backend": args.backend,
        "random_weights": random_weights,
        "seconds": round(seconds, 3),
        "img_per_s": round(images / seconds, 1),
        "seconds_for_50k": round(50_000 * seconds / images, 1),
    }


def bench_prdc(args: argparse.Namespace, device: torch.device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    real = torch.randn(args.prdc_n, args.prdc_dim, generator=g, device=device)
    fake = torch.randn(args.prdc_n, args.prdc_dim, generator=g, device=device) * 1.05 + 0.01
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = compute_prdc(real, fake, k=3, chunk_size=args.chunk_size)  # exact (the default)
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    start = time.perf_counter()
    plain = compute_prdc(real, fake, k=3, chunk_size=args.chunk_size, exact=False)  # float32 comparisons only
    sync(device)
    plain_seconds = time.perf_counter() - start
    return {
        "n": args.prdc_n,
        "dim": args.prdc_dim,
        "k": 3,
        "chunk_size": args.chunk_size,
        "seconds": round(seconds, 2),
        "plain_seconds": round(plain_seconds, 2),
        "peak_gib": round(peak, 2) if peak is not None else None,
        **{k: round(v, 4) for k, v in out.as_dict().items()},
        "plain": {k: round(v, 4) for k, v in plain.as_dict().items()},
    }


def bench_fid(dim: int) -> dict:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    s1, s2 = a @ a.T / dim, b @ b.T / dim
    out = {"dim": dim}
    for method in ("sqrtm", "eigh"):
        start = time.perf_counter()
        out[f"{method}_value"] = frechet_distance(np.zeros(dim), s1, np.zeros(dim), s2, method=method)
        out[f"{method}_seconds"] = round(time.perf_counter() - start, 2)
    return out


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
    )


def markdown(results: dict) -> str:
    lines = [f"Device: {results['device']} (torch {results['torch']})", ""]
    if "inception" in results:
        r = results["inception"]
        note = " (random weights: speed only)" if r["random_weights"] else ""
        lines += [
            "| Inception-v3 features | img/s | s per 50k |",
            "|---|---|---|",
            f"| {r['image_size']} px, batch {r['batch_size']}, {r['backend']}, fp32{note} | {r['img_per_s']} | "
            f"{r['seconds_for_50k']} |",
            "",
        ]
    if "prdc" in results:
        r = results["prdc"]
        peak = f"{r['peak_gib']} GiB" if r["peak_gib"] is not None else "–"
        lines += [
            "| PRDC (k = 3) | exact (default), s | float32 comparisons only (prdc.exact=false), s | peak memory |",
            "|---|---|---|---|",
            f"| {r['n']} x {r['n']}, {r['dim']}-d, chunk {r['chunk_size']} | {r['seconds']} | {r['plain_seconds']} | "
            f"{peak} |",
            "",
        ]
    if "fid" in results:
        r = results["fid"]
        lines += [
            "| FID of 2 covariances (float64) | seconds |",
            "|---|---|",
            f"| {r['dim']}-d, scipy sqrtm (fid_method=sqrtm) | {r['sqrtm_seconds']} |",
            f"| {r['dim']}-d, eigendecompositions (fid_method=eigh) | {r['eigh_seconds']} |",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    results: dict = {"device": machine(device), "torch": torch.__version__}
    if not args.skip_inception:
        results["inception"] = bench_inception(args, device)
        print(json.dumps({"inception": results["inception"]}))
    if not args.skip_prdc:
        results["prdc"] = bench_prdc(args, device)
        print(json.dumps({"prdc": results["prdc"]}))
    if args.fid_dim:
        results["fid"] = bench_fid(args.fid_dim)
        print(json.dumps({"fid": results["fid"]}))
    table = markdown(results)
    print(table)
    if args.out:
        atomic_write_text(args.out, table + "\n")
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
