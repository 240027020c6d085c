"""Stop a training run cleanly on SIGTERM / SIGINT / SIGUSR1, on any number of ranks, and requeue it under SLURM.

What a cluster job goes through: SLURM sends SIGTERM at the time limit, on preemption and on `scancel`
(SIGKILL follows after its KillWait, 30 s by default), and the sbatch template asks for SIGUSR1 120 s
before the time limit (`#SBATCH --signal=USR1@120`). A terminal sends SIGINT on Ctrl-C.

- The signal handler only sets a flag (Lightning issue 21406: saving inside the handler can run in the
  middle of a collective on one rank while the others wait elsewhere, and hang).
- At the end of every optimizer step (`on_train_batch_end`, after the step's periodic checkpoints and
  sample grids: Lightning runs `Checkpoint` callbacks last, and this is one) the ranks agree on the flags
  with ONE all-reduce (MAX; over a CPU/gloo group, so it never waits for the GPU stream). Every rank
  reaches that point after the same number of steps, so the collective always pairs up.
- Then every rank calls `trainer.save_checkpoint(checkpoints/last.ckpt)` together (rank 0 writes it
  atomically, `models.checkpoint_io`). When the next batch starts (Lightning has logged the step's metrics
  by then) the loggers are flushed, so metrics.csv holds every step the checkpoint holds, rank 0 requeues
  the job if a rank received SIGUSR1 under SLURM (`requeue_slurm_job`), the ranks wait for it at a
  barrier, and every rank raises `RunStopped`: `train.py` prints one line (rank 0) and exits with
  128 + the signal number. Rerunning the same command resumes from there. A signal during the last step
  changes nothing: the run ends normally (last.ckpt at its final step), and nothing is requeued.
- A second Ctrl-C stops at once (KeyboardInterrupt), as a user pressing it twice expects; the checkpoints
  on disk stay intact (atomic writes).

Lightning's own SLURM auto-requeue (it saves inside the USR1 handler) is switched off where the run is
assembled (`models.training`: `SLURMEnvironment(auto_requeue=False)`), and the SIGTERM handler Lightning
would install when `fit` starts (it broadcasts inside the handler, then exits with code 0) is never
installed (`GracefulStop.setup`).

A job of a submitit sweep (`hydra/launcher=submitit_slurm`): submitit's own handler for its preemption
signal (SIGUSR2 `signal_delay_s` before the time limit) requeues the job and `sys.exit`s wherever the
signal lands, so the steps since the last periodic checkpoint were trained again, and an exit between a
periodic checkpoint and the logging of its step lost that step's row in metrics.csv. Here that handler is
deferred like the others: the flag is agreed on at the step boundary, every rank saves last.ckpt, then
rank 0 runs submitit's handler (its requeue bookkeeping, `scontrol requeue`) with its exit held back, and
the ranks stop together as for SIGUSR1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Checkpoint

from models.checkpoint_io import share_write_errors

__all__ = ["STOP_SIGNALS", "GracefulStop", "RunStopped", "on_slurm", "requeue_slurm_job", "slurm_job_id"]

log = logging.getLogger("erg.train")

# The signals that stop a run; SIGUSR1 also requeues it under SLURM. Their order is the flag vector's.
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
REQUEUE_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR1,)
REQUEUE_COMMAND: tuple[str, ...] = ("scontrol", "requeue")
# submitit's preemption signal (its `SUBMITIT_PREEMPT_SIGNAL`, USR2 by default): deferred to a step boundary
# when submitit has a handler on it (a job of a submitit sweep), and then requeued through that handler
SUBMITIT_SIGNAL: signal.Signals = getattr(signal, f"SIG{os.environ.get('SUBMITIT_PREEMPT_SIGNAL', 'USR2')}")
FLAG_SIGNALS: tuple[signal.Signals, ...] = tuple(dict.fromkeys([*STOP_SIGNALS, SUBMITIT_SIGNAL]))


class RunStopped(Exception):
    """Training was stopped by a signal after saving a checkpoint; `str()` is the one line to print."""

    def __init__(
        self,
        signals: list[signal.Signals],
        step: int,
        checkpoint: Path | None,
        requeue: str | None,
        rank: int = 0,
        exit_code: int | None = None,
    ):
        self.signals = signals
        self.rank = rank  # the one line is printed by rank 0
        self.step = step
        self.checkpoint = checkpoint
        self.requeue = requeue  # what the requeue did (None: not asked)
        self._exit_code = exit_code
        super().__init__(self.message())

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process the signal ended (or the code submitit's
        requeue exits with, which its local executor reads as "requeue me")."""
        return self._exit_code if self._exit_code is not None else 128 + int(self.signals[0])

    def message(self) -> str:
        names = "/".join(s.name for s in self.signals)
        if self.checkpoint is None:  # a smoke run (fast_dev_run) keeps no checkpoint: nothing to resume
            return f"stopped by {names} at step {self.step} (a smoke run: no checkpoint, nothing to resume)"
        line = f"stopped by {names} at step {self.step}, checkpoint {self.checkpoint}: rerun the same command to resume"
        return line if self.requeue is None else f"{line} ({self.requeue})"


