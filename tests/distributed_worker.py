"""One rank of tests/test_distributed.py: train from shards as `python tests/distributed_worker.py
OUT_DIR OVERRIDE...`, then write what this rank read and a digest of its weights to OUT_DIR/rank<r>.json."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L
import torch

from models import training
from tests.conftest import compose


class Record(L.Callback):
    """Test instrumentation: the sample keys of every batch, and the weights at the end."""

    def __init__(self, out: Path):
        self.out = out
        self.keys: list[list[str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.keys.append(list(batch.get("key", [])))  # shards carry sample keys; the digits do not

    def on_train_end(self, trainer, pl_module):
        full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 shards are DTensors
        digest = lambda module: hashlib.sha256(
            b"".join(full(p).detach().cpu().numpy().tobytes() for p in module.parameters())
        ).hexdigest()
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "step": trainer.global_step,
            "keys": self.keys,
            "model": digest(pl_module.model),
            "ema": digest(pl_module.ema),
            "param_sum": float(sum(full(p).detach().double().sum() for p in pl_module.model.parameters())),
            # what this rank holds: all of it (DDP) or its shards (FSDP2 DTensors)
            "numel": sum(p.numel() for p in pl_module.model.parameters()),
            "local_numel": sum(
                (p.to_local() if hasattr(p, "to_local") else p).numel() for p in pl_module.model.parameters()
            ),
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    recorder = Record(out)
    build = training.build_callbacks
    training.build_callbacks = lambda cfg, run_dir: [*build(cfg, run_dir), recorder]  # instrumentation only
    training.run(compose(overrides=overrides))


if __name__ == "__main__":
    main()
