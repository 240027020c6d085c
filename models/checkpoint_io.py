"""Checkpoint files written atomically on any filesystem, and read back only if they are whole.

Lightning's default writer goes through fsspec: the bytes are written under `$TMPDIR` and then moved over
the final name. On a cluster `$TMPDIR` is node-local and the run folder is on shared storage, so the move
is a copy: a kill or a full disk during it leaves a truncated `last.ckpt` under its final name, and every
rerun then fails on it. `AtomicCheckpointIO` (a Lightning `CheckpointIO` plugin, so periodic, last, at
fractions and stop checkpoints all go through it) streams `torch.save` into a temporary file beside the
final name (`models.io.atomic_open`: same folder, same filesystem), fsyncs it and renames it into place.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from models.io import atomic_open, stale_temporaries

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointWriteError",
    "read_checkpoint_step",
    "save_checkpoint_atomic",
    "share_write_errors",
]


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, permissions); the previous file is intact.
    `reported_by_rank0`: raised on another rank of a run whose rank 0 failed to write (rank 0 prints the line)."""

    reported_by_rank0 = False

    def __str__(self) -> str:  # the message alone (OSError's own str puts "[Errno 28] " before it)
        return self.strerror or super().__str__()


def save_checkpoint_atomic(checkpoint: dict[str, Any], path: str | Path) -> Path:
    """`torch.save(checkpoint, path)` so that `path` holds the previous file or the new one, never a part.
    Temporaries left by writers killed earlier (SIGKILL: nothing could remove them), of this checkpoint and
    of the folder's other checkpoints, are removed after a successful write; one process writes a run's
    checkpoints (rank 0), one at a time, so none of them is still in use."""
    path = Path(path)
    try:
        with atomic_open(path) as f:
            torch.save(checkpoint, f)
    except Exception as raised:
        err = _os_error(raised)
        if err is None:
            raise
        previous = f"the previous {path.name} is intact" if path.exists() else "no earlier file had that name"
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            what = "the disk is full" if err.errno == errno.ENOSPC else "the disk quota is exceeded"
            fix = "Free space (or write checkpoints less often: checkpoint.every_n_steps)"
        elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            what = f"the folder is not writable ({err.strerror or err})"
            fix = f"Make {path.parent} writable (or train into another folder: run_dir=...)"
        else:
            what, fix = err.strerror or str(err), "Fix the cause"
        raise CheckpointWriteError(
            err.errno,
            f"could not write checkpoint {path}: {what}; {previous} and no partial file was left. {fix} and rerun "
            "the same command to resume",
        ) from raised
    # temporaries of any checkpoint of this folder left by a writer killed earlier (SIGKILL: nothing could
    # remove them; a step_*.ckpt name is written only once, so its own next write would never come)
    for stale in {*stale_temporaries(path), *path.parent.glob(".*.ckpt.*.tmp")}:
        stale.unlink(missing_ok=True)
    return path


def _os_error(err: BaseException | None) -> OSError | None:
    """The OSError behind `err`: torch.save's zip writer turns a failed write (ENOSPC) into a RuntimeError
    ("unexpected pos ...") raised while the OSError is being handled."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO with an atomic, same-folder write (loading is unchanged)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (it writes local/shared files)")
        save_checkpoint_atomic(checkpoint, path)


def share_write_errors(trainer: Any, group: Callable[[], Any] = lambda: None) -> None:
    """Make every checkpoint save of `trainer` end with the ranks agreeing on whether rank 0 (the writer)
    failed, so that a full disk stops every rank behind rank 0's one line instead of leaving the others
    waiting for it at the save's barrier (a gloo traceback on CPU, an NCCL hang until its timeout on GPUs).
    The other ranks raise a `CheckpointWriteError` with `reported_by_rank0` set. `group()`: the process group
    of the agreement (a CPU/gloo one; None: the default group, used only where it is gloo)."""
    import torch.distributed as dist

    strategy = trainer.strategy
    save = strategy.save_checkpoint

    def save_and_agree(checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        failed: CheckpointWriteError | None = None
        try:
            save(checkpoint, filepath, storage_options=storage_options)
        except CheckpointWriteError as err:
            failed = err
        distributed = trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
        if distributed and (group() is not None or dist.get_backend() == "gloo"):
            flag = torch.tensor([int(failed is not None)], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group())
            if flag.item() and failed is None:
                failed = CheckpointWriteError(errno.EIO, f"rank 0 could not write checkpoint {filepath}")
                failed.reported_by_rank0 = True
        if failed is not None:
            raise failed

    strategy.save_checkpoint = save_and_agree


def read_checkpoint_step(path: str | Path) -> int:
    """The training step a checkpoint holds, read through a full (memory-mapped, weights-only) load, so a
    truncated or foreign file raises. The mmap makes it cheap: tensor bytes are mapped, not read."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("global_step"), int):
        raise ValueError("not a training checkpoint (no global_step)")
    return ckpt["global_step"]