def slurm_job_id() -> str | None:
    """This job's id as `scontrol` takes it (`<array job>_<task>` for a job array task); None outside SLURM."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def on_slurm() -> bool:
    """A batch job of SLURM (not an interactive allocation: job name `bash` / `interactive`, as Lightning)."""
    return slurm_job_id() is not None and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def requeue_slurm_job(command: Sequence[str] = REQUEUE_COMMAND) -> tuple[bool, str]:
    """Requeue this SLURM job: `scontrol requeue $SLURM_JOB_ID` (the one place that does). Returns (done,
    what happened); a failure is reported, never raised: the checkpoint is saved either way."""
    job = slurm_job_id()
    cmd = [*command, str(job)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, f"`{' '.join(cmd)}` failed ({err}); the job was not requeued"
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        why = f": {detail[-1]}" if detail else ""
        return False, f"`{' '.join(cmd)}` exited {result.returncode}{why}; the job was not requeued"
    return True, f"requeued SLURM job {job}: it resumes from this checkpoint when it starts again"


def _submitit_handler(sig: signal.Signals) -> Any:
    """submitit's requeue handler on `sig` (set in a job of a submitit sweep), or None."""
    handler = signal.getsignal(sig)
    owner = getattr(handler, "__self__", None)
    requeues = getattr(handler, "__name__", "") == "checkpoint_and_try_requeue"
    return handler if requeues and type(owner).__module__.startswith("submitit.") else None


