"""Tables in the layout of the paper (markdown and LaTeX).

Tables 1-3: methods as rows, metrics as columns with their direction, an NFE column, the best value of
each column in bold. Table 1's bottom part (combinations such as ERG + APG) is a second section whose
values are bold only where they beat the best of the top part (the paper's caption rule). Table 3
groups rows by resolution (a `Res.` column): bold is decided within each group. Table 5 is the
transposed layout (`ablation_*`): one column per setting, hyperparameter rows, then metric rows.

Precision, recall, density, coverage and VQAScore are printed x100, as in the paper; FID and CLIPScore
(already 100 * cos) as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from eval.ranking import HIGHER_IS_BETTER

__all__ = [
    "METHOD_LABELS",
    "METHOD_ORDER",
    "METRIC_LABELS",
    "Row",
    "ablation_latex",
    "ablation_markdown",
    "format_value",
    "method_label",
    "table_latex",
    "table_markdown",
]

METRIC_ORDER = ("fid", "precision", "recall", "density", "coverage", "clip_score", "vqa_score")
METRIC_LABELS = {
    "fid": "FID",
    "precision": "Precision",
    "recall": "Recall",
    "density": "Density",
    "coverage": "Coverage",
    "clip_score": "CLIPScore",
    "vqa_score": "VQAScore",
}
PERCENT = {"precision", "recall", "density", "coverage", "vqa_score"}

# configs/guidance/<name>.yaml names -> the paper's labels, in the paper's row order (Tables 1-3).
METHOD_LABELS = {
    "none": "No guidance",
    "cfg": "CFG",
    "apg": "APG",
    "cads": "CADS",
    "pag": "PAG*",
    "sag": "SAG*",
    "seg": "SEG*",
    "autoguidance": "AutoGuidance",
    # guiders of the ecosystem (not in the paper's tables): erg/guidance/{cfg_zero_star,slg,fdg,tcfg,mambo_g}.py
    "cfg_zero_star": "CFG-Zero*",
    "slg": "SLG",
    "fdg": "FDG",
    "tcfg": "TCFG",
    "mambo_g": "MAMBO-G",
    "cfg_interval": "CFG, interval",
    "c_erg": "C-ERG",
    "i_erg": "I-ERG",
    "erg": "ERG",
    "erg_alpha": "ERG, alpha != 1",  # Table 5's last column: + energy reweighting
    "erg_apg": "ERG + APG",
    "erg_cads": "ERG + CADS",
}
METHOD_ORDER = list(METHOD_LABELS)
COMBINATIONS = {"erg_apg", "erg_cads"}  # Table 1's bottom part


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def method_sort_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def format_value(metric: str, value: float | None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.2f}" if metric in PERCENT else f"{value:.2f}"


def _header(metric: str) -> str:
    arrow = "↑" if HIGHER_IS_BETTER.get(metric, True) else "↓"
    return f"{METRIC_LABELS.get(metric, metric)} ({arrow})"


@dataclass
class Row:
    label: str
    values: dict[str, float]
    nfe: int | None = None
    section: int = 0  # 0: compared among themselves; >0: bold only where they beat section 0
    group: Any = None  # e.g. the resolution of Table 3
    extra: dict[str, Any] = field(default_factory=dict)


def _better(metric: str, a: float, b: float) -> bool:
    return a > b if HIGHER_IS_BETTER.get(metric, True) else a < b


def _bold_cells(rows: list[Row], metrics: list[str], nfe: bool) -> set[tuple[int, str]]:
    """(row index, column) pairs to print in bold (the displayed, rounded values decide ties)."""
    bold: set[tuple[int, str]] = set()
    columns = [*metrics, *(["nfe"] if nfe else [])]
    for group in dict.fromkeys(r.group for r in rows):
        idx = [i for i, r in enumerate(rows) if r.group == group]
        for col in columns:

            def value(i: int, col: str = col) -> float | None:
                v = rows[i].nfe if col == "nfe" else rows[i].values.get(col)
                if v is None:
                    return None
                return float(format_value(col, v)) if col != "nfe" else float(v)

            metric = "fid" if col == "nfe" else col  # NFE: lower is better, like FID
            top = [i for i in idx if rows[i].section == 0 and value(i) is not None]
            if not top:
                continue
            best = value(top[0])
            for i in top[1:]:
                if _better(metric, value(i), best):
                    best = value(i)
            bold |= {(i, col) for i in top if value(i) == best}
            bold |= {
                (i, col)
                for i in idx
                if rows[i].section > 0 and value(i) is not None and _better(metric, value(i), best)
            }
    return bold


def _cells(rows: list[Row], metrics: list[str], nfe: bool, bold_fmt: str) -> list[list[str]]:
    bold = _bold_cells(rows, metrics, nfe)
    out = []
    for i, row in enumerate(rows):
        cells = []
        for col in [*metrics, *(["nfe"] if nfe else [])]:
            text = (
                (str(row.nfe) if row.nfe is not None else "–")
                if col == "nfe"
                else format_value(col, row.values.get(col))
            )
            cells.append(bold_fmt.format(text) if (i, col) in bold else text)
        out.append(cells)
    return out


def _group_labels(rows: list[Row]) -> list[str]:
    labels, previous = [], object()
    for row in rows:
        labels.append("" if row.group == previous else str(row.group))
        previous = row.group
    return labels


def table_markdown(rows: list[Row], metrics: list[str], nfe: bool = True, group_name: str | None = None) -> str:
    """Paper-style markdown table (Tables 1-3)."""
    metrics = list(metrics)
    head = ["Method", *([group_name] if group_name else []), *map(_header, metrics), *(["NFE (↓)"] if nfe else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    groups = _group_labels(rows) if group_name else [""] * len(rows)
    for row, group, cells in zip(rows, groups, _cells(rows, metrics, nfe, "**{}**")):
        lines.append("| " + " | ".join([row.label, *([group] if group_name else []), *cells]) + " |")
    return "\n".join(lines)


def _tex(text: str) -> str:
    return (
        text.replace("\\", r"\textbackslash{}").replace("&", r"\&").replace("%", r"\%").replace("_", r"\_")
        .replace("#", r"\#").replace("↑", r"$\uparrow$").replace("↓", r"$\downarrow$").replace("–", "--")
        .replace("✓", r"\checkmark").replace("✗", r"$\times$")
    )  # fmt: skip


def table_latex(
    rows: list[Row], metrics: list[str], nfe: bool = True, group_name: str | None = None, caption: str | None = None
) -> str:
    """The same table as LaTeX (booktabs); sections separated by \\midrule, as the paper's Table 1."""
    metrics = list(metrics)
    head = ["Method", *([group_name] if group_name else []), *map(_header, metrics), *(["NFE (↓)"] if nfe else [])]
    spec = "l" + ("c" if group_name else "") + "r" * (len(head) - 1 - (1 if group_name else 0))
    lines = [r"\begin{table}[t]", r"\centering"]
    if caption:
        lines.append(rf"\caption{{{_tex(caption)}}}")
    lines += [rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(map(_tex, head)) + r" \\", r"\midrule"]
    groups = _group_labels(rows) if group_name else [""] * len(rows)
    previous = None
    for row, group, cells in zip(rows, groups, _cells(rows, metrics, nfe, r"\textbf{{{}}}")):
        if previous is not None and (row.section, row.group) != previous:
            lines.append(r"\midrule")
        previous = (row.section, row.group)
        cells = [_tex(c) if not c.startswith(r"\textbf") else c.replace("–", "--") for c in cells]
        lines.append(" & ".join([_tex(row.label), *([_tex(group)] if group_name else []), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)


# --- Table 5: one column per setting ------------------------------------------------------------------
def _param_text(value: Any) -> str:
    return "✗" if value is None or value is False else ("✓" if value is True else str(value))


def _ablation_grid(columns: list[Row], metrics: list[str], params: list[str], bold_fmt: str) -> list[list[str]]:
    """Rows of the transposed table: [label, cell per column]. Bold = best per metric row."""
    grid = [[p, *(_param_text(c.extra.get(p)) for c in columns)] for p in params]
    for metric in metrics:
        shown = [float(format_value(metric, c.values[metric])) if metric in c.values else None for c in columns]
        present = [v for v in shown if v is not None]
        best = (max if HIGHER_IS_BETTER.get(metric, True) else min)(present) if present else None
        cells = [
            bold_fmt.format(format_value(metric, c.values.get(metric))) if v is not None and v == best
            else format_value(metric, c.values.get(metric))
            for c, v in zip(columns, shown)
        ]  # fmt: skip
        grid.append([_header(metric), *cells])
    return grid


def ablation_markdown(columns: list[Row], metrics: list[str], params: list[str]) -> str:
    head = ["", *(c.label for c in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in _ablation_grid(columns, metrics, params, "**{}**")]
    return "\n".join(lines)


def ablation_latex(columns: list[Row], metrics: list[str], params: list[str], caption: str | None = None) -> str:
    lines = [r"\begin{table}[t]", r"\centering"]
    if caption:
        lines.append(rf"\caption{{{_tex(caption)}}}")
    lines += [rf"\begin{{tabular}}{{l{'c' * len(columns)}}}", r"\toprule"]
    lines.append(" & ".join(["", *(_tex(c.label) for c in columns)]) + r" \\")
    lines.append(r"\midrule")
    for r in _ablation_grid(columns, metrics, params, r"\textbf{{{}}}"):
        lines.append(" & ".join([_tex(r[0]), *(x if x.startswith(r"\textbf") else _tex(x) for x in r[1:])]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)
