"""Rank scoring (paper, appendix A.1): how the paper picks one hyperparameter setting per method.

Within a pool of runs, every tracked metric is ranked (rank 1 = best; FID lower is better, every other
metric higher), ties share their average rank; a run's score is its mean rank over the metrics; each
method's best run is the one with the lowest mean rank (ties broken by run name, so the choice is
deterministic). The pool is the whole sweep by default (the paper's "global score"); `pool="method"`
ranks each method's runs among themselves instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

__all__ = ["HIGHER_IS_BETTER", "RankedRun", "best_per_method", "rank_runs"]

HIGHER_IS_BETTER = {
    "fid": False,
    "precision": True,
    "recall": True,
    "density": True,
    "coverage": True,
    "clip_score": True,
    "vqa_score": True,
}


@dataclass
class RankedRun:
    name: str
    method: str
    values: dict[str, float]
    ranks: dict[str, float]
    mean_rank: float


def _direction(metric: str) -> bool:
    if metric not in HIGHER_IS_BETTER:
        raise KeyError(f"no known direction for metric {metric!r}; known: {sorted(HIGHER_IS_BETTER)}")
    return HIGHER_IS_BETTER[metric]


def _rank_pool(
    names: list[str], values: dict[str, dict[str, float]], metrics: list[str]
) -> dict[str, dict[str, float]]:
    ranks: dict[str, dict[str, float]] = {n: {} for n in names}
    for metric in metrics:
        v = np.array([values[n][metric] for n in names], dtype=np.float64)
        if np.isnan(v).any():
            bad = [n for n, x in zip(names, v) if np.isnan(x)]
            raise ValueError(f"metric {metric} is NaN for run(s) {bad[:5]}")
        r = rankdata(-v if _direction(metric) else v, method="average")  # 1 = best
        for n, rank in zip(names, r):
            ranks[n][metric] = float(rank)
    return ranks


def rank_runs(
    values: dict[str, dict[str, float]], methods: dict[str, str], metrics: list[str], pool: str = "all"
) -> list[RankedRun]:
    """Rank runs {run: {metric: value}} (methods: {run: method}); returns them sorted by mean rank."""
    if not metrics:
        raise ValueError("rank scoring needs at least one metric")
    if pool not in ("all", "method"):
        raise ValueError(f"pool must be 'all' or 'method', got {pool!r}")
    for metric in metrics:
        _direction(metric)
        missing = [n for n in values if metric not in values[n]]
        if missing:
            raise ValueError(f"metric {metric} is missing for run(s) {missing[:5]}")
    groups = (
        [list(values)]
        if pool == "all"
        else [[n for n in values if methods[n] == m] for m in sorted(set(methods.values()))]
    )
    ranks: dict[str, dict[str, float]] = {}
    for names in groups:
        ranks.update(_rank_pool(names, values, metrics))
    out = [
        RankedRun(
            n, methods[n], {m: values[n][m] for m in metrics}, ranks[n], float(np.mean([ranks[n][m] for m in metrics]))
        )
        for n in values
    ]
    return sorted(out, key=lambda r: (r.mean_rank, r.name))


def best_per_method(ranked: list[RankedRun]) -> dict[str, RankedRun]:
    """{method: its run with the lowest mean rank} (ties: first by name)."""
    best: dict[str, RankedRun] = {}
    for run in sorted(ranked, key=lambda r: (r.mean_rank, r.name)):
        best.setdefault(run.method, run)
    return best
