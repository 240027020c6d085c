"""Appendix B.1 / Fig. 5, eqs. (13)-(14): variance of the initial velocity (t = 0) across noises.

    python scripts/initial_velocity.py --checkpoint runs/quickstart/checkpoints/last.ckpt --layers 2 4

For each guidance method's negative branch, at t = 0 over `--noises` noises (the paper: 20) and the
conditions (classes):

    marginal variance     Var_{eps, c} [ v_neg(eps, c, t=0) ]                      (eq. 13)
    conditional variance  Var_{eps} [ v(eps, c, t=0) - v_neg(eps, c, t=0) ]       (eq. 14, averaged over c)

per location (channel, pixel). Methods compared: CFG (neg = null condition), C-ERG (neg = the
C-ERG-encoded condition; on models without a text encoder there is nothing to rectify and neg is the
condition itself, so its conditional variance is 0) and I-ERG (neg = the condition with rectified
attention in blocks [l_min, l_max)).

Writes <out>/initial_velocity.csv (method, location, marginal, conditional) and a PNG with the two
histograms.
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
from erg.sampling import sample_noise, sample_seed
from models.generation import load_model


def initial_velocities(model: torch.nn.Module, guidance_cfg: dict, labels: list[int] | None, noises: int,
                       seed: int) -> tuple[Tensor, Tensor]:  # fmt: skip
    """pos and neg velocities at t = 0: (conditions, noises, C, H, W) each; noise j is the same for every condition."""
    sampler = GuidedSampler(build_guidance(guidance_cfg), model, config=SamplerConfig(steps=1))
    shape = (model.in_channels, model.input_size, model.input_size)
    conds = labels if labels is not None else [None]
    pos, neg = [], []
    for c in conds:
        eps = sample_noise(range(noises), shape, base_seed=seed, device=sampler.device)
        batch = [c] * noises if c is not None else None
        step = Step(0, 0.0, torch.zeros(noises, device=sampler.device), eps)
        with torch.no_grad():
            sampler.evaluate(step, sampler.encode(batch), [sample_seed(seed, j) for j in range(noises)])
        pos.append(step.preds["pos"].cpu())
        neg.append(step.preds["neg"].cpu())
    return torch.stack(pos).double(), torch.stack(neg).double()


def variances(pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
    """Per location: marginal Var over (condition, noise) of neg; conditional Var over noise of pos - neg,
    averaged over conditions. Inputs (conditions, noises, C, H, W); outputs (C * H * W,)."""
    marginal = neg.flatten(0, 1).var(dim=0).flatten()
    conditional = (pos - neg).var(dim=1).mean(dim=0).flatten()
    return marginal, conditional


def plot(stats: dict[str, tuple[Tensor, Tensor]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, (marginal, conditional) in stats.items():
        axes[0].hist(marginal.numpy(), bins=40, alpha=0.5, label=name)
        axes[1].hist(conditional.numpy(), bins=40, alpha=0.5, label=name)
    axes[0].set_title("marginal variance of v_neg at t = 0 (eq. 13)")
    axes[1].set_title("conditional variance of v - v_neg (eq. 14)")
    for ax in axes:
        ax.set_xlabel("variance per location")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint of this repo")
    p.add_argument("--out", type=Path, default=Path("runs/analysis"))
    p.add_argument("--noises", type=int, default=20)
    p.add_argument("--max-classes", type=int, default=10)
    p.add_argument("--layers", type=int, nargs=2, default=[12, 15], help="I-ERG blocks [l_min, l_max)")
    p.add_argument("--tau", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    model, _ = load_model({"checkpoint": args.checkpoint})
    model = model.to(args.device)
    num_classes = getattr(model, "num_classes", 0)
    if not num_classes:
        raise SystemExit("the negative branches compared here need a conditional model")
    labels = list(range(min(num_classes, args.max_classes)))
    image = {"tau": args.tau, "layers": list(args.layers), "kappa": -1.0}  # active at t = 0
    methods = {
        "cfg": {"method": "cfg", "scale": 2.0},
        "c_erg": {"method": "erg", "scale": 2.0, "condition": "c_erg", "image": None},
        "i_erg": {"method": "erg", "scale": 2.0, "condition": "cond", "image": image},
    }
    stats = {name: variances(*initial_velocities(model, cfg, labels, args.noises, args.seed))
             for name, cfg in methods.items()}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = args.out / "initial_velocity.csv", args.out / "initial_velocity.png"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "location", "marginal_variance", "conditional_variance"])
        for name, (marginal, conditional) in stats.items():
            for i, (m, c) in enumerate(zip(marginal.tolist(), conditional.tolist())):
                writer.writerow([name, i, f"{m:.6g}", f"{c:.6g}"])
    plot(stats, png_path)
    for name, (marginal, conditional) in stats.items():
        m, c = marginal.median(), conditional.median()
        print(f"{name:6s} median marginal variance {m:.4g}, median conditional variance {c:.4g}")
    print(f"wrote {csv_path} and {png_path}")
    return {"stats": stats, "csv": csv_path, "png": png_path}


if __name__ == "__main__":
    main()
