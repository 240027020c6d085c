"""A sweep folder, read back: one run per sub-folder that holds a metrics.json.

    <sweep>/
      <run>/                 one grid point (e.g. a Hydra multirun job of sample.py)
        config.yaml          the resolved sampling config: guidance method name + hyperparameters
        store.json shards/   the samples (data/sample_store.py)
        metrics.json         evaluation records (eval/records.py)

The method of a run is read from its config (`guidance.name` by default); its hyperparameters are the
other `guidance.*` values; the guidance scale (Pareto colours) and the NFE per step (tables) are read
from keys given by the caller. A run without config.yaml is named after its folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.records import METRICS_FILE, read_records

__all__ = ["Run", "find_runs", "flatten", "lookup"]

# Where sample.py may record the number of function evaluations per step (first hit wins).
NFE_KEYS = ("nfe", "guidance.nfe", "guidance.nfe_per_step", "sampler.nfe")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (lists kept as values)."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def lookup(config: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


@dataclass
class Run:
    name: str  # path relative to the sweep folder
    path: Path
    method: str
    config: dict[str, Any]
    records: dict[str, dict[str, Any]]
    values: dict[str, float] = field(default_factory=dict)  # filled by select_metrics

    def param(self, dotted: str, default: Any = None) -> Any:
        return lookup(self.config, dotted, default)

    def params(self, prefix: str = "guidance.") -> dict[str, Any]:
        """The method's hyperparameters: flattened config under `prefix` (its name excluded)."""
        flat = flatten(self.config)
        return {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix) and k != f"{prefix}name"}

    def nfe(self) -> int | None:
        for key in NFE_KEYS:
            value = lookup(self.config, key)
            if value is not None:
                return int(value)
        return None


def _load_config(folder: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    for name in ("config.yaml", ".hydra/config.yaml"):
        path = folder / name
        if path.is_file():
            return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return {}


def find_runs(sweep: str | Path, method_key: str = "guidance.name") -> list[Run]:
    """Every run (folder with metrics.json) under `sweep`, sorted by name."""
    sweep = Path(sweep)
    if not sweep.is_dir():
        raise FileNotFoundError(f"{sweep}: no such sweep folder")
    runs = []
    for metrics_file in sorted(sweep.rglob(METRICS_FILE)):
        folder = metrics_file.parent
        config = _load_config(folder)
        name = str(folder.relative_to(sweep)) if folder != sweep else folder.name
        method = lookup(config, method_key) or folder.name
        runs.append(Run(name, folder, str(method), config, read_records(metrics_file)))
    if not runs:
        raise FileNotFoundError(f"no {METRICS_FILE} under {sweep}: evaluate the runs first (python evaluate.py ...)")
    return runs
