"""Sweeps: a grid of guidance methods x hyperparameters, every point sampled (sample.py's body,
models/generation.py) and evaluated (evaluate.py's body, eval/evaluate.py) in its own folder, then
rank-scored into the paper's tables (eval/report.py). The body of scripts/sweep.py.

The sweep config (configs/sweep.yaml + a setting of configs/sweeps/) names
    sample     sample.py settings shared by every point, as on its command line (checkpoint, sampler,
               classes, per_class, seed, ...); nested keys are flattened (`sampler: {steps: 16}`)
    evaluate   evaluate.py settings (reference, features, metrics)
    choices    config-group choices of both (their defaults lists): {sample: {model: sit_xl2},
               evaluate: {data: digits, features: digits}}
    grid       per guidance method (configs/guidance/<method>.yaml) its hyperparameters, relative to
               `guidance.`: a list is swept, anything else is fixed; a method's points are the Cartesian
               product of its lists (a list-valued setting is swept as a list of lists: layers: [[2, 4]]).
               A row may take its defaults from another guidance config, `config: erg_mmdit`: the row's
               name is then the method's name in the tables (guidance.name), e.g. Table 5's `erg` and
               `erg_alpha` rows both start from erg_mmdit
    sweep_dir  the sweep's folder:

    <sweep_dir>/<point>/config.yaml          resolved sample config + nfe (written by sample.py's body only)
    <sweep_dir>/<point>/store.json, shards/  the samples (data/sample_store.py)
    <sweep_dir>/<point>/metrics.json         evaluation records (eval/records.py)
    <sweep_dir>/report/                      table.md / .tex, ranking.md, ranks.csv, pareto.png, grid.png

A point's folder is named after its method and swept values (`erg__image.tau-0.01__scale-2.0`): stable
across reruns and Hydra-safe (no '=' or ','), so it is also the `point=` value of a multirun job. Points
are independent and idempotent: a rerun checks that a point's folder holds samples of the same settings
(else it refuses), samples only its missing shards, and evaluates only when no record of its
metrics.json carries the current evaluation settings (`eval.evaluate.settings_digest`).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from data.sample_store import SampleStore
from eval.records import METRICS_FILE, read_records
from models.runtime import ConfigError, check_missing, composition_error

log = logging.getLogger("erg.sweep")

__all__ = [
    "Point",
    "check_point",
    "evaluate_config",
    "expand_grid",
    "override_value",
    "point_configs",
    "point_name",
    "print_report",
    "register_resolvers",
    "run",
    "run_point",
    "sample_config",
    "samples_complete",
    "to_overrides",
    "write_sweep_report",
]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
TOP_LEVEL_KEYS = {
    "name", "sweep_dir", "choices", "sample", "evaluate", "grid", "methods", "point", "force_eval", "report", "sweeps",
    "hydra",
}  # fmt: skip
RESERVED_SAMPLE = ("guidance", "out_dir", "mode", "grid", "rank", "world_size")  # set per point by the sweep
RESERVED_EVALUATE = ("samples", "out")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_PLAIN = re.compile(r"^[A-Za-z_/.~][A-Za-z0-9_/.\-:@~]*$")  # strings Hydra reads unquoted, as strings
_LITERALS = {"null", "true", "false", "inf", "nan"}

Sample = Callable[[Path, dict[str, Any]], None]
Evaluate = Callable[[Path], Any]


# --- the grid --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    """One grid point: its folder name, guidance method (its row name: the method in the tables), guidance
    settings (dotted keys under `guidance.`, fixed and swept), and the guidance config it starts from
    (configs/guidance/<config>.yaml; the method's own by default)."""

    name: str
    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    config: str = ""

    @property
    def guidance_config(self) -> str:
        return self.config or self.method


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"sampler": {"steps": 16}, "features.weights": "x"} -> {"sampler.steps": 16, "features.weights": "x"}."""
    out: dict[str, Any] = {}
    for key, value in (tree or {}).items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _name_part(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "_".join(_name_part(v) for v in value)
    if isinstance(value, str) and "/" in value:  # a path: its file name (two of the same name would clash)
        return Path(value).name
    return str(value)


def point_name(method: str, swept: dict[str, Any]) -> str:
    """'erg' + {"scale": 2.0, "image.tau": 0.01} -> 'erg__image.tau-0.01__scale-2.0' (sorted keys; only
    [A-Za-z0-9._-], so the name is a safe folder and Hydra override value; very long names end in a hash)."""
    name = _UNSAFE.sub("_", "__".join([method, *(f"{k}-{_name_part(swept[k])}" for k in sorted(swept))]))
    if len(name) > 150:
        name = f"{name[:128]}__{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name


def expand_grid(grid: dict[str, Any], methods: list[str] | None = None) -> list[Point]:
    """Every point of the grid, method by method in the grid's order (or `methods`' order)."""
    grid, methods = _container(grid), _container(methods)
    if not grid:
        raise ConfigError("the sweep's grid is empty: give grid.<method>.<hyperparameter>=[values] per method")
    chosen = list(grid) if methods is None else list(methods)
    unknown = [m for m in chosen if m not in grid]
    if unknown:
        raise ConfigError(f"methods={chosen}: {unknown} not in the grid (its methods: {list(grid)})")
    known = sorted(p.stem for p in (CONFIG_DIR / "guidance").glob("*.yaml"))
    points = []
    for method in chosen:
        params = flatten(grid[method])
        config = params.pop("config", None) or method
        if config not in known:
            where = f"grid.{method}.config" if config != method else f"grid.{method}"
            raise ConfigError(
                f"{where}: no guidance config configs/guidance/{config}.yaml (known: {known}); a row named otherwise "
                "says which config it starts from: grid.<row>.config=<guidance config>"
            )
        swept = {k: v for k, v in params.items() if isinstance(v, list)}
        fixed = {k: v for k, v in params.items() if k not in swept}
        empty = [k for k, v in swept.items() if not v]
        if empty:
            raise ConfigError(f"grid.{method}.{empty[0]} is an empty list: give at least one value")
        for combo in itertools.product(*swept.values()):
            values = dict(zip(swept, combo))
            settings = {**fixed, **values}
            if config != method:  # the row's name is the method's name in the tables
                settings["name"] = method
            points.append(Point(point_name(method, values), method, settings, "" if config == method else config))
    names = [p.name for p in points]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ConfigError(f"grid points with the same folder name: {clashes} (repeated values in a list?)")
    return points


# --- config plumbing -------------------------------------------------------------------------------
def override_value(value: Any) -> str:
    """A Python value as a Hydra command-line override value (strings quoted where needed)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, float) and math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in _LITERALS:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def to_overrides(settings: dict[str, Any] | None, prefix: str = "") -> list[str]:
    """{"sampler": {"steps": 16}, "data": "digits"} -> ["sampler.steps=16", "data=digits"]."""
    return [f"{prefix}{k}={override_value(v)}" for k, v in flatten(settings).items()]