class GracefulStop(Checkpoint):
    """Finish the current step, save `checkpoint`, requeue under SLURM on SIGUSR1, stop with `RunStopped`.

    A `Checkpoint` callback so that Lightning runs it after the other callbacks (put it after the
    ModelCheckpoint in the list: `trainer.checkpoint_callback` is the first one). A save at the end of a
    training batch is also the point Lightning's own checkpoints are taken at, which its resume logic
    expects (the loop counters, the logging step).

    Use `with stop.handling_signals(): trainer.fit(...)`: the handlers are installed before `fit` (so a
    signal during start-up is not lost), re-installed at `on_train_start` over Lightning's SIGTERM handler,
    and the previous handlers are restored when the block ends. `checkpoint=None` (a smoke run) stops
    without saving. `requeue_command` is the command `requeue_slurm_job` runs (tests pass a fake one).
    """

    def __init__(self, checkpoint: str | Path | None, requeue_command: Sequence[str] = REQUEUE_COMMAND):
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.requeue_command = tuple(requeue_command)
        self.received: dict[signal.Signals, bool] = dict.fromkeys(FLAG_SIGNALS, False)
        self._pid = os.getpid()
        self._previous: dict[signal.Signals, Any] = {}
        self._submitit: Any = None  # submitit's requeue handler, run at the step boundary (a submitit job)
        self._group: Any = None  # the process group of the flag all-reduce (None: the default group)
        self._checked_step: int | None = None
        self._signals: list[signal.Signals] = []  # agreed at a step boundary and saved: stop at the next batch

    # --- signal handlers: a flag only ----------------------------------------------------------------
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: the main process decides
            return
        sig = signal.Signals(signum)
        if sig == signal.SIGINT and self.received[sig]:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now (checkpoints on disk are never partial)
        self.received[sig] = True

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python only lets the main thread set handlers (Lightning skips them there too)
        if self._submitit is None and SUBMITIT_SIGNAL not in self._previous:
            self._submitit = _submitit_handler(SUBMITIT_SIGNAL)
        signals = [*STOP_SIGNALS, *([SUBMITIT_SIGNAL] if self._submitit is not None else [])]
        for sig in dict.fromkeys(signals):
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator[GracefulStop]:
        """Install the stop handlers for the duration of the block (main thread only), then restore."""
        self._install()
        try:
            yield self
        finally:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
            self._previous = {}

    # --- the agreement at step boundaries ----------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning registers its own SIGTERM handler when fit starts (after this hook, before on_train_start:
        # while the dataloaders are built). It broadcasts inside the handler and exits with code 0 and no
        # message; ours are installed already, so Lightning's registration is switched off for this Trainer.
        trainer._signal_connector.register_signal_handlers = lambda: None
        share_write_errors(trainer, group=lambda: self._group)  # on the flags' CPU group, once it exists

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()  # (again: a handler installed by other code since `handling_signals` began)
        self._checked_step = trainer.global_step
        if _distributed(trainer) and dist.get_backend() != "gloo":
            # NCCL (GPUs): the flags travel on a CPU group, so reading them never waits for the GPU stream.
            # Created on every rank in the same order (on_train_start runs everywhere), as new_group requires.
            self._group = dist.new_group(backend="gloo")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self._checked_step or self._signals:  # mid-accumulation, or already stopping
            return
        self._checked_step = step
        signals = self._agree(trainer)
        if signals and not (0 < trainer.max_steps <= step):  # (the last step ends the run anyway)
            self._save(trainer, signals)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._signals:  # saved at the end of the previous step; its metrics are logged by now
            raise self._requeue_and_stop(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if any(self.received.values()) and trainer.is_global_zero:  # (the run ended before the next batch)
            log.info("a stop signal arrived during the last step; training had finished, nothing to resume")

    def _agree(self, trainer: L.Trainer) -> list[signal.Signals]:
        """The signals any rank received, the same list on every rank (one all-reduce of a few ints)."""
        flags = torch.tensor([int(self.received[s]) for s in FLAG_SIGNALS], dtype=torch.int32)
        if _distributed(trainer):
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        return [s for s, f in zip(FLAG_SIGNALS, flags.tolist()) if f]

    def _save(self, trainer: L.Trainer, signals: list[signal.Signals]) -> None:
        self._signals = signals
        if trainer.is_global_zero:
            names = "/".join(s.name for s in signals)
            log.warning("%s received: saving a checkpoint at step %d, then stopping", names, trainer.global_step)
        if self.checkpoint is not None:
            trainer.save_checkpoint(self.checkpoint)  # every rank; rank 0 writes; ends with a barrier

    def _requeue_and_stop(self, trainer: L.Trainer) -> BaseException:
        """At the start of the batch after the save: flush the loggers (metrics.csv then holds every step the
        checkpoint holds, before the requeue makes SLURM end the job), rank 0 requeues if asked, the ranks wait
        for it together, then every rank stops."""
        signals, step = self._signals, trainer.global_step
        requeue, exit_code, error = None, None, None
        if self._submitit is not None and SUBMITIT_SIGNAL in signals:
            requeue = "requeued through submitit by rank 0"
        elif any(s in REQUEUE_SIGNALS for s in signals) and on_slurm():
            requeue = "requeued by rank 0"
        if requeue is not None:
            for logger in trainer.loggers:
                logger.save()
            if trainer.is_global_zero and self._submitit is not None and SUBMITIT_SIGNAL in signals:
                requeue, exit_code, error = self._requeue_through_submitit()
            elif trainer.is_global_zero:
                done, requeue = requeue_slurm_job(self.requeue_command)
                (log.info if done else log.warning)("%s", requeue)
            if _distributed(trainer):
                dist.barrier(group=self._group)  # no rank exits (ending the job step) before rank 0 has requeued
        if error is not None:  # submitit did not requeue: its error ends the job with a result, as submitit means
            return error
        return RunStopped(signals, step, self.checkpoint, requeue, rank=trainer.global_rank, exit_code=exit_code)

    def _requeue_through_submitit(self) -> tuple[str, int | None, Exception | None]:
        """Run submitit's handler now (rank 0; the checkpoint is saved): its bookkeeping (the resubmission
        pickle, the timeout countdown) and its requeue, but not its `sys.exit`, which waits until the ranks
        stop together. (what happened, the exit code its requeue asks for, the error it raised instead)"""
        owner = self._submitit.__self__
        owner._exit = lambda: None  # submitit's exit after requeueing ("extracted for mocking" there)
        done = "requeued through submitit: the job resumes from this checkpoint when it starts again"
        try:
            self._submitit(int(SUBMITIT_SIGNAL), None)
        except SystemExit as requeued:  # the local executor requeues by exiting with a code it recognises
            return done, requeued.code if isinstance(requeued.code, int) else None, None
        except Exception as err:  # e.g. timed out too many times: submitit raises so that the job gets a result
            log.warning("submitit did not requeue the job: %s", one_line(err))
            return f"submitit did not requeue the job ({one_line(err)})", None, err
        return done, None, None


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _distributed(trainer: L.Trainer) -> bool:
    return trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
