"""Sample and evaluate a grid of guidance methods x hyperparameters, then print the paper-style table.

    python scripts/sweep.py                                  # the quickstart's grid, every point in turn
    python scripts/sweep.py -m                               # Hydra multirun: one job per grid point
    python scripts/sweep.py -m hydra/launcher=submitit_slurm_1gpu hydra.launcher.partition=gpu   # SLURM array
    python scripts/sweep.py sweeps=imagenet256 methods=[cfg,erg]                                 # another setting
    python scripts/sweep.py point=erg__image.layers-2_4__scale-2.0                               # one point

Each point gets its own folder in `sweep_dir` (config.yaml, samples, metrics.json); rerunning skips what
is done. Afterwards (with -m: once every job has finished) the report goes to <sweep_dir>/report and is
printed. Everything is assembled in eval/sweep.py; see configs/sweep.yaml.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.sweep import register_resolvers

register_resolvers()  # ${sweep_points:...} in hydra.sweeper.params: resolved before main runs
log = logging.getLogger("erg.sweep")


WRITES = "sweep_dir=<folder>"  # where a sweep writes (named in errors)


@hydra.main(config_path="../configs", config_name="sweep", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    from eval.sweep import print_report, run
    from models.cli import reported

    with reported(cfg, writes=WRITES):
        summary = run(cfg)
    if "report" in summary:
        print_report(summary["report"], summary["paths"])
    return {name: {k: v for k, v in r.items() if k != "records"} for name, r in summary["points"].items()}


if __name__ == "__main__":
    from models.cli import run_hydra

    run_hydra(main, writes=WRITES)
