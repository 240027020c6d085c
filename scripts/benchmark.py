"""Training-step benchmark: images/s, model TFLOP/s, MFU and peak memory, eager vs torch.compile.

    python scripts/benchmark.py                                 # DiT-XL/2, 256px (32x32x4 latents), batch 64 and 128
    python scripts/benchmark.py --out docs/benchmarks/train.md  # also write the markdown table
    python scripts/benchmark.py --device cpu --arch DiT-S/8 --input-size 16 --batch-sizes 4 --steps 2   # smoke

One step is exactly what training does per batch (models/rectified_flow.py): the rectified-flow
loss (t, eps, label dropout, forward, MSE) under bf16 autocast, backward, fused AdamW, EMA update.
Lightning's loop overhead is not included. FLOPs per image and step = 3 x forward FLOPs (DiT-XL/2 at
256px: 3 x 237 GFLOPs); MFU divides by the GPU's dense bf16 peak (--peak-tflops, or a table of
known GPUs). `compile` mode also checks that the compiled forward matches the eager one.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.checkpoints import build_dit
from models.dit import dit_flops_per_forward
from models.ema import ema_update
from models.io import atomic_write_text
from models.rectified_flow import FlowConfig, RectifiedFlowModule

# Dense bf16 tensor-core peaks (TFLOP/s), from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.4, "A100": 312.0}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name:
        return PEAK_BF16_TFLOPS["H100 PCIe" if "PCIe" in name else "H100 NVL" if "NVL" in name else "H100 SXM"]
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_results(out: Path | None, json_path: Path | None, table: str, summary: dict) -> None:
    """The markdown table (--out) and the raw results (--json), each written atomically (a benchmark
    interrupted while writing never leaves half a table in docs/)."""
    if out:
        atomic_write_text(out, table)
    if json_path:
        atomic_write_text(json_path, json.dumps(summary, indent=2))


def setup_device(name: str) -> tuple[torch.device, str]:
    """The benchmark device (TF32 matmuls on CUDA, as training and sampling use them) and its name for the
    tables: the GPU's name, or the CPU's."""
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return device, torch.cuda.get_device_name(device)
    return device, f"CPU ({platform.processor() or platform.machine()})"


def bench_one(args: argparse.Namespace, batch_size: int, mode: str, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_dit(
        args.arch, input_size=args.input_size, in_channels=args.channels, num_classes=args.num_classes
    ).to(device)
    module = RectifiedFlowModule(model, flow=FlowConfig(label_dropout=0.1)).to(device)
    module.train()
    x = torch.randn(batch_size, args.channels, args.input_size, args.input_size, device=device)
    y = torch.randint(0, args.num_classes, (batch_size,), device=device)
    t_probe = torch.rand(batch_size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    if mode == "compile":
        model.compile()  # in place: the same parameters, so the eager twin below can share them
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=device.type == "cuda" or None)
    batch = {"x": x, "y": y}
    g = torch.Generator(device=device)

    def step(i: int) -> torch.Tensor:
        g.manual_seed(i)
        with autocast:
            loss = module.flow_loss(batch, g, drop_labels=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(module.ema, model, 0.9999)
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
    img_s = batch_size * args.steps / elapsed
    flops_per_img = 3 * dit_flops_per_forward(model)
    tflops = img_s * flops_per_img / 1e12
    peak = peak_tflops(device, args.peak_tflops)
    result = {
        "arch": args.arch,
        "input": f"{args.channels}x{args.input_size}x{args.input_size}",
        "batch_size": batch_size,
        "mode": mode,
        "precision": "bf16 autocast" if args.bf16 else "fp32",
        "img_per_s": round(img_s, 1),
        "step_ms": round(1000 * elapsed / args.steps, 2),
        "model_tflops": round(tflops, 1),
        "mfu": round(tflops / peak, 3) if peak else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "warmup_s": round(warmup_s, 1),
        "final_loss": float(loss.detach()),
    }
    if mode == "compile":  # same weights, compiled vs eager forward
        eager = build_dit(
            args.arch, input_size=args.input_size, in_channels=args.channels, num_classes=args.num_classes
        )
        eager.load_state_dict(model.state_dict())
        eager.to(device).eval()
        model.eval()
        with torch.no_grad(), autocast:
            compiled_out = model(x, t_probe, y).float()
            eager_out = eager(x, t_probe, y).float()
        del eager
        diff = (compiled_out - eager_out).abs().max().item()
        result["compiled_vs_eager_max_abs_diff"] = diff
        result["compiled_matches_eager"] = bool(torch.allclose(compiled_out, eager_out, atol=args.match_atol, rtol=0))
    return result


def markdown(results: list[dict], device_name: str) -> str:
    lines = [
        f"Training step of {results[0]['arch']} ({results[0]['input']} latents), {results[0]['precision']}, "
        f"fused AdamW + EMA, on **{device_name}** (torch {torch.__version__}).",
        "",
        "| batch | mode | img/s | step (ms) | model TFLOP/s | MFU | peak memory (GiB) | compiled == eager |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = r["peak_mem_gib"] if r["peak_mem_gib"] is not None else "n/a"
        same = (
            ""
            if r["mode"] == "eager"
            else f"{r['compiled_matches_eager']} (max diff {r['compiled_vs_eager_max_abs_diff']:.2e})"
        )
        cells = [r["batch_size"], r["mode"], r["img_per_s"], r["step_ms"], r["model_tflops"], mfu, mem, same]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="DiT-XL/2")
    p.add_argument("--input-size", type=int, default=32, help="latent size (256px / 8)")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    p.add_argument("--steps", type=int, default=30)
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
    for bs in args.batch_sizes:
        for mode in args.modes:
            r = bench_one(args, bs, mode, device)
            print(json.dumps(r), flush=True)
            results.append(r)
    table = markdown(results, device_name)
    print(table)
    write_results(args.out, args.json, table, {"device": device_name, "results": results})
    return results


if __name__ == "__main__":
    main()
