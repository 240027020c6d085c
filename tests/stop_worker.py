"""One training process of tests/test_preemption.py: `python tests/stop_worker.py OUT PHASE STEP OVERRIDE...`
runs the real entry point (`train.py`'s main: its messages and exit codes) with a pacing hook, so the test can
send a signal while a rank is inside a chosen phase of a chosen step:

    forward     inside the model's forward (a forward pre-hook of its first block)
    backward    inside the backward pass (a backward hook of the first block)
    optimizer   inside the optimizer step (a step pre-hook)
    dataloader  inside the fetch of the batch (the collate function)
    startup     inside the fit loop's data set-up: after Lightning registers its own signal handlers (it would),
                before the first batch
    start       at the first batch, then no pause (the test picks a random moment itself)
    none        no pacing (a plain run)

At that phase of step STEP (the optimizer step being computed, 0-based) the rank writes OUT/<phase>.rank<r>
("<step> <pid>") and holds still until the test has sent its signal and written OUT/sent (at most
ERG_TEST_PAUSE seconds, default 120), so the signal lands inside that phase however loaded the machine is.
ERG_TEST_FULL_DISK=<file name>: writing that checkpoint fails as a full disk does (ENOSPC).
Only instrumentation lives here; train.py runs unchanged. Processes that train.py starts itself (a submitit
job) get the same pacing through tests/pace/sitecustomize.py (PYTHONPATH=tests/pace,
ERG_TEST_PACE=<OUT>:<PHASE>:<STEP>).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402

PAUSE = float(os.environ.get("ERG_TEST_PAUSE", "120"))  # the longest wait for the signal


class Pace(L.Callback):
    """Pause rank r inside `phase` of optimizer step `step`, after announcing it in a marker file."""

    def __init__(self, out: Path, phase: str, step: int):
        self.out, self.phase, self.step = out, phase, step
        self.trainer: L.Trainer | None = None
        self.done = False

    def pause(self, phase: str, trainer: L.Trainer | None = None) -> None:
        trainer = trainer or self.trainer
        if self.done or phase != self.phase or trainer is None or trainer.global_step != self.step:
            return
        self.done = True
        (self.out / f"{phase}.rank{trainer.global_rank}").write_text(f"{trainer.global_step} {os.getpid()}")
        if phase != "start":  # hold still until the test has sent its signal (OUT/sent), then a little more
            deadline, sent = time.monotonic() + PAUSE, self.out / "sent"
            while not sent.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.trainer = trainer
        block = pl_module.model.blocks[0]
        block.register_forward_pre_hook(lambda *a: self.pause("forward"))
        block.register_full_backward_hook(lambda *a: self.pause("backward"))
        trainer.optimizers[0].register_step_pre_hook(lambda *a: self.pause("optimizer"))

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        self.pause("start")


def install(out: Path, phase: str, step: int) -> None:
    """Add the pacing to every run of models.training in this process (instrumentation only)."""
    import data.base
    from models import training

    pace = Pace(out, phase, step)
    build = training.build_callbacks
    training.build_callbacks = lambda cfg, run_dir: [*build(cfg, run_dir), pace]
    collate = data.base.collate_dicts

    def slow_collate(items):
        pace.pause("dataloader")  # the fetch of the batch for the current step (num_workers=0)
        return collate(items)

    data.base.collate_dicts = slow_collate
    from lightning.pytorch.loops.fit_loop import _FitLoop

    setup_data = _FitLoop.setup_data

    def slow_setup_data(loop):
        pace.pause("startup", loop.trainer)
        return setup_data(loop)

    _FitLoop.setup_data = slow_setup_data


def main() -> None:
    out, phase, step, overrides = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    torch.set_num_threads(1)
    import runpy

    if phase != "none":
        install(out, phase, step)
    full_disk = os.environ.get("ERG_TEST_FULL_DISK")  # the checkpoint file name whose write fails: ENOSPC
    if full_disk:
        import errno

        import models.checkpoint_io as cio

        atomic_open = cio.atomic_open

        def full(path, *args, **kwargs):
            if Path(path).name == full_disk:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return atomic_open(path, *args, **kwargs)

        cio.atomic_open = full
    sys.argv = [str(ROOT / "train.py"), *overrides]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")  # as `python train.py OVERRIDE...`


if __name__ == "__main__":
    main()
