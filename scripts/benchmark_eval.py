"""Evaluation benchmark: Inception-v3 feature throughput, and PRDC and FID statistics on N x N features.

    python scripts/benchmark_eval.py --weights /w/weights-inception-2015-12-05-6726825d.pth   # GPU: 50k x 50k
    python scripts/benchmark_eval.py --device cpu --prdc-n 10000 --skip-inception              # CPU: 10k x 10k
    python scripts/benchmark_eval.py --out docs/benchmarks/eval_<gpu>.md --json eval_<gpu>.json

Inception (fp32, batch --batch-size, --inception-images images after --warmup batches), from one of two
sources (--sources):
- `host`: end to end, exactly the evaluation's loop (`eval.reference.extract_features`): uint8 NHWC
  images in host memory, copied to the device, the network (its resize to 299 included), the running
  FID statistics, the features back to the host. Only decoding image files is left out.
- `device`: uint8 images already on the device: the network's throughput alone (the issue's 4,600
  img/s reference point).
Without --weights (and no file in torch hub's cache) it runs on random weights: the speed is the
same, and the table says so.
PRDC: random 2048-d float32 features, real = fake = --prdc-n points, k = 3, blocks of --chunk-size
(eval/prdc.py). FID: the statistics (float64 mean and covariance, `eval.fid.RunningStats`, streamed
in batches of --fid-batch) of the same two feature sets on the device, then the Fréchet distance on
the host by scipy's sqrtm (fid_method=sqrtm, the default) and by eigendecompositions (fid_method=eigh).
Targets (issue 5, one H100): features >= 4,000 img/s, PRDC 50k x 50k < 60 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.features import INCEPTION_FILE, InceptionV3Features, write_random_inception_weights
from eval.fid import RunningStats, frechet_distance
from eval.prdc import compute_prdc
from eval.preprocess import Protocol
from eval.reference import extract_features
from eval.sources import Batch, ImageSource
from models.io import atomic_write_text
from scripts.benchmark import Budget, Report, config_from_args, peak_memory_gib, sync

PARTS = ("inception", "prdc", "fid")


@dataclass(frozen=True)
class EvalBench:
    """Sizes of the evaluation benchmark (see the module docstring)."""

    weights: str | None = None
    backend: str = "torch-fidelity"
    image_size: int = 256
    batch_size: int = 500
    inception_images: int = 10_000
    warmup: int = 2
    sources: tuple[str, ...] = ("device",)
    prdc_n: int = 50_000
    prdc_dim: int = 2048
    chunk_size: int = 8192
    k: int = 3
    fid_batch: int = 10_000

    def __post_init__(self) -> None:
        bad = sorted(set(self.sources) - {"host", "device"})
        if bad:
            raise ValueError(f"Inception sources must be host or device, got {bad}")


class RepeatedImages(ImageSource):
    """`n` uint8 NHWC images in host memory: one random batch, yielded again and again (the cost of a
    batch does not depend on its pixels)."""

    kind = "benchmark"

    def __init__(self, n: int, batch: np.ndarray):
        super().__init__(Protocol())
        self.n, self.batch = n, batch

    def __len__(self) -> int:
        return self.n

    @property
    def name(self) -> str:
        return "repeated-random"

    def fingerprint(self) -> str:
        return "random"

    def batches(self, batch_size: int) -> Iterator[Batch]:
        for start in range(0, self.n, batch_size):
            images = self.batch[: min(batch_size, self.n - start)]
            yield images, [{"index": start + i} for i in range(len(images))]


def inception(cfg: EvalBench, device: torch.device, tmp: Path) -> tuple[InceptionV3Features, bool]:
    """The FID Inception-v3 (--weights, torch hub's cache, else random weights written into `tmp`)."""
    weights, random_weights = cfg.weights, False
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not weights and not cached.is_file():
        weights, random_weights = str(write_random_inception_weights(tmp / "random.pth")), True
    ext = InceptionV3Features(weights, backend=cfg.backend, download=False).to(device).eval()
    return ext, random_weights


def bench_inception(cfg: EvalBench, ext: InceptionV3Features, source: str, device: torch.device) -> dict:
    """img/s of `ext` on uint8 images from `source` (host: the evaluation's loop; device: the network)."""
    g = torch.Generator().manual_seed(0)
    shape = (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
    n_batches = max(1, -(-cfg.inception_images // cfg.batch_size))
    images = n_batches * cfg.batch_size
    if source == "host":
        nhwc = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        for _ in range(cfg.warmup):
            extract_features(RepeatedImages(cfg.batch_size, nhwc), ext, cfg.batch_size, device, progress=False)
        sync(device)
        start = time.perf_counter()
        _, feats, n = extract_features(RepeatedImages(images, nhwc), ext, cfg.batch_size, device, progress=False)
        sync(device)
        seconds = time.perf_counter() - start
        assert n == images and feats.shape == (images, 2048)
    else:
        batch = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(device)
        for _ in range(cfg.warmup):
            ext(batch)
        sync(device)
        start = time.perf_counter()
        for _ in range(n_batches):
            feats = ext(batch)
        sync(device)
        seconds = time.perf_counter() - start
        assert feats.shape == (cfg.batch_size, 2048)
    assert torch.isfinite(feats).all()
    return {
        "source": source,
        "images": images,
        "image_size": cfg.image_size,
        "batch_size": cfg.batch_size,
        "backend": cfg.backend,
        "seconds": round(seconds, 3),
        "img_per_s": round(images / seconds, 1),
        "seconds_for_50k": round(50_000 * seconds / images, 1),
    }


def random_features(cfg: EvalBench, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and fake (N, D) float32 features on the device; the fakes slightly wider and shifted."""
    g = torch.Generator(device=device).manual_seed(0)
    real = torch.randn(cfg.prdc_n, cfg.prdc_dim, generator=g, device=device)
    fake = torch.randn(cfg.prdc_n, cfg.prdc_dim, generator=g, device=device) * 1.05 + 0.01
    return real, fake


def bench_prdc(cfg: EvalBench, real: torch.Tensor, fake: torch.Tensor, device: torch.device) -> dict:
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = compute_prdc(real, fake, k=cfg.k, chunk_size=cfg.chunk_size)
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "n": cfg.prdc_n,
        "dim": cfg.prdc_dim,
        "k": cfg.k,
        "chunk_size": cfg.chunk_size,
        "seconds": round(seconds, 2),
        "peak_gib": peak_memory_gib(device),
        **{k: round(v, 4) for k, v in out.as_dict().items()},
    }


def bench_fid(cfg: EvalBench, real: torch.Tensor, fake: torch.Tensor, device: torch.device) -> dict:
    """Statistics of both sets (streamed, float64, on the device), then the distance by both methods."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    stats = []
    for feats in (real, fake):
        running = RunningStats()
        for i in range(0, len(feats), cfg.fid_batch):
            running.update(feats[i : i + cfg.fid_batch])
        stats.append(running.compute())  # mean and covariance back on the host, as the evaluation keeps them
    out = {"n": cfg.prdc_n, "dim": cfg.prdc_dim, "batch": cfg.fid_batch,
           "stats_seconds": round(time.perf_counter() - start, 2), "peak_gib": peak_memory_gib(device)}  # fmt: skip
    (r, f) = stats
    for method in ("sqrtm", "eigh"):
        start = time.perf_counter()
        out[f"{method}_value"] = frechet_distance(r.mu, r.sigma, f.mu, f.sigma, method=method)
        out[f"{method}_seconds"] = round(time.perf_counter() - start, 2)
    return out


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
    )


def run(
    cfg: EvalBench,
    device: str = "cuda",
    budget: Budget | None = None,
    report: Report | None = None,
    parts: tuple[str, ...] = PARTS,
) -> dict:
    """The chosen parts (inception, prdc, fid) in order. A second Inception source that would not fit the
    budget at the first one's measured time is skipped with a line."""
    device = torch.device(device)  # no TF32: the evaluation computes distances and features in fp32
    budget = budget or Budget()
    results: dict = {"device": machine(device), "torch": torch.__version__}

    def done(key: str, value: object) -> None:
        results[key] = value
        print(json.dumps({key: value}), flush=True)
        if report:
            report(results)

    if "inception" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            ext, random_weights = inception(cfg, device, Path(tmp))
            results["inception_random_weights"] = random_weights
            rows: list[dict] = []
            for source in cfg.sources:
                reason = budget.skip_reason(rows[-1]["seconds"], "the last source's time") if rows else None
                rows.append(
                    {"source": source, "skipped": reason} if reason else bench_inception(cfg, ext, source, device)
                )
                done("inception", rows)
            del ext
    if "prdc" in parts or "fid" in parts:
        real, fake = random_features(cfg, device)
        if "prdc" in parts:
            done("prdc", bench_prdc(cfg, real, fake, device))
        if "fid" in parts:
            done("fid", bench_fid(cfg, real, fake, device))
    return results


def markdown(results: dict) -> str:
    lines = [f"Device: {results['device']} (torch {results['torch']})", ""]
    if "inception" in results:
        note = " (random weights: speed only)" if results["inception_random_weights"] else ""
        lines += ["| Inception-v3 features | img/s | s per 50k |", "|---|---|---|"]
        for r in results["inception"]:
            if "img_per_s" not in r:
                lines.append(f"| from {r['source']} | {r['skipped']} | |")
                continue
            what = "end to end from uint8 images in host memory" if r["source"] == "host" else "uint8 images on device"
            lines.append(f"| {what}, {r['image_size']} px, batch {r['batch_size']}, {r['backend']}, fp32{note} | "
                         f"{r['img_per_s']} | {r['seconds_for_50k']} |")  # fmt: skip
        lines.append("")
    if "prdc" in results:
        r = results["prdc"]
        peak = f"{r['peak_gib']} GiB" if r["peak_gib"] is not None else "–"
        lines += [
            f"| PRDC (k = {r['k']}) | seconds | peak memory |",
            "|---|---|---|",
            f"| {r['n']} x {r['n']}, {r['dim']}-d, chunk {r['chunk_size']} | {r['seconds']} | {peak} |",
            "",
        ]
    if "fid" in results:
        r = results["fid"]
        peak = f"{r['peak_gib']} GiB" if r["peak_gib"] is not None else "–"
        lines += [
            "| FID | seconds | peak memory |",
            "|---|---|---|",
            f"| statistics of {r['n']} + {r['n']} features, {r['dim']}-d (float64, batches of {r['batch']}) | "
            f"{r['stats_seconds']} | {peak} |",
            f"| Fréchet distance, scipy sqrtm (fid_method=sqrtm) | {r['sqrtm_seconds']} | |",
            f"| Fréchet distance, eigendecompositions (fid_method=eigh) | {r['eigh_seconds']} | |",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--weights", help=f"{INCEPTION_FILE} (default: torch hub cache, else random weights)")
    p.add_argument("--backend", default="torch-fidelity", choices=["torch-fidelity", "torchmetrics"])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--inception-images", type=int, default=10_000, help="images timed (after warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up batches")
    p.add_argument("--sources", nargs="+", default=["device"], choices=["host", "device"])
    p.add_argument("--prdc-n", type=int, default=50_000, help="real = fake = N points (PRDC and FID)")
    p.add_argument("--prdc-dim", type=int, default=2048)
    p.add_argument("--chunk-size", type=int, default=8192)
    p.add_argument("--fid-batch", type=int, default=10_000, help="features per update of the FID statistics")
    p.add_argument("--skip-inception", action="store_true")
    p.add_argument("--skip-prdc", action="store_true")
    p.add_argument("--skip-fid", action="store_true")
    p.add_argument("--out", help="write a markdown table here")
    p.add_argument("--json", help="write the results as JSON here")
    args = p.parse_args(argv)

    skip = {"inception": args.skip_inception, "prdc": args.skip_prdc, "fid": args.skip_fid}
    results = run(config_from_args(EvalBench, args), args.device, parts=tuple(p for p in PARTS if not skip[p]))
    table = markdown(results)
    print(table)
    if args.out:
        atomic_write_text(args.out, table + "\n")
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
