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
Compiled, each model goes through `torch.compile` exactly as `SamplerConfig(compile=True)` does, after
emptying dynamo's caches, so each method compiles as it would in its own sampling run; the warm-up
column (seconds of the untimed run) then shows each method's compilation cost.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erg.guidance import build_guidance
from erg.guidance.base import Guidance
from erg.sampler import GuidedSampler, SamplerConfig
from models.checkpoints import build_dit
from models.generation import compose_guidance
from scripts.benchmark import (
    Budget,
    Report,
    config_from_args,
    dynamo_graphs,
    guarded,
    peak_memory_gib,
    setup_device,
    sync,
    write_results,
)

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


@dataclass(frozen=True)
class SamplingBench:
    """Sizes of the sampling benchmark. compile_methods: the methods run compiled (None: all of
    `methods`); depth: override of the preset's (tiny rehearsals); compile_s: expected torch.compile
    time of one method (its graphs), used only to decide whether the next compiled method fits the
    budget until one has been measured; compile_backend: torch.compile's backend."""

    arch: str = "DiT-XL/2"
    depth: int | None = None
    input_size: int = 32
    channels: int = 4
    num_classes: int = 1000
    batch_size: int = 128
    steps: int = 50
    repeats: int = 2
    methods: tuple[str, ...] = tuple(METHODS)
    compile_methods: tuple[str, ...] | None = None
    modes: tuple[str, ...] = ("eager", "compile")
    bf16: bool = True
    compile_backend: str = "inductor"
    compile_s: float = 40.0

    def __post_init__(self) -> None:
        unknown = sorted((set(self.methods) | set(self.compile_methods or ())) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown guidance method(s) {unknown}; choose from {METHODS}")


def bench_method(
    cfg: SamplingBench, name: str, guidance: Guidance, mode: str, models: dict, device: torch.device
) -> dict:
    """One method in one mode: a warm-up run (compilation included), then the best of `cfg.repeats` runs."""
    config = SamplerConfig(steps=cfg.steps, bf16=cfg.bf16)
    if mode == "compile":
        # What SamplerConfig(compile=True) does (torch.compile of each model), with the benchmark's backend.
        # Dynamo's caches are emptied first: each method compiles as in its own sampling run, and guards of
        # earlier methods never pile up past dynamo's recompile limit (beyond it, it silently runs eager).
        torch._dynamo.reset()
        models = {k: torch.compile(m, backend=cfg.compile_backend) for k, m in models.items()}
    sampler = GuidedSampler(guidance, {k: m for k, m in models.items() if k in guidance.models}, config=config)
    labels = [i % cfg.num_classes for i in range(cfg.batch_size)]
    indices = range(cfg.batch_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    graphs = dynamo_graphs()
    t0 = time.perf_counter()
    sampler.sample_indices(indices, labels)  # compilation / warm-up
    sync(device)
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(cfg.repeats):
        t0 = time.perf_counter()
        sampler.sample_indices(indices, labels)
        sync(device)
        times.append(time.perf_counter() - t0)
    seconds = min(times)
    return {
        "method": name,
        "mode": mode,
        "nfe_per_step": guidance.nfe,
        "img_per_s": round(cfg.batch_size / seconds, 3),
        "image_steps_per_s": round(cfg.batch_size * cfg.steps / seconds, 1),
        "ms_per_step": round(1000 * seconds / cfg.steps, 2),
        "seconds": round(seconds, 3),
        "warmup_s": round(warmup_s, 1),
        "graphs_compiled": dynamo_graphs() - graphs,
        "peak_mem_gib": peak_memory_gib(device),
    }


def run(
    cfg: SamplingBench, device: str = "cuda", budget: Budget | None = None, report: Report | None = None
) -> list[dict]:
    """Every (mode, method) of `cfg` that fits `budget`, in order (put the methods that matter most
    first: the GPU run starts with cfg, erg). The estimate for a method: 1 + repeats runs at the last
    measured run time (scaled by NFE), plus, compiled, the longest compilation seen so far (warm-up run
    minus a timed run) or `cfg.compile_s` before any."""
    device, _ = setup_device(device)
    budget = budget or Budget()

    def model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        with device:
            dit = build_dit(
                cfg.arch, depth=cfg.depth, input_size=cfg.input_size, in_channels=cfg.channels,
                num_classes=cfg.num_classes,
            )  # fmt: skip
        return dit.eval().requires_grad_(False)

    wanted = {mode: (cfg.compile_methods or cfg.methods) if mode == "compile" else cfg.methods for mode in cfg.modes}
    models = {"main": model(0)}
    if any("autoguidance" in methods for methods in wanted.values()):
        models["weak"] = model(1)
    results: list[dict] = []
    run_s: tuple[int, float] | None = None  # (NFE per step, seconds per run) of the last measured method
    compile_s = 0.0
    for mode in cfg.modes:
        for name in wanted[mode]:
            guidance = build_guidance(method_config(name, models["main"].depth))
            nfe = guidance.nfe
            est = run_s[1] * nfe / run_s[0] if run_s else 0.0
            extra = (compile_s or cfg.compile_s) if mode == "compile" else 0.0
            what = f"{1 + cfg.repeats} runs at ~{est:.1f} s" + (f" + compile ~{extra:.0f} s" if extra else "")
            row = {"method": name, "mode": mode, "nfe_per_step": nfe}
            reason = budget.skip_reason((1 + cfg.repeats) * est + extra, what)
            if reason:
                r = {**row, "skipped": reason}
            else:
                r = guarded(lambda a=(name, guidance, mode): bench_method(cfg, *a, models, device), row, device)
                if "seconds" in r:
                    run_s = (r["nfe_per_step"], r["seconds"])
                    if mode == "compile":
                        compile_s = max(compile_s, r["warmup_s"] - r["seconds"])
            print(json.dumps(r), flush=True)
            results.append(r)
            if report:
                report(results)
    return results


def ratios(results: list[dict]) -> dict[str, float]:
    """ERG / CFG wall time per mode."""
    out = {}
    for mode in dict.fromkeys(r["mode"] for r in results):
        by = {r["method"]: r for r in results if r["mode"] == mode and "seconds" in r}
        if "erg" in by and "cfg" in by:
            out[mode] = round(by["erg"]["seconds"] / by["cfg"]["seconds"], 3)
    return out


def markdown(results: list[dict], cfg: SamplingBench, device_name: str) -> str:
    arch = cfg.arch if cfg.depth is None else f"{cfg.arch} (depth {cfg.depth})"
    lines = [
        f"Sampling {arch} ({cfg.channels}x{cfg.input_size}x{cfg.input_size}), batch {cfg.batch_size}, "
        f"{cfg.steps} Euler steps, {'bf16 autocast' if cfg.bf16 else 'fp32'}, on **{device_name}** "
        f"(torch {torch.__version__}); best of {cfg.repeats} timed run(s) after one warm-up run (compilation "
        "included: its seconds are the warm-up column; graphs: those torch.compile captured for the method).",
        "",
        "| method | mode | NFE / step | img/s | image-steps/s | ms / step | peak memory (GiB) | warm-up (s) | graphs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "seconds" not in r:
            lines.append(f"| {r['method']} | {r['mode']} | {r['nfe_per_step']} | {r.get('skipped') or r.get('error')} "
                         "| | | | | |")  # fmt: skip
            continue
        mem = r["peak_mem_gib"] if r["peak_mem_gib"] is not None else "n/a"
        keys = ("method", "mode", "nfe_per_step", "img_per_s", "image_steps_per_s", "ms_per_step")
        cells = [*(r[k] for k in keys), mem, r["warmup_s"], r["graphs_compiled"] if r["mode"] == "compile" else ""]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    for mode, ratio in ratios(results).items():
        lines.append(f"\nERG / CFG wall time ({mode}): {ratio}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="DiT-XL/2")
    p.add_argument("--depth", type=int, default=None, help="override the preset's depth")
    p.add_argument("--input-size", type=int, default=32, help="latent size (256px / 8)")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--compile-methods", nargs="+", default=None, choices=METHODS, help="default: --methods")
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    p.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = p.parse_args(argv)

    cfg = config_from_args(SamplingBench, args)
    results = run(cfg, args.device)
    device_name = setup_device(args.device)[1]
    table = markdown(results, cfg, device_name)
    print(table)
    write_results(args.out, args.json, table, {"device": device_name, "ratios": ratios(results), "results": results})
    return results


if __name__ == "__main__":
    main()