def compose(config_name: str, overrides: list[str], what: str) -> DictConfig:
    """Compose configs/<config_name>.yaml with command-line overrides, inside or outside a Hydra app."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    try:
        if GlobalHydra.instance().is_initialized():
            return hydra_compose(config_name=config_name, overrides=overrides)
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=overrides)
    except Exception as err:  # a misspelled key: named with its closest match, as on the command line
        raise ConfigError(f"{what}: {composition_error(err)} (overrides: {' '.join(overrides)})") from err


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def validate(cfg: DictConfig) -> list[Point]:
    """Check the sweep config; returns the points it names."""
    check_missing(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), "python scripts/sweep.py")
    unknown = [k for k in cfg if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise ConfigError(f"unknown top-level sweep key(s): {unknown}; valid: {sorted(TOP_LEVEL_KEYS)}")
    for key, reserved in (("sample", RESERVED_SAMPLE), ("evaluate", RESERVED_EVALUATE)):
        for node in (f"choices.{key}", key):
            taken = [k for k in flatten(_container(OmegaConf.select(cfg, node))) if k.split(".")[0] in reserved]
            if taken:
                raise ConfigError(f"{node}.{taken[0]} is set per point by the sweep: leave it out (grid: per method)")
    if not cfg.get("sweep_dir"):
        raise ConfigError("sweep_dir is required (the folder of the sweep's points)")
    methods = _container(cfg.get("methods"))
    if isinstance(methods, str):
        methods = [methods]
    return expand_grid(_container(cfg.grid), methods)


def sample_config(cfg: DictConfig, point: Point) -> DictConfig:
    """The point's sample.py config, composed exactly as its command line would be."""
    return compose(
        "sample",
        [
            *to_overrides(_container(OmegaConf.select(cfg, "choices.sample"))),
            *to_overrides(_container(cfg.sample)),
            f"guidance={point.guidance_config}",
            *to_overrides(point.settings, "++guidance."),  # unknown keys: sample.py's check names them
            f"out_dir={override_value(str(Path(str(cfg.sweep_dir)) / point.name))}",
        ],
        f"point {point.name} (sample.py config)",
    )


