"""One grid point of a sweep: sample (if not done), evaluate (if not done), in the run's own folder.

This is the thin layer between sample.py and evaluate.py that a sweep runs once per point, locally
one after another or as a SLURM job array (Hydra multirun with the submitit launcher): every job is
independent and idempotent, so an interrupted sweep rerun with the same command redoes only the
missing work. The sampler is passed in (`sample(run_dir, config)`), so this module does not depend
on it; sample.py resumes a partially written sample folder by itself (finished shards are skipped).

    <sweep>/<point>/config.yaml    the point's resolved config (refused if it changed under the folder)
    <sweep>/<point>/store.json ... the samples
    <sweep>/<point>/metrics.json   the evaluation (eval/records.py); its presence marks the point done
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from data.sample_store import SampleStore
from eval.records import METRICS_FILE, read_records
from models.io import atomic_write_text

__all__ = ["point_name", "run_grid", "run_point", "samples_complete"]

Sample = Callable[[Path, dict[str, Any]], None]
Evaluate = Callable[[Path], dict[str, Any]]


def point_name(overrides: dict[str, Any]) -> str:
    """A folder name for a grid point, from its overrides: {"guidance": "erg", "guidance.scale": 3} ->
    'guidance-erg__guidance.scale-3' (sorted keys; no '=' or ',' so the path can be a Hydra override value)."""
    text = "__".join(f"{k}-{overrides[k]}" for k in sorted(overrides))
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text) or "default"


def samples_complete(run_dir: Path) -> bool:
    if not (run_dir / "store.json").is_file():
        return False
    return not SampleStore.open(run_dir).missing_shards()


def _write_config(run_dir: Path, config: dict[str, Any]) -> None:
    from omegaconf import OmegaConf

    path = run_dir / "config.yaml"
    text = OmegaConf.to_yaml(OmegaConf.create(config))
    if path.is_file():
        if OmegaConf.to_container(OmegaConf.load(path)) != OmegaConf.to_container(OmegaConf.create(config)):
            raise ValueError(
                f"{run_dir} holds a run with another config (config.yaml differs): use another sweep folder, "
                "or the same settings, so that samples of different settings are never mixed"
            )
        return
    atomic_write_text(path, text)


def run_point(
    run_dir: str | Path, config: dict[str, Any], sample: Sample, evaluate: Evaluate, force_eval: bool = False
) -> dict[str, Any]:
    """Sample and evaluate one point unless already done. Returns what was done and the records."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_config(run_dir, config)
    done = {"sampled": False, "evaluated": False}
    if not samples_complete(run_dir):
        sample(run_dir, config)
        if not samples_complete(run_dir):
            raise RuntimeError(f"the sample step returned but {run_dir} is incomplete")
        done["sampled"] = True
    if force_eval or done["sampled"] or not read_records(run_dir / METRICS_FILE):
        evaluate(run_dir)
        done["evaluated"] = True
    return {**done, "records": read_records(run_dir / METRICS_FILE)}


def run_grid(
    sweep_dir: str | Path, points: Iterable[tuple[dict[str, Any], dict[str, Any]]], sample: Sample, evaluate: Evaluate
) -> dict[str, dict[str, Any]]:
    """Run (overrides, resolved config) points one after another under `sweep_dir`."""
    return {
        point_name(overrides): run_point(Path(sweep_dir) / point_name(overrides), config, sample, evaluate)
        for overrides, config in points
    }
