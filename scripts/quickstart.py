"""The quickstart, end to end (`make quickstart` runs this): from the bundled digits to the paper's table.

    python scripts/quickstart.py
    python scripts/quickstart.py --sweep sample.per_class=50 'grid.cfg.scale=[1.25,1.5,2.0]'   # more digits / settings
    python scripts/quickstart.py --train trainer.max_steps=2000 name=long --sweep sweep_dir=runs/long_sweep

1. trains the digits DiT (`python train.py`: runs/quickstart/; resumable, a finished run is left as is),
   keeping checkpoints at 1/16 and 1/4 of training for AutoGuidance's weak model;
2. trains the digits feature net (`scripts/train_feature_net.py`: runs/digits_features/; kept if present);
3. samples every guidance method of the paper at two settings each, 200 digits per setting with the same
   seeds and labels, and evaluates each setting against the 180 held-out digits in the feature net's
   space: FID, precision, recall, density, coverage (`scripts/sweep.py` with configs/sweeps/quickstart.yaml:
   one folder per setting in runs/quickstart_sweep/; finished settings are skipped), then picks each
   method's setting by mean rank over all settings (appendix A.1) and writes the table in the paper's
   layout, the ranking, the Pareto fronts and an image grid to runs/quickstart_sweep/report/;
4. scores real training digits the same way, for scale (what reproducing the data would get here);
and prints the table with what ran, where the files are and how long each step took.

`--train`, `--features` and `--sweep` pass overrides / arguments to the three tools. Every step is
resumable: a rerun redoes only what is missing (all of it done: seconds).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import DictConfig, OmegaConf

from eval.sweep import compose, evaluate_config, flatten

log = logging.getLogger("erg.quickstart")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", nargs="*", default=[], metavar="OVERRIDE", help="train.py overrides")
    p.add_argument("--features", default="", metavar="ARGS",
                   help="scripts/train_feature_net.py arguments, one string: --features='--epochs 20'")  # fmt: skip
    p.add_argument("--sweep", nargs="*", default=[], metavar="OVERRIDE", help="scripts/sweep.py overrides")
    return p.parse_args(argv)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


# --- 1. the generative model -----------------------------------------------------------------------
def _step_of(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", -1))


def train_model(overrides: list[str]) -> tuple[DictConfig, dict[str, Any]]:
    """Train unless last.ckpt already holds trainer.max_steps steps; returns the train config and facts."""
    from models.training import run

    cfg = compose("train", overrides, "the quickstart's training config")
    last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    if last.is_file() and _step_of(last) >= cfg.trainer.max_steps:
        return cfg, {"trained": False, "step": _step_of(last)}
    summary = run(cfg)
    return cfg, {"trained": True, "step": summary["step"], "val_loss": summary["val_loss"]}


def model_checkpoints(cfg: DictConfig) -> tuple[Path, list[Path], str]:
    """(the final checkpoint, AutoGuidance's weak ones, a note): the checkpoints at checkpoint.at_fractions
    of training (1/16, the ERG paper's choice, and 1/4), else the earliest one the run kept."""
    folder = Path(cfg.run_dir) / "checkpoints"
    max_steps = int(cfg.trainer.max_steps)
    final = folder / f"step_{max_steps:07d}.ckpt"
    final = final if final.is_file() else folder / "last.ckpt"
    weak = [folder / f"step_{max(1, int(f * max_steps)):07d}.ckpt" for f in cfg.checkpoint.get("at_fractions") or []]
    weak = list(dict.fromkeys(p for p in weak if p.is_file()))
    if weak:
        return final, weak, "steps " + " and ".join(f"{_step_of(p)}" for p in weak) + f" of {max_steps}"
    steps = sorted(folder.glob("step_*.ckpt"))
    if not steps:
        raise FileNotFoundError(f"{folder} holds no step_*.ckpt for AutoGuidance's weak model")
    note = f"step {_step_of(steps[0])} of {max_steps}, the earliest kept (this run predates checkpoint.at_fractions)"
    return final, steps[:1], note


# --- 2. the feature network ------------------------------------------------------------------------
def feature_net(weights: Path, args: str) -> dict[str, Any]:
    from eval.digits_net import load_digits_net

    if not weights.is_file():
        from scripts.train_feature_net import main

        main(["--out", str(weights), *shlex.split(args)])
    _, meta = load_digits_net(weights)
    return meta


# --- 3-5. the sweep, real digits, the report -------------------------------------------------------
def sweep_config(overrides: list[str], final: Path, weak: list[Path]) -> DictConfig:
    """configs/sweep.yaml (sweeps=quickstart) on this run's checkpoints, unless the overrides name them."""
    given = " ".join(overrides)
    cfg = compose("sweep", overrides, "the quickstart's sweep config")
    if "sample.checkpoint" not in given:
        cfg.sample.checkpoint = str(final)
    if "autoguidance" in cfg.grid and "grid.autoguidance.checkpoint" not in given:
        cfg.grid.autoguidance.checkpoint = [str(p) for p in weak]  # a list: each weak model is a setting
    return cfg


def real_digits_scores(cfg: DictConfig, per_class: int) -> dict[str, float]:
    """`per_class` training digits of each class, evaluated exactly like the samples: what a generator that
    reproduces the training data would score against the same held-out reference, at the same sample size."""
    from data.digits import DigitsDataModule
    from eval.evaluate import run, settings_digest
    from eval.io import write_adm_npz
    from eval.records import read_records
    from eval.sweep import evaluate_config
    from models.generation import to_uint8

    path = Path(str(cfg.sweep_dir)) / "report" / f"real_train_digits_{per_class}_per_class.npz"
    eval_cfg = evaluate_config(cfg, path, "the real digits' evaluation config")
    if not path.is_file():
        data = eval_cfg.data
        module = DigitsDataModule(
            image_size=int(data.image_size), channels=int(data.channels), val_fraction=float(data.val_fraction),
            seed=int(data.seed),
        )  # fmt: skip
        (x, y), _ = module.split()
        order = [int(i) for c in range(10) for i in (y == c).nonzero().flatten()[:per_class]]  # class blocks
        write_adm_npz(path, [to_uint8(x[order])], len(order))
    digest = settings_digest(eval_cfg)
    records = read_records(path.with_name(path.stem + ".metrics.json"))
    record = next((r for r in records.values() if r.get("settings") == digest), None) or run(eval_cfg)
    return record["metrics"]


def _explain(facts: dict[str, Any], cfg: DictConfig, points: int, methods: int) -> str:
    sample = flatten(OmegaConf.to_container(cfg.sample, resolve=True))
    n = 10 * int(sample.get("per_class", 0))
    return "\n".join([
        "What ran:",
        f"  1. training  a DiT ({facts['model']}) on the digits' train split, {facts['train_steps']} steps: "
        f"{facts['run_dir']}/",
        f"  2. features  a digits classifier (held-out accuracy {facts['feature_acc']}); its penultimate layer is the "
        f"feature space: {facts['feature_weights']}",
        f"  3. sweep     {methods} guidance methods, {points} settings, {n} digits each ({n // 10} per class, the same "
        f"seeds for every method), Euler {sample.get('sampler.steps', 50)} steps, each evaluated against the "
        f"{facts['num_reference']} held-out digits: {cfg.sweep_dir}/<setting>/",
        f"               AutoGuidance's weak models: the checkpoints at {facts['weak']}",
        "  4. scoring   per method, the setting with the best mean rank over all settings (the paper's appendix A.1);",
        "               bold: best in its column (ERG + APG / ERG + CADS: bold where they beat every row above them)",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s][%(name)s] %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    from eval.sweep import run as run_sweep
    from eval.sweep import validate as validate_sweep
    from eval.tables import METRIC_LABELS, format_value

    timings: dict[str, float] = {}
    start = time.perf_counter()
    print("== 1/4 training the digits DiT (python train.py) ==", flush=True)
    train_cfg, trained = train_model(args.train)
    final, weak, weak_note = model_checkpoints(train_cfg)
    timings["training"] = time.perf_counter() - start
    print(f"   {'trained' if trained['trained'] else 'already trained'}: step {trained['step']}, {final}", flush=True)

    t = time.perf_counter()
    cfg = sweep_config(args.sweep, final, weak)
    weights = Path(str(evaluate_config(cfg, cfg.sweep_dir).features.weights))
    print(f"== 2/4 the digits feature net ({weights}) ==", flush=True)
    meta = feature_net(weights, args.features)
    timings["feature net"] = time.perf_counter() - t

    t = time.perf_counter()
    points = validate_sweep(cfg)
    methods = len({p.method for p in points})
    print(f"== 3/4 sampling + evaluating {len(points)} settings of {methods} methods: {cfg.sweep_dir}/ ==", flush=True)

    def progress(i: int, total: int, point: Any, result: dict[str, Any]) -> None:
        what = "+".join(k for k in ("sampled", "evaluated") if result[k]) or "done before"
        fid = result["metrics"].get("fid")
        print(f"   [{i + 1:2d}/{total}] {point.name:48s} {what:17s} {result['seconds']:5.1f} s"
              + (f"   FID {fid:.2f}" if fid is not None else ""), flush=True)  # fmt: skip

    result = run_sweep(cfg, on_point=progress)
    timings["sweep"] = time.perf_counter() - t

    t = time.perf_counter()
    print("== 4/4 real training digits, scored the same way ==", flush=True)
    per_class = int(OmegaConf.select(cfg, "sample.per_class") or 20)
    real = real_digits_scores(cfg, per_class)
    timings["real digits"] = time.perf_counter() - t
    total = time.perf_counter() - start

    report, paths = result["report"], result["paths"]
    first = next(iter(result["points"].values()))
    record = next(r for r in first["records"].values() if r["metrics"] == first["metrics"])
    facts = {
        "model": f"{train_cfg.model.get('depth')} blocks, width {train_cfg.model.get('hidden_size')}",
        "train_steps": trained["step"],
        "run_dir": train_cfg.run_dir,
        "feature_acc": f"{meta.get('held_out_accuracy', float('nan')):.1%}",
        "feature_weights": weights,
        "num_reference": record.get("num_reference", "?"),
        "weak": weak_note,
    }
    report_dir = Path(str(cfg.sweep_dir)) / "report"
    print(f"\n## Best setting per method, ranked over all {len(points)} settings (appendix A.1)\n")
    print(report.markdown)
    real_text = ", ".join(f"{METRIC_LABELS[m]} {format_value(m, real[m])}" for m in report.metrics if m in real)
    print(f"\nFor scale: {10 * per_class} real training digits, scored the same way: {real_text}")
    print("(precision, recall, density, coverage x 100; FID in the digits classifier's feature space, small sets: "
          "only large gaps mean something)")  # fmt: skip
    print("\n" + _explain(facts, cfg, len(points), methods))
    print(f"\nFiles in {report_dir}/: table.md, table.tex, ranking.md (every setting with its ranks), ranks.csv, "
          "pareto.png (density vs coverage), grid.png (the same seeds across methods).")  # fmt: skip
    print("Time: " + ", ".join(f"{k} {_minutes(v)}" for k, v in timings.items()) + f"; total {_minutes(total)}.")
    print("Rerunning `make quickstart` redoes nothing that is done. More digits or other settings: "
          "python scripts/quickstart.py --sweep sample.per_class=50 'grid.cfg.scale=[1.25,1.5,2.0]'")  # fmt: skip
    return {"report": report, "paths": paths, "real": real, "timings": timings, "points": result["points"]}


if __name__ == "__main__":
    from models.cli import reported

    with reported(writes="--train run_dir=<folder> --sweep sweep_dir=<folder>"):
        main()
