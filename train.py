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
    from models.cli import reported
    from models.training import run

    with reported(cfg, writes=WRITES):
        try:
            summary = run(cfg)
        except FloatingPointError as err:  # diverged: the message names the step (not a config problem)
            print(f"\nerror: {err}", file=sys.stderr)
            sys.exit(1)
    log.info("done: %s", summary)
    print(
        f"\nTrained to step {summary['step']} (train loss {summary['train_loss']}, val loss {summary['val_loss']}).\n"
        f"  checkpoint: {summary['last_checkpoint']}\n  sample grids: {summary['samples']}"
    )
    return summary


if __name__ == "__main__":
    from models.cli import run_hydra

    run_hydra(main, writes=WRITES)
