"""Appendix B.4 / Fig. 7: per block, the share of tokens whose max attention probability exceeds 0.95.

    python scripts/attention_blocks.py --checkpoint runs/quickstart/checkpoints/last.ckpt --out runs/analysis

Samples the model without guidance (Euler, `--steps`), and at the chosen times (`--times`, the paper
shows t = 0.3 and finds the same pattern at every step) re-evaluates the conditional prediction with
every block's attention captured. For each block: the share of (head, image query) pairs whose
largest attention probability (over keys) is above `--threshold`. Blocks with a low share mix many
tokens (the paper's middle regime): that is where I-ERG should act. The script suggests the longest
run of consecutive middle blocks whose share is below the mean over blocks, as [l_min, l_max). When
there is no regime to read (every block within 1 percentage point of the others, or no middle block
below the mean) it says so and suggests nothing.
Small models with few tokens rarely reach 0.95: lower `--threshold` (e.g. 0.5) to see their regimes.

Writes <out>/attention_blocks.csv (t, layer, share) and attention_blocks.png.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erg.attention import AttentionPlan, Capture, Site
from erg.guidance import build_guidance
from erg.guidance.base import Step
from erg.sampler import GuidedSampler, SamplerConfig
from models.generation import load_model


class MaxProbabilityShare:
    """An attention sink: per layer, how many (row, head, query) have max_k p > threshold."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.hits: dict[int, float] = {}
        self.total: dict[int, int] = {}

    def record(self, site: Site, probs: Tensor) -> None:
        above = probs.amax(dim=-1) > self.threshold  # (rows, heads, queries)
        self.hits[site.layer] = self.hits.get(site.layer, 0.0) + float(above.sum())
        self.total[site.layer] = self.total.get(site.layer, 0) + above.numel()

    def shares(self) -> dict[int, float]:
        return {layer: self.hits[layer] / self.total[layer] for layer in sorted(self.hits)}


REGIME_SPREAD = 0.01  # shares within 1 percentage point of each other: no regime to read


def suggest_layers(shares: list[float]) -> tuple[int, int] | None:
    """The longest run of consecutive middle blocks (not the first or the last) whose share is below
    the mean over blocks, as [l_min, l_max); ties go to the earliest run. None when the criterion is not
    met: the shares are all within `REGIME_SPREAD` of each other, or no middle block is below the mean."""
    if max(shares) - min(shares) < REGIME_SPREAD:
        return None
    mean = sum(shares) / len(shares)
    lo, hi = (1, len(shares) - 1) if len(shares) >= 3 else (0, len(shares))
    best, start = None, None
    for i in range(lo, hi + 1):
        below = i < hi and shares[i] < mean
        if below and start is None:
            start = i
        elif not below and start is not None:
            if best is None or i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    return best


def report(shares: list[float], suggestion: tuple[int, int] | None, threshold: float) -> str:
    """One line saying what the criterion gave: the suggested blocks, or why there are none."""
    if suggestion is not None:
        return f"suggested I-ERG blocks: guidance.image.layers=[{suggestion[0]},{suggestion[1]}]"
    if max(shares) - min(shares) < REGIME_SPREAD:
        return (
            f"no blocks suggested: no clear regime at threshold {threshold}, every block within "
            f"{REGIME_SPREAD:.0%} of the others; try a lower --threshold"
        )
    return "no blocks suggested: no middle block has a share below the mean over blocks"


def analyse(model: torch.nn.Module, labels: list[int] | None, times: list[float], steps: int, threshold: float,
            seed: int = 0) -> dict[float, dict[int, float]]:  # fmt: skip
    """{t: {layer: share}} at the sampling steps closest to `times`."""
    sampler = GuidedSampler(build_guidance({"method": "none"}), model, config=SamplerConfig(steps=steps))
    grid = [i / steps for i in range(steps)]
    wanted = {min(range(steps), key=lambda i: abs(grid[i] - t)): t for t in times}
    encoded = sampler.encode(labels)
    inputs = encoded[("main", sampler.guidance.branch("pos").condition.encoding)]
    layers = range(model.num_attention_layers)
    results: dict[float, dict[int, float]] = {}

    def watch(step: Step, v: Tensor) -> None:
        if step.index not in wanted:
            return
        sink = MaxProbabilityShare(threshold)
        with torch.no_grad():
            model(step.x, step.t, plan=AttentionPlan.single(Capture(sink), layers), **inputs)
        results[grid[step.index]] = sink.shares()

    n = len(labels) if labels is not None else 8
    sampler.sample_indices(range(n), labels, base_seed=seed, on_step=watch)
    return results


def plot(results: dict[float, dict[int, float]], path: Path, suggestion: tuple[int, int] | None,
         threshold: float) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for t, shares in sorted(results.items()):
        ax.plot(list(shares), [100 * s for s in shares.values()], marker="o", label=f"t = {t:.2f}")
    if suggestion is not None:
        ax.axvspan(suggestion[0] - 0.5, suggestion[1] - 0.5, color="tab:green", alpha=0.15,
                   label="suggested I-ERG blocks")  # fmt: skip
    ax.set_xlabel("block")
    ax.set_ylabel(f"tokens with max attention prob. > {threshold} (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint of this repo")
    p.add_argument("--out", type=Path, default=Path("runs/analysis"))
    p.add_argument("--times", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--per-class", type=int, default=4, help="samples per class (8 samples if unconditional)")
    p.add_argument("--max-classes", type=int, default=10)
    p.add_argument("--threshold", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    model, _ = load_model({"checkpoint": args.checkpoint})
    model = model.to(args.device)
    num_classes = getattr(model, "num_classes", 0)
    labels = (
        [c for c in range(min(num_classes, args.max_classes)) for _ in range(args.per_class)] if num_classes else None
    )
    results = analyse(model, labels, args.times, args.steps, args.threshold, args.seed)
    mean_shares = [
        sum(r[layer] for r in results.values()) / len(results) for layer in range(model.num_attention_layers)
    ]
    suggestion = suggest_layers(mean_shares)
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = args.out / "attention_blocks.csv", args.out / "attention_blocks.png"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["t", "layer", "share_max_prob_above_threshold"])
        for t, shares in sorted(results.items()):
            for layer, share in shares.items():
                writer.writerow([f"{t:.4f}", layer, f"{share:.6f}"])
    plot(results, png_path, suggestion, args.threshold)
    print(f"share per block (mean over t): {[round(s, 3) for s in mean_shares]}")
    print(report(mean_shares, suggestion, args.threshold))
    print(f"wrote {csv_path} and {png_path}")
    return {"results": results, "mean_shares": mean_shares, "suggestion": suggestion, "csv": csv_path, "png": png_path}


if __name__ == "__main__":
    main()
