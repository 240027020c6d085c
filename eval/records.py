"""metrics.json: the evaluation records of one set of samples, and how reports read them back.

    {"schema": 1,
     "records": {
        "<protocol key>": {
            "metrics":   {"fid": 3.2, "precision": 0.71, ..., "clip_score": 26.4},
            "protocols": {"fid": "data-digits-val-..__digitscnn64-..__asis", ..., "clip_score": "clip-..."},
            "num_samples": 500, "num_reference": 180, "prdc_k": 3, "samples": "...", "finished": "...", ...}}}

Every metric carries the protocol it was computed under (reference identity + feature space for the
image metrics, the scorer's identity for text metrics). Evaluating the same samples under another
protocol adds a record instead of overwriting one, so nothing computed is lost; evaluating again under
the same protocol replaces that record. `select_metrics` picks, for a pool of runs, the one protocol per
metric that all of them share, and refuses to mix protocols.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.io import atomic_write_text

__all__ = ["METRICS_FILE", "ProtocolMismatch", "read_records", "select_metrics", "write_record"]

METRICS_FILE = "metrics.json"
SCHEMA = 1


class ProtocolMismatch(ValueError):
    """Runs of one table were evaluated under different protocols."""


def read_records(path: str | Path) -> dict[str, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: unknown metrics schema {data.get('schema')!r} (expected {SCHEMA})")
    return data["records"]


def record_key(record: dict[str, Any]) -> str:
    return "+".join(sorted(set(record["protocols"].values())))


def write_record(path: str | Path, record: dict[str, Any]) -> Path:
    """Add (or replace, same protocol key) one record in `path`, atomically."""
    if set(record["metrics"]) != set(record["protocols"]):
        raise ValueError("every metric of a record needs its protocol")
    records = read_records(path)
    records[record_key(record)] = record
    return atomic_write_text(path, json.dumps({"schema": SCHEMA, "records": records}, indent=2, sort_keys=True))


def _candidates(records: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """metric -> {protocol: value} over all records of one run."""
    out: dict[str, dict[str, float]] = {}
    for rec in records.values():
        for name, value in rec["metrics"].items():
            out.setdefault(name, {})[rec["protocols"][name]] = value
    return out


def select_metrics(
    runs: dict[str, dict[str, dict[str, Any]]], metrics: list[str] | None = None, match: str | None = None
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """For runs {name: records}, the values {run: {metric: value}} under one shared protocol per metric,
    and the protocol of each metric. `match` keeps only protocols containing that text (to choose
    between several shared ones, e.g. 'inception' vs 'dinov2'). Metrics not named and not available
    everywhere are left out; a named metric that cannot be read under one protocol raises."""
    per_run = {name: _candidates(recs) for name, recs in runs.items()}
    if match:
        per_run = {
            name: {m: {p: v for p, v in c.items() if match in p} for m, c in cands.items()}
            for name, cands in per_run.items()
        }
    names = metrics or sorted({m for cands in per_run.values() for m, c in cands.items() if c})
    values: dict[str, dict[str, float]] = {run: {} for run in runs}
    chosen: dict[str, str] = {}
    for metric in names:
        sets = {run: set(cands.get(metric, {})) for run, cands in per_run.items()}
        missing = [run for run, s in sets.items() if not s]
        if missing:
            if metrics:
                raise ProtocolMismatch(f"metric {metric} is missing for run(s) {missing[:5]}: evaluate them first")
            continue
        common = set.intersection(*sets.values())
        if not common:
            detail = "; ".join(f"{run}: {sorted(s)}" for run, s in list(sets.items())[:6])
            raise ProtocolMismatch(
                f"metric {metric} was computed under different protocols across runs ({detail}). Numbers from "
                "different extractors, weights, preprocessing or references are never mixed in one table: "
                "re-evaluate the runs with the same settings"
            )
        if len(common) > 1:
            raise ProtocolMismatch(
                f"metric {metric} exists under several protocols in every run ({sorted(common)}): choose one "
                "with --match TEXT (a part of the protocol, e.g. the extractor name)"
            )
        (protocol,) = common
        chosen[metric] = protocol
        for run in runs:
            values[run][metric] = per_run[run][metric][protocol]
    return values, chosen
