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
A configuration that runs out of GPU memory is reported as such and the others still run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erg.flow import interpolate, sample_timesteps, velocity_target
from models.dit import count_parameters
from models.ema import ema_copy, ema_update
from models.io import atomic_write_text
from models.mmdit import build_mmdit, mmdit_flops_per_forward
from scripts.benchmark import peak_tflops, setup_device, sync


def _build(args: argparse.Namespace, arch: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_mmdit(
        arch,
        input_size=args.input_size,
        in_channels=args.channels,
        context_dim=args.context_dim,
        pooled_dim=args.pooled_dim,
        grad_checkpointing=args.grad_checkpointing,
    ).to(device)


def bench_one(args: argparse.Namespace, arch: str, mode: str, device: torch.device) -> dict:
    model = _build(args, arch, device)
    model.train()
    ema = ema_copy(model)
    B = args.batch_size
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, args.channels, args.input_size, args.input_size, device=device, generator=g)
    context = torch.randn(B, args.context_tokens, args.context_dim, device=device, generator=g)
    pooled = torch.randn(B, args.pooled_dim, device=device, generator=g) if args.pooled_dim else None
    t_probe = torch.rand(B, device=device, generator=g)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    if mode == "compile":
        model.compile()  # in place: same parameters, so the eager twin below can load them
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
    t0 = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(args.warmup + i)
    sync(device)
    elapsed = time.perf_counter() - t0
    img_s = B * args.steps / elapsed
    tflops = img_s * 3 * mmdit_flops_per_forward(model, args.context_tokens) / 1e12
    peak = peak_tflops(device, args.peak_tflops)
    result = {
        "arch": arch,
        "depth": model.depth,
        "hidden_size": model.hidden_size,
        "params_m": round(count_parameters(model) / 1e6, 1),
        "tokens": f"{model.grid[0] * model.grid[1]} image + {args.context_tokens} text",
        "batch_size": B,
        "mode": mode,
        "grad_checkpointing": args.grad_checkpointing,
        "precision": "bf16 autocast" if args.bf16 else "fp32",
        "img_per_s": round(img_s, 1),
        "step_ms": round(1000 * elapsed / args.steps, 2),
        "model_tflops": round(tflops, 1),
        "mfu": round(tflops / peak, 3) if peak else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "warmup_s": round(warmup_s, 1),
        "final_loss": loss.item(),
    }
    if mode == "compile":  # same weights, compiled vs eager forward
        eager = _build(args, arch, device)
        eager.load_state_dict(model.state_dict())
        eager.eval()
        model.eval()
        with torch.no_grad(), autocast:
            diff = (model(x, t_probe, context, pooled).float() - eager(x, t_probe, context, pooled).float()).abs()
        result["compiled_vs_eager_max_abs_diff"] = diff.max().item()
        result["compiled_matches_eager"] = bool(diff.max().item() <= args.match_atol)
    return result


def run_one(args: argparse.Namespace, arch: str, mode: str, device: torch.device) -> dict:
    """bench_one, with an out-of-memory configuration reported instead of ending the run."""
    try:
        return bench_one(args, arch, mode, device)
    except torch.cuda.OutOfMemoryError:
        return {"arch": arch, "batch_size": args.batch_size, "mode": mode, "error": "out of GPU memory"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def markdown(results: list[dict], args: argparse.Namespace, device_name: str) -> str:
    lines = [
        f"MMDiT training step at {args.input_size * 8}px ({args.channels}x{args.input_size}x{args.input_size} latents, "
        f"{args.context_tokens} text tokens of width {args.context_dim}, pooled {args.pooled_dim}), "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}, fused AdamW + EMA"
        f"{', activation checkpointing' if args.grad_checkpointing else ''}, on **{device_name}** "
        f"(torch {torch.__version__}).",
        "",
        "| model | depth x width | params (M) | batch | mode | img/s | step (ms) | model TFLOP/s | MFU "
        "| peak memory (GiB) | compiled == eager |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['arch']} | | | {r['batch_size']} | {r['mode']} | {r['error']} | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = r["peak_mem_gib"] if r["peak_mem_gib"] is not None else "n/a"
        same = (
            ""
            if r["mode"] == "eager"
            else f"{r['compiled_matches_eager']} (max diff {r['compiled_vs_eager_max_abs_diff']:.2e})"
        )
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
    p.add_argument("--match-atol", type=float, default=0.05, help="compiled vs eager tolerance (bf16)")
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    p.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = p.parse_args(argv)

    device, device_name = setup_device(args.device)
    results = []
    for arch in args.archs:
        for mode in args.modes:
            r = run_one(args, arch, mode, device)
            print(json.dumps(r), flush=True)
            results.append(r)
    table = markdown(results, args, device_name)
    print(table)
    if args.out:
        atomic_write_text(args.out, table)
    if args.json:
        raw = {"device": device_name, "args": {k: str(v) for k, v in vars(args).items()}, "results": results}
        atomic_write_text(args.json, json.dumps(raw, indent=2))
    return results


if __name__ == "__main__":
    main()
