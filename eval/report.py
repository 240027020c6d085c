"""From a sweep folder to the paper's outputs: ranked runs, the best run per method (rank scoring),
tables in the paper's layout (markdown + LaTeX), Pareto fronts and an image grid across methods.
The body of scripts/make_tables.py.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.ranking import RankedRun, best_per_method, rank_runs
from eval.records import METRICS_FILE, select_metrics
from eval.runs import Run, find_runs
from eval.tables import (
    COMBINATIONS,
    METRIC_ORDER,
    Row,
    ablation_latex,
    ablation_markdown,
    format_value,
    method_label,
    method_sort_key,
    table_latex,
    table_markdown,
)
from models.io import atomic_write_text

__all__ = ["Report", "ReportOptions", "build_report", "write_report"]


@dataclass
class ReportOptions:
    metrics: list[str] | None = None  # default: every metric all runs share under one protocol
    match: str | None = None  # keep only protocols containing this text
    method_key: str = "guidance.name"
    scale_key: str = "guidance.scale"
    group_by: str | None = None  # config key splitting the pool, e.g. data.image_size (Table 3's Res.)
    group_name: str = "Res."
    pool: str = "all"  # rank within the whole pool (paper) or within each method
    layout: str = "methods"  # methods (Tables 1-3) | ablation (Table 5, transposed)
    params: list[str] = field(default_factory=list)  # config keys shown as rows of the ablation layout
    nfe: dict[str, int] = field(default_factory=dict)  # method -> NFE, where the configs do not say
    nfe_column: bool = True
    runs: list[str] | None = None  # only these runs (sub-folder names); default: every run of the folder
    settings: str | None = None  # only records of these evaluation settings (eval.evaluate.settings_digest)


@dataclass
class Report:
    runs: list[Run]
    metrics: list[str]
    protocols: dict[str, str]
    ranked: dict[Any, list[RankedRun]]  # group -> runs by mean rank
    best: dict[Any, dict[str, RankedRun]]  # group -> method -> best run
    rows: list[Row]
    markdown: str
    latex: str
    ranking_markdown: str


def _group_of(run: Run, key: str | None) -> Any:
    return run.param(key) if key else None


def _nfe(run: Run, overrides: dict[str, int]) -> int | None:
    return overrides.get(run.method, run.nfe())


def build_report(sweep: str | Path, opts: ReportOptions | None = None) -> Report:
    opts = opts or ReportOptions()
    runs = find_runs(sweep, opts.method_key)
    if opts.runs is not None:
        missing = sorted(set(opts.runs) - {r.name for r in runs})
        if missing:
            raise FileNotFoundError(f"no {METRICS_FILE} for run(s) {missing[:5]} under {sweep}: evaluate them first")
        runs = [r for r in runs if r.name in set(opts.runs)]
    if opts.settings is not None:
        for r in runs:
            r.records = {k: rec for k, rec in r.records.items() if rec.get("settings") == opts.settings}
    values, protocols = select_metrics({r.name: r.records for r in runs}, opts.metrics, opts.match)
    metrics = [m for m in METRIC_ORDER if m in protocols] + [m for m in protocols if m not in METRIC_ORDER]
    if not metrics:
        raise ValueError(f"no metric shared by all runs of {sweep} under one protocol")
    by_name = {r.name: r for r in runs}
    for r in runs:
        r.values = values[r.name]
    groups = sorted({_group_of(r, opts.group_by) for r in runs}, key=lambda g: (g is None, str(g)))
    ranked, best = {}, {}
    for g in groups:
        members = [r for r in runs if _group_of(r, opts.group_by) == g]
        ranked[g] = rank_runs(
            {r.name: r.values for r in members}, {r.name: r.method for r in members}, metrics, opts.pool
        )
        best[g] = best_per_method(ranked[g])
    rows = []
    for g in groups:
        for method in sorted(best[g], key=method_sort_key):
            run = by_name[best[g][method].name]
            rows.append(Row(
                label=method_label(method), values=run.values, nfe=_nfe(run, opts.nfe),
                section=1 if method in COMBINATIONS else 0, group=g,
                extra={p: run.param(p) for p in opts.params} | {"run": run.name},
            ))  # fmt: skip
    rows.sort(key=lambda r: (groups.index(r.group), r.section))  # combinations after the rest, per group
    group_name = opts.group_name if opts.group_by else None
    nfe = opts.nfe_column and any(r.nfe is not None for r in rows)
    if opts.layout == "ablation":
        markdown = ablation_markdown(rows, metrics, opts.params)
        latex = ablation_latex(rows, metrics, opts.params, caption="Best setting per method (rank scoring).")
    elif opts.layout == "methods":
        markdown = table_markdown(rows, metrics, nfe=nfe, group_name=group_name)
        latex = table_latex(rows, metrics, nfe=nfe, group_name=group_name,
                            caption="Best setting per method by mean rank over the pool (appendix A.1).")  # fmt: skip
    else:
        raise ValueError(f"layout must be 'methods' or 'ablation', got {opts.layout!r}")
    return Report(
        runs, metrics, protocols, ranked, best, rows, markdown, latex, _ranking_markdown(ranked, metrics, by_name)
    )


def _short_params(run: Run, limit: int = 60) -> str:
    text = ", ".join(f"{k}={v}" for k, v in sorted(run.params().items()) if not isinstance(v, dict | list))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _ranking_markdown(ranked: dict[Any, list[RankedRun]], metrics: list[str], runs: dict[str, Run]) -> str:
    grouped = any(g is not None for g in ranked)
    head = [*(["Group"] if grouped else []), "Run", "Method", "Parameters", *metrics, "Mean rank"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for g, group_runs in ranked.items():
        for r in group_runs:
            cells = [f"{format_value(m, r.values[m])} ({r.ranks[m]:g})" for m in metrics]
            name = [*([str(g)] if grouped else []), r.name, method_label(r.method), _short_params(runs[r.name])]
            lines.append("| " + " | ".join([*name, *cells, f"{r.mean_rank:.2f}"]) + " |")
    return "\n".join(lines)


def write_report(
    report: Report, out_dir: str | Path, scale_key: str = "guidance.scale", grid: int = 8
) -> dict[str, Path]:
    """table.md, table.tex, ranking.md, ranks.csv, summary.json, pareto.png (when density and coverage
    exist) and grid.png (best run per method, when the runs hold samples) under `out_dir`."""
    from eval.pareto import facet_pairs, plot_pareto_fronts

    out = Path(out_dir)
    paths = {
        "table_md": atomic_write_text(out / "table.md", report.markdown + "\n"),
        "table_tex": atomic_write_text(out / "table.tex", report.latex + "\n"),
        "ranking_md": atomic_write_text(out / "ranking.md", report.ranking_markdown + "\n"),
    }
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["group", "run", "method", *report.metrics, *(f"rank_{m}" for m in report.metrics), "mean_rank"])
    for g, runs in report.ranked.items():
        for r in runs:
            writer.writerow([g, r.name, r.method, *(r.values[m] for m in report.metrics),
                             *(r.ranks[m] for m in report.metrics), r.mean_rank])  # fmt: skip
    paths["ranks_csv"] = atomic_write_text(out / "ranks.csv", buf.getvalue())
    summary = {
        "metrics": report.metrics,
        "protocols": report.protocols,
        "best": {str(g): {m: r.name for m, r in best.items()} for g, best in report.best.items()},
    }
    paths["summary"] = atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    by_name = {r.name: r for r in report.runs}
    pairs = facet_pairs(report.metrics)
    if pairs:
        points = [{"method": r.method, "values": r.values, "scale": _float(r.param(scale_key))} for r in report.runs]
        paths["pareto"] = plot_pareto_fronts(points, pairs, out / "pareto.png")
    best_rows = [(row.label, by_name[row.extra["run"]].path) for row in report.rows]
    if grid > 0 and best_rows and all((p / "store.json").is_file() for _, p in best_rows):
        from eval.grids import method_grid

        groups = {row.group for row in report.rows}
        labels = [
            (f"{row.label} ({row.group})" if len(groups) > 1 else row.label, p)
            for row, (_, p) in zip(report.rows, best_rows)
        ]
        paths["grid"] = method_grid(labels, out / "grid.png", num=grid)
    return paths


def _float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
