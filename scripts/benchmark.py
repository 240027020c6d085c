"""Training-step benchmark: images/s, model TFLOP/s, MFU and peak memory, eager vs torch.compile.

    python scripts/benchmark.py                                 # DiT-XL/2, 256px (32x32x4 latents), batch 64 and 128
    python scripts/benchmark.py --out docs/benchmarks/train.md  # also write the markdown table
    python scripts/benchmark.py --device cpu --arch DiT-S/8 --input-size 16 --batch-sizes 4 --steps 2   # smoke

One step is exactly what training does per batch (models/rectified_flow.py): the rectified-flow
loss (t, eps, label dropout, forward, MSE) under bf16 autocast, backward, fused AdamW, EMA update.
Lightning's loop overhead is not included. FLOPs per image and step = 3 x forward FLOPs (DiT-XL/2 at
256px: 3 x 237 GFLOPs); MFU divides by the GPU's dense bf16 peak (--peak-tflops, or a table of
known GPUs). `compile` mode compiles the model in place, as training does (`model.compile()`), and
checks the compiled forward against the eager one on the same weights: relative L2 error within
`--match-tol` (default 3e-2 under bf16 autocast, 1e-4 in fp32).

This file also holds what every benchmark script shares: the device set-up, `Budget` (the seconds a
benchmark may spend; an item that would not fit is skipped with a line saying why), the compiled ==
eager comparison, the out-of-memory guard and the atomic writer. `scripts/benchmark_all.py` runs
every benchmark within one time budget through the `run` function each script exposes.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.checkpoints import build_dit
from models.dit import dit_flops_per_forward
from models.ema import ema_update
from models.io import atomic_write_text
from models.rectified_flow import FlowConfig, RectifiedFlowModule

# Dense bf16 tensor-core peaks (TFLOP/s), from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.4, "A100": 312.0}

Report = Callable[[Any], None]  # receives the results measured so far, after every item


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


class Budget:
    """The seconds a benchmark may still spend (None: no limit). Before each item (a batch size, a mode,
    a method) the benchmark estimates what it needs; one that would not fit is skipped with a line
    saying why, rather than cut off half-way."""

    def __init__(self, seconds: float | None = None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()

    def skip_reason(self, need_s: float, what: str) -> str | None:
        """None if `need_s` seconds fit, else the line that says why the item is skipped."""
        left = self.left()
        if need_s <= left:
            return None
        return f"skipped: needs ~{need_s:.0f} s ({what}), {max(left, 0.0):.0f} s left"


def default_match_tol(bf16: bool) -> float:
    """Relative L2 error allowed between compiled and eager outputs: bf16 autocast rounds every
    activation to 8 bits of mantissa (~0.4%), and inductor's fusions round at other places than eager
    does, so differences of ~1% over a deep stack are rounding, not a bug; fp32 agrees to ~1e-6."""
    return 3e-2 if bf16 else 1e-4


def compare_outputs(compiled: torch.Tensor, eager: torch.Tensor, tol: float) -> dict:
    """Compiled vs eager outputs of the same weights and inputs: ||c - e|| / ||e|| <= tol. An all-zero
    or non-finite eager output never matches (its relative error is not a number)."""
    c, e = compiled.detach().float(), eager.detach().float()
    rel = ((c - e).norm() / e.norm()).item()
    return {
        "compiled_vs_eager_rel_l2": rel,
        "compiled_vs_eager_max_abs_diff": (c - e).abs().max().item(),
        "eager_output_rms": e.square().mean().sqrt().item(),
        "match_tol": tol,
        "compiled_matches_eager": bool(rel <= tol),
    }


def guarded(fn: Callable[[], dict], row: dict, device: torch.device) -> dict:
    """fn(), with running out of GPU memory recorded in `row` instead of ending the benchmark; memory
    (and torch.compile's graphs) released afterwards so the next item starts clean."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        return {**row, "error": "out of GPU memory"}
    finally:
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def dynamo_graphs() -> int:
    """Graphs torch.compile has captured in this process so far (dynamo's own counter): tells how many
    graphs an item compiled, and that checking compiled == eager recompiled nothing."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def peak_memory_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def config_from_args(cls: type, args: argparse.Namespace):
    """A benchmark's config dataclass from parsed arguments of the same names (lists become tuples)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclass(frozen=True)
class TrainBench:
    """Sizes of the DiT training-step benchmark. depth: override of the preset's (tiny rehearsals);
    compile_s: expected torch.compile time of one training graph (forward + backward), used only to
    decide whether the compiled item fits the budget; compile_backend: torch.compile's backend
    (inductor; the CPU rehearsal uses `eager`, which traces the same graphs without generating code)."""

    arch: str = "DiT-XL/2"
    depth: int | None = None
    input_size: int = 32
    channels: int = 4
    num_classes: int = 1000
    batch_sizes: tuple[int, ...] = (64, 128)
    modes: tuple[str, ...] = ("eager", "compile")
    steps: int = 30
    warmup: int = 5
    bf16: bool = True
    peak_tflops: float | None = None
    match_tol: float | None = None
    compile_backend: str = "inductor"
    compile_s: float = 90.0


def bench_one(cfg: TrainBench, batch_size: int, mode: str, device: torch.device) -> dict:
    torch.manual_seed(0)
    with device:  # parameters initialised where they live (DiT-XL/2's 675M on a CPU take seconds)
        model = build_dit(
            cfg.arch, depth=cfg.depth, input_size=cfg.input_size, in_channels=cfg.channels, num_classes=cfg.num_classes
        )
        module = RectifiedFlowModule(model, flow=FlowConfig(label_dropout=0.1))
        x = torch.randn(batch_size, cfg.channels, cfg.input_size, cfg.input_size)
        y = torch.randint(0, cfg.num_classes, (batch_size,))
        t_probe = torch.rand(batch_size)
    module.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    if mode == "compile":
        model.compile(backend=cfg.compile_backend)  # in place, as training does (RectifiedFlowModule.configure_model)
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
    img_s = batch_size * cfg.steps / elapsed
    flops_per_img = 3 * dit_flops_per_forward(model)
    tflops = img_s * flops_per_img / 1e12
    peak = peak_tflops(device, cfg.peak_tflops)
    result = {
        "arch": cfg.arch if cfg.depth is None else f"{cfg.arch} (depth {cfg.depth})",
        "input": f"{cfg.channels}x{cfg.input_size}x{cfg.input_size}",
        "batch_size": batch_size,
        "mode": mode,
        "precision": "bf16 autocast" if cfg.bf16 else "fp32",
        "img_per_s": round(img_s, 1),
        "step_ms": round(1000 * elapsed / cfg.steps, 2),
        "model_tflops": round(tflops, 1),
        "mfu": round(tflops / peak, 3) if peak else None,
        "peak_mem_gib": peak_memory_gib(device),
        "warmup_s": round(warmup_s, 1),
        "final_loss": float(loss.detach()),
    }
    if mode == "compile":
        # Same weights, same inputs: the compiled call in training's grad mode and train flag (so the
        # training graph is reused, no recompilation), and model.forward, which nn.Module.compile leaves
        # eager (it wraps __call__ only). The weights have taken warmup + steps optimizer steps, so the
        # zero-initialised output layer of DiT (adaLN-Zero) no longer makes both outputs zero.
        trained = dynamo_graphs()
        with autocast:
            compiled_out = model(x, t_probe, y).detach()
        with torch.no_grad(), autocast:
            eager_out = model.forward(x, t_probe, y)
        tol = cfg.match_tol if cfg.match_tol is not None else default_match_tol(cfg.bf16)
        result.update(compare_outputs(compiled_out, eager_out, tol))
        result.update(graphs_compiled=trained - graphs, check_recompiled=dynamo_graphs() > trained)
    return result


def run(
    cfg: TrainBench, device: str = "cuda", budget: Budget | None = None, report: Report | None = None
) -> list[dict]:
    """Every (batch size, mode) of `cfg` that fits `budget`, in order; skipped and out-of-memory items
    are rows saying so. The estimate for an item: its steps at the last measured step time (scaled by
    batch size), plus `cfg.compile_s` for a compiled one."""
    device, _ = setup_device(device)
    budget = budget or Budget()
    results: list[dict] = []
    measured: tuple[int, float] | None = None  # (batch size, seconds per step) of the last measured item
    n_steps = cfg.warmup + cfg.steps + 2
    for bs in cfg.batch_sizes:
        for mode in cfg.modes:
            step_s = measured[1] * bs / measured[0] if measured else 0.0
            need = n_steps * step_s + (cfg.compile_s if mode == "compile" else 0.0)
            what = f"{n_steps} steps at ~{step_s:.2f} s" + (
                f" + compile ~{cfg.compile_s:.0f} s" if mode == "compile" else ""
            )
            row = {"batch_size": bs, "mode": mode}
            reason = budget.skip_reason(need, what)
            if reason:
                r = {**row, "skipped": reason}
            else:
                r = guarded(lambda bs=bs, mode=mode: bench_one(cfg, bs, mode, device), row, device)
                if "step_ms" in r:
                    measured = (bs, r["step_ms"] / 1000)
            print(json.dumps(r), flush=True)
            results.append(r)
            if report:
                report(results)
    return results


def markdown(results: list[dict], cfg: TrainBench, device_name: str) -> str:
    arch = cfg.arch if cfg.depth is None else f"{cfg.arch} (depth {cfg.depth})"
    tol = cfg.match_tol if cfg.match_tol is not None else default_match_tol(cfg.bf16)
    lines = [
        f"Training step of {arch} ({cfg.channels}x{cfg.input_size}x{cfg.input_size} latents), "
        f"{'bf16 autocast' if cfg.bf16 else 'fp32'}, fused AdamW + EMA, on **{device_name}** "
        f"(torch {torch.__version__}); {cfg.steps} timed steps after {cfg.warmup} warm-up steps; compiled == eager: "
        f"relative L2 error of the forward <= {tol:g}.",
        "",
        "| batch | mode | img/s | step (ms) | model TFLOP/s | MFU | peak memory (GiB) | compiled == eager |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if "img_per_s" not in r:
            lines.append(f"| {r['batch_size']} | {r['mode']} | {r.get('skipped') or r.get('error')} | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = r["peak_mem_gib"] if r["peak_mem_gib"] is not None else "n/a"
        same = "" if r["mode"] == "eager" else compiled_cell(r)
        cells = [r["batch_size"], r["mode"], r["img_per_s"], r["step_ms"], r["model_tflops"], mfu, mem, same]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def compiled_cell(r: dict) -> str:
    """The compiled == eager column: the verdict, the relative error, the graphs compiled for training."""
    again = ", recompiled for the check" if r.get("check_recompiled") else ""
    rel, graphs = r["compiled_vs_eager_rel_l2"], r["graphs_compiled"]
    return f"{r['compiled_matches_eager']} (rel. L2 {rel:.1e}; {graphs} graphs{again})"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="DiT-XL/2")
    p.add_argument("--depth", type=int, default=None, help="override the preset's depth")
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
    p.add_argument("--match-tol", type=float, default=None, help="compiled vs eager relative L2 tolerance")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    p.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = p.parse_args(argv)

    cfg = config_from_args(TrainBench, args)
    results = run(cfg, args.device)
    device_name = setup_device(args.device)[1]
    table = markdown(results, cfg, device_name)
    print(table)
    write_results(args.out, args.json, table, {"device": device_name, "results": results})
    return results


if __name__ == "__main__":
    main()
