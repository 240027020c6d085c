"""Sampling benchmark: every guidance method in the shared sampler, eager vs torch.compile.

    python scripts/benchmark_sampling.py              # DiT-XL/2 at 256px (32x32x4 latents), batch 128, 50 steps, bf16
    python scripts/benchmark_sampling.py --out docs/benchmarks/sampling_dit_xl2_<gpu>.md --json sampling.json
    python scripts/benchmark_sampling.py --device cpu --arch DiT-S/8 --input-size 16 --batch-size 2 --steps 2 \
        --methods cfg erg --modes eager --no-bf16  # smoke

For each method (the real configs of configs/guidance/) and mode: one untimed run (compilation,
warm-up), then `--repeats` timed runs of the full sampler (batch, all steps, conditions, combine)
from noise to the final latents (no VAE decode). Reported: NFE per step (rows per image and step),
img/s, image-steps/s, ms per step, peak memory, and per mode the ERG / CFG wall-time ratio (the
issue's target: <= 1.05, and >= 1,000 image-steps/s for both on one H100). Random weights: the cost
does not depend on them. Layer ranges of the configs (for 28 blocks) are rescaled to other depths.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erg.guidance import build_guidance
from erg.sampler import GuidedSampler, SamplerConfig
from models.checkpoints import build_dit
from models.generation import compose_guidance
from scripts.benchmark import setup_device, sync, write_results

METHODS = [
    "none", "cfg", "apg", "cads", "pag", "seg", "sag", "autoguidance", "i_erg", "c_erg", "erg", "erg_apg", "erg_cads",
]  # fmt: skip


def method_config(name: str, depth: int) -> dict:
    """The method's config from configs/guidance/, its layer ranges rescaled from 28 blocks to `depth`."""
    entry = f"{name} checkpoint=unused" if name == "autoguidance" else name
    _, cfg = compose_guidance(entry)
    if depth != 28:
        lo = round(depth * 12 / 28)
        scaled = [lo, max(round(depth * 15 / 28), lo + 1)]
        if isinstance(cfg.get("image"), dict):
            cfg["image"]["layers"] = scaled
        if "layers" in cfg:
            cfg["layers"] = scaled
    return cfg


def bench_method(args: argparse.Namespace, name: str, mode: str, models: dict, device: torch.device) -> dict:
    guidance = build_guidance(method_config(name, models["main"].depth))
    config = SamplerConfig(steps=args.steps, bf16=args.bf16, compile=mode == "compile")
    sampler = GuidedSampler(guidance, {k: m for k, m in models.items() if k in guidance.models}, config=config)
    labels = [i % args.num_classes for i in range(args.batch_size)]
    indices = range(args.batch_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    sampler.sample_indices(indices, labels)  # compilation / warm-up
    sync(device)
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        sampler.sample_indices(indices, labels)
        sync(device)
        times.append(time.perf_counter() - t0)
    seconds = min(times)
    return {
        "method": name,
        "mode": mode,
        "nfe_per_step": guidance.nfe,
        "img_per_s": round(args.batch_size / seconds, 3),
        "image_steps_per_s": round(args.batch_size * args.steps / seconds, 1),
        "ms_per_step": round(1000 * seconds / args.steps, 2),
        "seconds": round(seconds, 3),
        "warmup_s": round(warmup_s, 1),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }


def ratios(results: list[dict]) -> dict[str, float]:
    """ERG / CFG wall time per mode."""
    out = {}
    for mode in dict.fromkeys(r["mode"] for r in results):
        by = {r["method"]: r for r in results if r["mode"] == mode}
        if "erg" in by and "cfg" in by:
            out[mode] = round(by["erg"]["seconds"] / by["cfg"]["seconds"], 3)
    return out


def markdown(results: list[dict], args: argparse.Namespace, device_name: str) -> str:
    lines = [
        f"Sampling {args.arch} ({args.channels}x{args.input_size}x{args.input_size}), batch {args.batch_size}, "
        f"{args.steps} Euler steps, {'bf16 autocast' if args.bf16 else 'fp32'}, on **{device_name}** "
        f"(torch {torch.__version__}); best of {args.repeats} timed run(s) after one warm-up run.",
        "",
        "| method | mode | NFE / step | img/s | image-steps/s | ms / step | peak memory (GiB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        mem = r["peak_mem_gib"] if r["peak_mem_gib"] is not None else "n/a"
        keys = ("method", "mode", "nfe_per_step", "img_per_s", "image_steps_per_s", "ms_per_step")
        cells = [*(r[k] for k in keys), mem]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    for mode, ratio in ratios(results).items():
        lines.append(f"\nERG / CFG wall time ({mode}): {ratio}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="DiT-XL/2")
    p.add_argument("--input-size", type=int, default=32, help="latent size (256px / 8)")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    p.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = p.parse_args(argv)

    device, device_name = setup_device(args.device)

    def model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        dit = build_dit(args.arch, input_size=args.input_size, in_channels=args.channels, num_classes=args.num_classes)
        return dit.to(device).eval().requires_grad_(False)

    models = {"main": model(0)}
    if "autoguidance" in args.methods:
        models["weak"] = model(1)
    results = []
    for mode in args.modes:
        for name in args.methods:
            r = bench_method(args, name, mode, models, device)
            print(json.dumps(r), flush=True)
            results.append(r)
    table = markdown(results, args, device_name)
    print(table)
    write_results(args.out, args.json, table, {"device": device_name, "ratios": ratios(results), "results": results})
    return results


if __name__ == "__main__":
    main()