def evaluate_config(cfg: DictConfig, samples: str | Path, what: str = "evaluate.py config") -> DictConfig:
    """evaluate.py's config for `samples` with the sweep's evaluation settings."""
    return compose(
        "evaluate",
        [
            *to_overrides(_container(OmegaConf.select(cfg, "choices.evaluate"))),
            *to_overrides(_container(cfg.evaluate)),
            f"samples={override_value(str(samples))}",
        ],
        what,
    )


def point_configs(cfg: DictConfig, point: Point) -> tuple[DictConfig, DictConfig]:
    run_dir = Path(str(cfg.sweep_dir)) / point.name
    return sample_config(cfg, point), evaluate_config(cfg, run_dir, f"point {point.name} (evaluate.py config)")


# --- one point -------------------------------------------------------------------------------------
def samples_complete(run_dir: Path) -> bool:
    if not (run_dir / "store.json").is_file():
        return False
    return not SampleStore.open(run_dir).missing_shards()


def run_point(
    run_dir: str | Path,
    config: dict[str, Any],
    sample: Sample,
    evaluate: Evaluate,
    current: Callable[[dict[str, Any]], bool] | None = None,
    force_eval: bool = False,
) -> dict[str, Any]:
    """Sample and evaluate one point unless already done; returns what was done and the records.

    config: the point's resolved sample config; a folder holding samples of other settings is refused
        (models.generation.check_run_config). The sampler writes config.yaml (the one writer).
    current(record): whether an existing evaluation record counts (default: any record does).
    """
    from models.generation import check_run_config

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_run_config(config, run_dir)
    done = {"sampled": False, "evaluated": False}
    if not samples_complete(run_dir):
        sample(run_dir, config)
        if not samples_complete(run_dir):
            raise RuntimeError(f"the sample step returned but {run_dir} is incomplete")
        done["sampled"] = True
    records = read_records(run_dir / METRICS_FILE)
    counts = current or (lambda record: True)
    if force_eval or done["sampled"] or not any(counts(r) for r in records.values()):
        evaluate(run_dir)
        done["evaluated"] = True
    return {**done, "records": read_records(run_dir / METRICS_FILE)}


def check_point(point: Point, sample_cfg: DictConfig, eval_cfg: DictConfig) -> dict[str, Any]:
    """sample.py's and evaluate.py's own checks of the point's configs; returns the resolved sample config."""
    from eval.evaluate import validate as validate_evaluation
    from models.generation import rank_and_world
    from models.generation import validate as validate_sampling

    try:
        container = validate_sampling(sample_cfg)
        validate_evaluation(eval_cfg)
    except ConfigError as err:
        raise ConfigError(f"point {point.name}: {err}") from err
    _, world = rank_and_world(container)
    if world > 1:
        raise ConfigError(
            f"a sweep runs one process per point, but this one sees world size {world} (torchrun / SLURM tasks): "
            "launch one task per job (hydra/launcher=submitit_slurm_1gpu); points run in parallel as array jobs"
        )
    return container


def _run_one(cfg: DictConfig, point: Point, sample_cfg: DictConfig, eval_cfg: DictConfig) -> dict[str, Any]:
    from eval.evaluate import run as evaluate_run
    from eval.evaluate import settings_digest
    from models.generation import run as sample_run

    container = check_point(point, sample_cfg, eval_cfg)
    digest = settings_digest(eval_cfg)
    started = time.perf_counter()
    try:
        result = run_point(
            Path(str(cfg.sweep_dir)) / point.name,
            container,
            sample=lambda run_dir, config: sample_run(sample_cfg),
            evaluate=lambda run_dir: evaluate_run(eval_cfg),
            current=lambda record: record.get("settings") == digest,
            force_eval=bool(cfg.get("force_eval")),
        )
    except ConfigError as err:  # e.g. the folder holds samples of other settings
        raise ConfigError(f"point {point.name}: {err}\nIn a sweep: give it another sweep_dir=...") from err
    result["seconds"] = time.perf_counter() - started
    record = next((r for r in result["records"].values() if r.get("settings") == digest), None)
    result["metrics"] = record["metrics"] if record else {}
    return result


