"""A sweep spec: the grid behind one of the paper's tables, as data (configs/paper/*.yaml) -> the points to run.

    shared:
      sample: {checkpoint: ..., prompts: ..., sampler: euler}     # sample.py overrides for every point
      evaluate: {benchmark: coco14}                                # evaluate.py overrides for every point
    rows:                                                          # one table row each
      <row>:
        guidance: erg_mmdit                                        # a configs/guidance/ config
        set: {guidance.image.alpha: 1.0}                           # fixed overrides of this row
        sweep: {guidance.scale: [2.0, 3.0], guidance.image.tau: [0.01, 0.1]}   # every combination is a point

Keys are the dotted keys of configs/sample.yaml (config groups by name, e.g. `sampler: euler`), exactly
what one would type after `python sample.py`; values are YAML (lists, mappings, numbers, strings with
`${oc.env:...}` interpolations). A row's name is its method's name in the tables: every point of the
row sets `guidance.name=<row>` (eval/runs.py reads the method from it, eval/tables.py labels it, e.g.
erg_apg -> "ERG + APG"). A point's folder is `<row>/<eval.sweep.point_name(its sweep values)>` (stable,
Hydra-safe). The sweep command runs every point with eval.sweep.run_point (sample.py, then evaluate.py).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.sweep import point_name

__all__ = ["Point", "hydra_value", "load_spec", "points"]

SPEC_KEYS = {"shared", "rows", "description"}
ROW_KEYS = {"guidance", "set", "sweep"}


@dataclass(frozen=True)
class Point:
    """One point of a sweep: the table row it belongs to, sample.py and evaluate.py overrides, its folder."""

    row: str
    sample: tuple[str, ...]
    evaluate: tuple[str, ...]
    folder: str


_PLAIN = re.compile(r"^[A-Za-z0-9_.:/${}\-+]*$")


def hydra_value(value: Any) -> str:
    """A YAML value as Hydra override syntax: [1,2], {a:1}, null, true, numbers, strings (quoted if needed)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _PLAIN.match(text) and text not in ("null", "true", "false"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _overrides(mapping: dict[str, Any] | None) -> list[str]:
    return [f"{k}={hydra_value(v)}" for k, v in (mapping or {}).items()]


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read and check a spec file (unknown keys and empty sweeps are errors naming the row)."""
    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(OmegaConf.load(Path(path)), resolve=False)
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown or "rows" not in spec:
        raise ValueError(f"{path}: a sweep spec has keys {sorted(SPEC_KEYS)} ('rows' required), got unknown {unknown}")
    for row, body in spec["rows"].items():
        bad = sorted(set(body) - ROW_KEYS)
        if bad or "guidance" not in body:
            raise ValueError(f"{path}: row {row!r} has keys {sorted(ROW_KEYS)} ('guidance' required), got {bad}")
        for key, values in (body.get("sweep") or {}).items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"{path}: row {row!r}: sweep.{key} must be a non-empty list of values")
    return spec


def points(spec: dict[str, Any]) -> list[Point]:
    """Every point of every row, rows in file order, each row's combinations in order."""
    shared = spec.get("shared") or {}
    sample_shared, evaluate_shared = _overrides(shared.get("sample")), tuple(_overrides(shared.get("evaluate")))
    out = []
    for row, body in spec["rows"].items():
        sweep = body.get("sweep") or {}
        keys = list(sweep)
        fixed = [f"guidance={body['guidance']}", f"guidance.name={row}", *_overrides(body.get("set"))]
        for combo in itertools.product(*(sweep[k] for k in keys)) if keys else [()]:
            values = dict(zip(keys, combo))
            folder = f"{row}/{point_name(values)}"
            out.append(Point(row, tuple(sample_shared + fixed + _overrides(values)), evaluate_shared, folder))
    return out
