"""Checkpoint writes across filesystems, for tests/test_checkpoint_io.py: `python tests/checkpoint_fs_worker.py
OUT FULL_DIR`, run with $TMPDIR on a tmpfs of its own (a different filesystem from OUT) and FULL_DIR a tiny
tmpfs. An audit hook records every file opened for writing, every rename and every copy, while
- Lightning's default TorchCheckpointIO writes a checkpoint (the behaviour issue 10 reported),
- our AtomicCheckpointIO writes one,
- a real training run (3 steps, a checkpoint at every step) writes its checkpoints;
then checkpoints are written to FULL_DIR until the disk is full. Writes the records to OUT/records.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

EVENTS: list[list[str]] = []
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND


def audit(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], str | bytes | os.PathLike) and isinstance(args[2], int):
        if args[2] & WRITE:
            EVENTS.append(["write", os.fsdecode(args[0])])
    elif event == "os.rename":
        EVENTS.append(["rename", os.fsdecode(args[0]), os.fsdecode(args[1])])
    elif event == "shutil.copyfile":
        EVENTS.append(["copy", os.fsdecode(args[0]), os.fsdecode(args[1])])


def recorded(fn) -> list[list[str]]:
    start = len(EVENTS)
    fn()
    return [[kind, *(os.path.realpath(p) for p in paths)] for kind, *paths in EVENTS[start:]]


def main() -> None:
    out, full = Path(sys.argv[1]), Path(sys.argv[2])
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    from models.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError
    from models.training import run
    from tests.conftest import compose, small_run_overrides

    checkpoint = {"global_step": 1, "state_dict": {"w": torch.arange(10_000.0)}}
    sys.addaudithook(audit)
    records = {
        "tmpdir": os.path.realpath(os.environ["TMPDIR"]),
        "lightning": recorded(lambda: TorchCheckpointIO().save_checkpoint(checkpoint, out / "lightning" / "last.ckpt")),
        "ours": recorded(lambda: AtomicCheckpointIO().save_checkpoint(checkpoint, out / "ours" / "last.ckpt")),
    }
    overrides = small_run_overrides(out / "run", 3, ["checkpoint.every_n_steps=1", "checkpoint.at_fractions=[]"])
    records["training"] = recorded(lambda: run(compose(overrides=overrides)))

    # a full disk: write growing checkpoints until one does not fit
    io, sizes = AtomicCheckpointIO(), []
    records["full"] = None
    for n in range(1, 64):
        ckpt = {"global_step": n, "state_dict": {"w": torch.full((n * 16_384,), float(n))}}
        try:
            io.save_checkpoint(ckpt, full / "last.ckpt")
            sizes.append(n)
        except CheckpointWriteError as err:
            left = torch.load(full / "last.ckpt", weights_only=True)  # the tmpfs vanishes with this process
            expected = torch.full((sizes[-1] * 16_384,), float(sizes[-1])) if sizes else None
            records["full"] = {
                "error": str(err), "errno": err.errno, "saved": sizes, "files": os.listdir(full),
                "remaining_step": left["global_step"],
                "remaining_intact": expected is not None and torch.equal(left["state_dict"]["w"], expected),
            }  # fmt: skip
            break
    (out / "records.json").write_text(json.dumps(records))


if __name__ == "__main__":
    main()
