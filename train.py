"""Train a rectified-flow model from the Hydra configs in configs/.

    python train.py                          # quickstart: a small DiT on the bundled digits (CPU, minutes)
    python train.py model=dit_xl2 data=...   # the paper's DiT-XL/2 on the selected data
    python train.py debug=fast_dev_run       # one batch through everything

Everything is assembled in models/training.py; this file only parses the config and reports.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

log = logging.getLogger("erg.train")


WRITES = "run_dir=<folder> (or name=<run> for runs/<run>)"  # where train.py writes (named in errors)


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    from models.checkpoint_io import CheckpointWriteError
    from models.cli import fail, reported
    from models.preemption import RunStopped
    from models.training import run

    with reported(cfg, writes=WRITES):
        try:
            summary = run(cfg)
        except RunStopped as err:  # SIGTERM / SIGINT / SIGUSR1: a checkpoint was saved; one line, from one rank
            if err.rank == 0:
                print(f"\n{err}", file=sys.stderr)
            # sys.exit also in a sweep job: the job may be requeued (USR1, or SLURM's preemption requeue), and a
            # result written now would end the sweep's wait for it
            sys.exit(err.exit_code)
        except (CheckpointWriteError, FloatingPointError) as err:  # not a config problem: exit code 1
            if getattr(err, "reported_by_rank0", False):  # another rank: rank 0 prints the line
                sys.exit(1)
            fail(str(err), code=1)
    log.info("done: %s", summary)
    print(
        f"\nTrained to step {summary['step']} (train loss {summary['train_loss']}, val loss {summary['val_loss']}).\n"
        f"  checkpoint: {summary['last_checkpoint']}\n  sample grids: {summary['samples']}"
    )
    return summary


if __name__ == "__main__":
    from models.cli import run_hydra

    run_hydra(main, writes=WRITES)