def _describe(point: Point, result: dict[str, Any]) -> str:
    what = "+".join(k for k in ("sampled", "evaluated") if result[k]) or "done before"
    metrics = ", ".join(f"{k} {v:.3g}" for k, v in result["metrics"].items())
    return f"{point.name}: {what} ({result['seconds']:.1f} s) {metrics}"


# --- the sweep -------------------------------------------------------------------------------------
def run(cfg: DictConfig, on_point: Callable[[int, int, Point, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """point=null: every point one after another, then the report; point=<name>: that point only (a job
    of `scripts/sweep.py -m`). Every point's configs are composed and checked before anything runs."""
    points = validate(cfg)
    if cfg.get("point") is not None:
        by_name = {p.name: p for p in points}
        name = str(cfg.point)
        if name not in by_name:
            raise ConfigError(f"point={name} is not in the grid; its points: {sorted(by_name)}")
        point = by_name[name]
        result = _run_one(cfg, point, *point_configs(cfg, point))
        log.info("%s", _describe(point, result))
        return {"points": {name: result}}
    plans = [(p, *point_configs(cfg, p)) for p in points]
    for point, sample_cfg, eval_cfg in plans:  # every point checked before any runs
        check_point(point, sample_cfg, eval_cfg)
    results = {}
    for i, (point, sample_cfg, eval_cfg) in enumerate(plans):
        results[point.name] = _run_one(cfg, point, sample_cfg, eval_cfg)
        log.info("[%d/%d] %s", i + 1, len(plans), _describe(point, results[point.name]))
        if on_point:
            on_point(i, len(plans), point, results[point.name])
    report, paths = write_sweep_report(cfg, points)
    return {"points": results, "report": report, "paths": paths}


def write_sweep_report(cfg: DictConfig, points: list[Point] | None = None) -> tuple[Any, dict[str, Path]]:
    """The report of the sweep's current points under its current evaluation settings (folders of other
    grids, records of other settings are left out): ranked runs, best setting per method (appendix A.1),
    tables, Pareto fronts, grid, in <sweep_dir>/report."""
    from eval.evaluate import settings_digest
    from eval.report import ReportOptions, build_report, write_report

    points = points if points is not None else validate(cfg)
    options = _container(cfg.get("report")) or {}
    opts = ReportOptions(
        metrics=options.get("metrics"),
        pool=options.get("pool", "all"),
        nfe=dict(options.get("nfe") or {}),
        runs=[p.name for p in points],
        settings=settings_digest(evaluate_config(cfg, cfg.sweep_dir)),  # the current evaluation's records
    )
    report = build_report(str(cfg.sweep_dir), opts)
    paths = write_report(report, Path(str(cfg.sweep_dir)) / "report", grid=int(options.get("grid", 8)))
    return report, paths


def register_resolvers() -> None:
    """`${sweep_points:${grid},${methods}}`: the comma-separated point names, the sweep values Hydra's
    multirun gives `point` (configs/sweep.yaml's hydra.sweeper.params), one job per point."""
    if not OmegaConf.has_resolver("sweep_points"):
        OmegaConf.register_new_resolver(
            "sweep_points",
            lambda grid, methods=None: ",".join(p.name for p in expand_grid(_container(grid), _container(methods))),
        )


def print_report(report: Any, paths: dict[str, Path]) -> None:
    print("\n## All runs, by mean rank (value (rank))\n")
    print(report.ranking_markdown)
    print("\n## Best setting per method (rank scoring, appendix A.1)\n")
    print(report.markdown)
    print("\nwritten: " + ", ".join(str(p) for p in paths.values()))


class ReportAfterMultirun(Callback):
    """configs/sweep.yaml's hydra.callbacks: after every job of `scripts/sweep.py -m` has finished (locally,
    or the whole SLURM array: the submitit launcher waits for it), write and print the sweep's report."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        report, paths = write_sweep_report(config)
        print_report(report, paths)
