"""Evaluate generated samples against a reference from the Hydra configs in configs/.

    python evaluate.py samples=runs/sweep/cfg_w3/ data=digits features=digits \
        features.weights=runs/digits_features/digits_cnn.pt          # the quickstart (digit features)
    python evaluate.py samples=samples/erg.npz reference.path=VIRTUAL_imagenet256_labeled.npz \
        features.weights=/weights/weights-inception-2015-12-05-6726825d.pth      # ADM reference batch
    python evaluate.py samples=out/ reference.path=/data/coco_val_256/ protocol.mode=resize \
        protocol.size=256 metrics=[fid,precision,recall,density,coverage,clip_score] \
        clip_score.path=/weights/clip-vit-large-patch14                    # EvalGIM-style protocol

Writes metrics.json next to the samples (eval/records.py) and logs the numbers; everything is
assembled in eval/evaluate.py.
"""

from __future__ import annotations

import json
import logging

import hydra
from omegaconf import DictConfig

log = logging.getLogger("erg.eval")


WRITES = "out=<file> (metrics.json), cache_dir=<folder> (reference statistics)"  # named in errors


@hydra.main(config_path="configs", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    from eval.evaluate import MetricsWriteError, run
    from models.cli import reported

    with reported(cfg, writes=WRITES):
        try:
            record = run(cfg)
        except MetricsWriteError as err:  # the numbers are not lost: printed, then the one-line error
            print(json.dumps(err.record["metrics"], indent=2))
            raise
    print(json.dumps(record["metrics"], indent=2))
    print(f"metrics written to {record['path']}")
    return record


if __name__ == "__main__":
    from models.cli import run_hydra

    run_hydra(main, writes=WRITES)
