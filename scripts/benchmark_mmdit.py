"""MMDiT training-step benchmark: images/s, model TFLOP/s, MFU and peak memory, eager vs torch.compile.

    python scripts/benchmark_mmdit.py                                   # SD3-style d12, d16, d24 at 256px, batch 128
    python scripts/benchmark_mmdit.py --out docs/benchmarks/train_mmdit_h100.md --json mmdit_h100.json
    python scripts/benchmark_mmdit.py --archs MMDiT-B/2 MMDiT-38x1536 --grad-checkpointing --batch-size 32
    python scripts/benchmark_mmdit.py --device cpu --archs MMDiT-d2 --input-size 8 --batch-size 2 \
        --context-tokens 4 --context-dim 16 --pooled-dim 8 --steps 1 --warmup 1 --modes eager --no-bf16   # smoke

Input: 256px images as SD3-VAE latents (16 x 32 x 32, patch 2: 256 image tokens). Text: precomputed
embeddings of SD3's shape by default (77 CLIP + 256 T5 = 333 tokens of width 4096, pooled 2048), random
tensors, as a run with cached text embeddings sees them; the frozen text encoders are not timed.

One step is what text-to-image training does per batch: logit-normal t (SD3), x_t = t x + (1 - t) eps,
velocity MSE under bf16 autocast, backward, fused AdamW, EMA update (no Lightning loop overhead).
FLOPs per image and step = 3 x forward FLOPs (`mmdit_flops_per_forward`: every matmul, attention
included); MFU divides by the GPU's dense bf16 peak (--peak-tflops, or scripts/benchmark.py's table).
With activation checkpointing the GPU does ~4/3 of these FLOPs; MFU still counts 3 x forward.
A configuration that runs out of GPU memory is reported as such and the others still run. Eager
configurations run first, then compiled ones (each compiled in place, as training does, and checked
against the eager forward of the same weights: relative L2 error within --match-tol).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erg.flow import interpolate, sample_timesteps, velocity_target
from models.dit import count_parameters
from models.ema import ema_copy, ema_update
from models.io import atomic_write_text
from models.mmdit import build_mmdit, mmdit_flops_per_forward
from scripts.benchmark import (
    Budget,
    Report,
    compare_outputs,
    compiled_cell,
    config_from_args,
    default_match_tol,
    dynamo_graphs,
    guarded,
    peak_memory_gib,
    peak_tflops,
    setup_device,
    sync,
)


@dataclass(frozen=True)
class MMDiTBench:
    """Sizes of the MMDiT training-step benchmark. compile_s: expected torch.compile time of one
    training graph, used only to decide whether a compiled item fits the budget."""

    archs: tuple[str, ...] = ("MMDiT-d12", "MMDiT-d16", "MMDiT-d24")
    input_size: int = 32
    channels: int = 16
    context_tokens: int = 333
    context_dim: int = 4096
    pooled_dim: int = 2048
    batch_size: int = 128
    modes: tuple[str, ...] = ("eager", "compile")
    grad_checkpointing: bool = False
    steps: int = 20
    warmup: int = 5
    bf16: bool = True
    peak_tflops: float | None = None
    match_tol: float | None = None
    compile_backend: str = "inductor"
    compile_s: float = 60.0


def _build(cfg: MMDiTBench, arch: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    with device:
        return build_mmdit(
            arch,
            input_size=cfg.input_size,
            in_channels=cfg.channels,
            context_dim=cfg.context_dim,
            pooled_dim=cfg.pooled_dim,
            grad_checkpointing=cfg.grad_checkpointing,
        )


def bench_one(cfg: MMDiTBench, arch: str, mode: str, device: torch.device) -> dict:
    model = _build(cfg, arch, device)
    model.train()
    ema = ema_copy(model)
    B = cfg.batch_size
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, cfg.channels, cfg.input_size, cfg.input_size, device=device, generator=g)
    context = torch.randn(B, cfg.context_tokens, cfg.context_dim, device=device, generator=g)
    pooled = torch.randn(B, cfg.pooled_dim, device=device, generator=g) if cfg.pooled_dim else None
    t_probe = torch.rand(B, device=device, generator=g)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    if mode == "compile":
        model.compile(backend=cfg.compile_backend)  # in place, as training does
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=device.type == "cuda" or None)

    def step(i: int) -> torch.Tensor:
        g.manual_seed(i)
        t = sample_timesteps(B, "logit_normal", generator=g, device=device)
        eps = torch.randn(x.shape, generator=g, device=device)
        with autocast:
            pred = model(interpolate(x, eps, t), t, context, pooled)
        loss = F.mse_loss(pred.float(), velocity_target(x, eps).float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, model, 0.9999)
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    graphs = dynamo_graphs()
    t0 = time.perf_counter()
    for i in range(cfg.warmup):
        step(i)
    sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(cfg.steps):
        loss = step(cfg.warmup + i)
    sync(device)
    elapsed = time.perf_counter() - t0
    img_s = B * cfg.steps / elapsed
    tflops = img_s * 3 * mmdit_flops_per_forward(model, cfg.context_tokens) / 1e12
    peak = peak_tflops(device, cfg.peak_tflops)
    result = {
        "arch": arch,
        "depth": model.depth,
        "hidden_size": model.hidden_size,
        "params_m": round(count_parameters(model) / 1e6, 1),
        "tokens": f"{model.grid[0] * model.grid[1]} image + {cfg.context_tokens} text",
        "batch_size": B,
        "mode": mode,
        "grad_checkpointing": cfg.grad_checkpointing,
        "precision": "bf16 autocast" if cfg.bf16 else "fp32",
        "img_per_s": round(img_s, 1),
        "step_ms": round(1000 * elapsed / cfg.steps, 2),
        "model_tflops": round(tflops, 1),
        "mfu": round(tflops / peak, 3) if peak else None,
        "peak_mem_gib": peak_memory_gib(device),
        "warmup_s": round(warmup_s, 1),
        "final_loss": loss.item(),
    }
    if mode == "compile":  # same weights and inputs; see scripts/benchmark.py (no recompilation, forward is eager)
        trained = dynamo_graphs()
        with autocast:
            compiled_out = model(x, t_probe, context, pooled).detach()
        with torch.no_grad(), autocast:
            eager_out = model.forward(x, t_probe, context, pooled)
        tol = cfg.match_tol if cfg.match_tol is not None else default_match_tol(cfg.bf16)
        result.update(compare_outputs(compiled_out, eager_out, tol))
        result.update(graphs_compiled=trained - graphs, check_recompiled=dynamo_graphs() > trained)
    return result


def run(
    cfg: MMDiTBench, device: str = "cuda", budget: Budget | None = None, report: Report | None = None
) -> list[dict]:
    """Every (mode, arch) that fits `budget`, eager ones first (so every depth gets a figure before
    compilation takes its time); a configuration that runs out of memory is reported as such. The
    estimate for an item: its steps at the same arch's eager step time, plus `cfg.compile_s` compiled."""
    device, _ = setup_device(device)
    budget = budget or Budget()
    results: list[dict] = []
    step_s: dict[str, float] = {}  # arch -> seconds per step, measured
    n_steps = cfg.warmup + cfg.steps + 2
    for mode in cfg.modes:
        for arch in cfg.archs:
            est = step_s.get(arch, 0.0)
            extra = cfg.compile_s if mode == "compile" else 0.0
            what = f"{n_steps} steps at ~{est:.2f} s" + (f" + compile ~{extra:.0f} s" if extra else "")
            row = {"arch": arch, "batch_size": cfg.batch_size, "mode": mode}
            reason = budget.skip_reason(n_steps * est + extra, what)
            if reason:
                r = {**row, "skipped": reason}
            else:
                r = guarded(lambda arch=arch, mode=mode: bench_one(cfg, arch, mode, device), row, device)
                if "step_ms" in r:
                    step_s.setdefault(arch, r["step_ms"] / 1000)
            print(json.dumps(r), flush=True)
            results.append(r)
            if report:
                report(results)
    return results


