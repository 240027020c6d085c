"""Appendix B.2 / Fig. 6: parallel and orthogonal norms of (pos - neg) w.r.t. pos along sampling, CFG vs I-ERG.

    python scripts/kickoff_analysis.py --checkpoint runs/quickstart/checkpoints/last.ckpt --layers 2 4

Samples with CFG (neg = null condition) and with I-ERG (neg = the same condition, rectified attention
in blocks [l_min, l_max), here at every step: kappa < 0) and records, per step, for d = pos - neg
(velocities, per sample, L2 over C, H, W):

    parallel   = |<d, pos>| / ||pos||          orthogonal = || d - (<d, pos> / ||pos||^2) pos ||

averaged over samples. The paper reads the kickoff kappa where CFG's parallel difference has
converged towards 0 (its orthogonal part then decreases almost linearly); the script suggests the
first t after the peak at which CFG's parallel norm falls below `--fraction` (10%) of its peak. When it
never does along the run, it says so and suggests nothing (read the plot, or rerun with more steps).

Writes <out>/kickoff.csv (method, step, t, parallel, orthogonal) and kickoff.png.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erg.guidance import build_guidance
from erg.guidance.base import Step
from erg.sampler import GuidedSampler, SamplerConfig
from models.generation import load_model


def decompose(pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample norms of the parts of pos - neg parallel and orthogonal to pos (float64)."""
    d, p = (pos - neg).double().flatten(1), pos.double().flatten(1)
    coef = (d * p).sum(1, keepdim=True) / (p * p).sum(1, keepdim=True).clamp_min(1e-24)
    parallel = coef * p
    return parallel.norm(dim=1), (d - parallel).norm(dim=1)


def trace(model: torch.nn.Module, guidance_cfg: dict, labels: list[int] | None, n: int, steps: int,
          seed: int) -> list[tuple[int, float, float, float]]:  # fmt: skip
    """[(step, t, mean parallel norm, mean orthogonal norm)] along one guided sampling run."""
    sampler = GuidedSampler(build_guidance(guidance_cfg), model, config=SamplerConfig(steps=steps))
    rows: list[tuple[int, float, float, float]] = []

    def record(step: Step, v: Tensor) -> None:
        par, orth = decompose(step.preds["pos"], step.preds["neg"])
        rows.append((step.index, step.time, float(par.mean()), float(orth.mean())))

    sampler.sample_indices(range(n), labels, base_seed=seed, on_step=record)
    return rows


def suggest_kappa(rows: list[tuple[int, float, float, float]], fraction: float) -> float | None:
    """The first t after CFG's parallel-norm peak at which it is below `fraction` of the peak; None when
    it never gets there along the run (the criterion is not met: no kickoff to suggest)."""
    parallel = [r[2] for r in rows]
    peak = max(range(len(parallel)), key=parallel.__getitem__)
    for _, t, par, _ in rows[peak:]:
        if par < fraction * parallel[peak]:
            return t
    return None


def report(rows: list[tuple[int, float, float, float]], fraction: float, kappa: float | None) -> str:
    """One line saying what the criterion gave: the suggested kappa, or that it was not met."""
    parallel = [r[2] for r in rows]
    peak = max(range(len(parallel)), key=parallel.__getitem__)
    if kappa is not None:
        return f"suggested kickoff: guidance.image.kappa={kappa:.2f} (CFG's parallel part < {fraction:.0%} of peak)"
    return (
        f"no kickoff suggested: CFG's parallel part peaked at {parallel[peak]:.4g} (t = {rows[peak][1]:.2f}) and "
        f"ended at {parallel[-1]:.4g} (t = {rows[-1][1]:.2f}), never below {fraction:.0%} of its peak; read the "
        "plot, or rerun with more --steps or another --fraction"
    )


def plot(curves: dict[str, list[tuple[int, float, float, float]]], path: Path, kappa: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, rows in curves.items():
        style = "-" if name == "cfg" else "--"
        t = [r[1] for r in rows]
        axes[0].plot(t, [r[2] for r in rows], style, label=name)
        axes[1].plot(t, [r[3] for r in rows], style, label=name)
    for ax, title in zip(axes, ("parallel to pos", "orthogonal to pos")):
        if kappa is not None:
            ax.axvline(kappa, color="grey", lw=0.8, ls=":")
        ax.set_title(f"||pos - neg|| {title}")
        ax.set_xlabel("t (0 noise, 1 data)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint of this repo")
    p.add_argument("--out", type=Path, default=Path("runs/analysis"))
    p.add_argument("--layers", type=int, nargs=2, default=[12, 15], help="I-ERG blocks [l_min, l_max)")
    p.add_argument("--tau", type=float, default=0.01)
    p.add_argument("--scale", type=float, default=3.0, help="guidance scale of both runs")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--per-class", type=int, default=4)
    p.add_argument("--max-classes", type=int, default=10)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    model, _ = load_model({"checkpoint": args.checkpoint})
    model = model.to(args.device)
    num_classes = getattr(model, "num_classes", 0)
    if not num_classes:
        raise SystemExit("CFG needs a conditional model: this checkpoint is unconditional")
    labels = [c for c in range(min(num_classes, args.max_classes)) for _ in range(args.per_class)]
    image = {"tau": args.tau, "layers": list(args.layers), "kappa": -1.0}
    methods = {
        "cfg": {"method": "cfg", "scale": args.scale},
        "i_erg": {"method": "erg", "scale": args.scale, "condition": "cond", "image": image},
    }
    curves = {name: trace(model, cfg, labels, len(labels), args.steps, args.seed) for name, cfg in methods.items()}
    kappa = suggest_kappa(curves["cfg"], args.fraction)
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = args.out / "kickoff.csv", args.out / "kickoff.png"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "step", "t", "parallel", "orthogonal"])
        for name, rows in curves.items():
            for step, t, par, orth in rows:
                writer.writerow([name, step, f"{t:.4f}", f"{par:.6g}", f"{orth:.6g}"])
    plot(curves, png_path, kappa)
    print(report(curves["cfg"], args.fraction, kappa))
    print(f"wrote {csv_path} and {png_path}")
    return {"curves": curves, "kappa": kappa, "csv": csv_path, "png": png_path}


if __name__ == "__main__":
    main()
