"""Pareto fronts of quality (density), diversity (coverage) and consistency (VQAScore or CLIPScore),
as the paper's Figure 2 (after Astolfi et al. 2024): one panel per pair of facets, every run a point
(marker = method, colour = guidance scale), the non-dominated points joined by a dashed line.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from eval.ranking import HIGHER_IS_BETTER
from eval.tables import METRIC_LABELS, method_label
from models.io import atomic_write_bytes

__all__ = ["facet_pairs", "pareto_mask", "plot_pareto_fronts"]

MARKERS = "o^sDvP*Xhp<>"


def pareto_mask(points: np.ndarray, maximize: list[bool]) -> np.ndarray:
    """(N, d) points -> (N,) True where no other point is at least as good everywhere and better somewhere."""
    p = np.asarray(points, dtype=np.float64) * np.where(maximize, 1.0, -1.0)  # now: larger is better
    ge = (p[:, None, :] >= p[None, :, :]).all(-1)  # ge[j, i]: j at least as good as i everywhere
    gt = (p[:, None, :] > p[None, :, :]).any(-1)
    dominated = (ge & gt).any(0)
    return ~dominated


def facet_pairs(metrics: list[str]) -> list[tuple[str, str]]:
    """Panels: (density, coverage), and (density, C), (coverage, C) for a consistency metric C if present."""
    pairs = []
    if {"density", "coverage"} <= set(metrics):
        pairs.append(("coverage", "density"))
    consistency = next((m for m in ("vqa_score", "clip_score") if m in metrics), None)
    if consistency:
        pairs += [(c, consistency) for c in ("density", "coverage") if c in metrics]
    return pairs


def plot_pareto_fronts(
    points: list[dict], pairs: list[tuple[str, str]], path: str | Path, title: str | None = None
) -> Path:
    """points: [{"method", "values": {metric: v}, "scale": float | None}] -> PNG with one panel per pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not pairs:
        raise ValueError("no facet pair to plot: need density and coverage (and VQAScore / CLIPScore) metrics")
    methods = list(dict.fromkeys(p["method"] for p in points))
    scales = [p.get("scale") for p in points if p.get("scale") is not None]
    norm = matplotlib.colors.Normalize(min(scales), max(scales)) if scales else None
    cmap = matplotlib.colormaps["viridis"]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.6 * len(pairs), 4.2), squeeze=False)
    for ax, (mx, my) in zip(axes[0], pairs):
        xy = np.array([[p["values"][mx], p["values"][my]] for p in points])
        for p, (x, y) in zip(points, xy):
            colour = cmap(norm(p["scale"])) if norm is not None and p.get("scale") is not None else "tab:gray"
            ax.scatter(x, y, marker=MARKERS[methods.index(p["method"]) % len(MARKERS)], color=colour, s=40,
                       edgecolors="black", linewidths=0.4)  # fmt: skip
        front = pareto_mask(xy, [HIGHER_IS_BETTER[mx], HIGHER_IS_BETTER[my]])
        order = np.argsort(xy[front, 0])
        ax.plot(xy[front, 0][order], xy[front, 1][order], "k--", linewidth=1.0)
        ax.set_xlabel(METRIC_LABELS.get(mx, mx))
        ax.set_ylabel(METRIC_LABELS.get(my, my))
        ax.grid(alpha=0.3)
    handles = [
        plt.Line2D([], [], linestyle="", marker=MARKERS[i % len(MARKERS)], color="tab:gray", markeredgecolor="black",
                   label=method_label(m))
        for i, m in enumerate(methods)
    ]  # fmt: skip
    axes[0][-1].legend(handles=handles, fontsize=8, loc="best")
    if norm is not None:
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes[0].tolist(), label="guidance scale")
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