def markdown(results: list[dict], cfg: MMDiTBench, device_name: str) -> str:
    tol = cfg.match_tol if cfg.match_tol is not None else default_match_tol(cfg.bf16)
    lines = [
        f"MMDiT training step at {cfg.input_size * 8}px ({cfg.channels}x{cfg.input_size}x{cfg.input_size} latents, "
        f"{cfg.context_tokens} text tokens of width {cfg.context_dim}, pooled {cfg.pooled_dim}), "
        f"{'bf16 autocast' if cfg.bf16 else 'fp32'}, fused AdamW + EMA"
        f"{', activation checkpointing' if cfg.grad_checkpointing else ''}, on **{device_name}** "
        f"(torch {torch.__version__}); {cfg.steps} timed steps after {cfg.warmup} warm-up steps; compiled == eager: "
        f"relative L2 error of the forward <= {tol:g}.",
        "",
        "| model | depth x width | params (M) | batch | mode | img/s | step (ms) | model TFLOP/s | MFU "
        "| peak memory (GiB) | compiled == eager |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if "img_per_s" not in r:
            why = r.get("skipped") or r.get("error")
            lines.append(f"| {r['arch']} | | | {r['batch_size']} | {r['mode']} | {why} | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = r["peak_mem_gib"] if r["peak_mem_gib"] is not None else "n/a"
        same = "" if r["mode"] == "eager" else compiled_cell(r)
        cells = [
            r["arch"], f"{r['depth']} x {r['hidden_size']}", r["params_m"], r["batch_size"], r["mode"],
            r["img_per_s"], r["step_ms"], r["model_tflops"], mfu, mem, same,
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["MMDiT-d12", "MMDiT-d16", "MMDiT-d24"])
    p.add_argument("--input-size", type=int, default=32, help="latent size (256px / 8)")
    p.add_argument("--channels", type=int, default=16, help="latent channels (16: SD3 VAE)")
    p.add_argument("--context-tokens", type=int, default=333, help="text tokens (SD3: 77 CLIP + 256 T5)")
    p.add_argument("--context-dim", type=int, default=4096)
    p.add_argument("--pooled-dim", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU, for MFU")
    p.add_argument("--match-tol", type=float, default=None, help="compiled vs eager relative L2 tolerance")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    p.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = p.parse_args(argv)

    cfg = config_from_args(MMDiTBench, args)
    results = run(cfg, args.device)
    device_name = setup_device(args.device)[1]
    table = markdown(results, cfg, device_name)
    print(table)
    if args.out:
        atomic_write_text(args.out, table)
    if args.json:
        raw = {"device": device_name, "args": {k: str(v) for k, v in vars(args).items()}, "results": results}
        atomic_write_text(args.json, json.dumps(raw, indent=2))
    return results


if __name__ == "__main__":
    main()
