"""Signals end runs cleanly (models/preemption.py), tested on real processes of the real entry point:
SIGTERM / SIGINT / SIGUSR1 at chosen phases of a step (inside forward, backward, the optimizer step, the
batch fetch) or at random moments, on one process and on 2 CPU ranks (gloo, DDP through Lightning). Every
trial must end (a hang fails on a timeout), exit with 128 + the signal and one line from rank 0, leave
last.ckpt at the step reached, and the rerun of the same command must end bit for bit where an
uninterrupted run ends, with every step once in metrics.csv."""

from __future__ import annotations

import contextlib
import csv
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, small_run_overrides

STEPS = 10
EXTRA = ["checkpoint.every_n_steps=4", "optim.warmup_steps=2", "checkpoint.at_fractions=[]"]
DDP = ["trainer=multinode", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.num_nodes=1",
       "trainer.precision=32-true", "trainer.benchmark=false", "data.batch_size=8"]  # fmt: skip
PHASES = ["forward", "backward", "optimizer", "dataloader", "startup", "start"]
SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1]
WAIT_S = 300  # a start or an exit slower than this is a hang (the 2-core machine is shared)
STOPPED = re.compile(r"stopped by (\w+) at step (\d+), checkpoint (\S+): rerun the same command to resume( \(.+\))?")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """`world` processes of tests/stop_worker.py, started the way `srun --ntasks-per-node=<world>` does
    (world 1: a plain process, no SLURM variables). A fake `scontrol` in PATH records requeues."""

    def __init__(self, tmp: Path, run_dir: Path, world: int, phase: str = "none", step: int = 0):
        self.markers = tmp / "markers"
        self.markers.mkdir(parents=True, exist_ok=True)
        for old in self.markers.iterdir():
            old.unlink()
        bin_dir = tmp / "bin"
        bin_dir.mkdir(exist_ok=True)
        self.scontrol_calls = tmp / "scontrol_calls"
        (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {self.scontrol_calls}\n')
        (bin_dir / "scontrol").chmod(0o755)
        base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        base.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PATH=f"{bin_dir}:{os.environ['PATH']}")
        overrides = [*small_run_overrides(run_dir, STEPS, EXTRA), *(DDP if world > 1 else [])]
        port = _free_port()
        self.procs = []
        for rank in range(world):
            env = dict(base)
            if world > 1:
                env.update({
                    "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "erg-test", "SLURM_NTASKS": str(world),
                    "SLURM_NTASKS_PER_NODE": str(world), "SLURM_NNODES": "1", "SLURM_PROCID": str(rank),
                    "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                })  # fmt: skip
            cmd = [sys.executable, str(ROOT / "tests" / "stop_worker.py"), str(self.markers), phase, str(step),
                   *overrides]  # fmt: skip
            self.procs.append(subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True))  # fmt: skip

    def wait_for(self, name: str) -> bool:
        """Wait until a rank wrote the marker `name` (False: every process ended first)."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if any(self.markers.glob(f"{name}.rank*")):
                return True
            if all(p.poll() is not None for p in self.procs):
                return False
            time.sleep(0.02)
        self.kill()
        pytest.fail(f"no rank reached {name} within {WAIT_S} s")

    def signal(self, sig: signal.Signals, ranks: list[int]) -> None:
        for r in ranks:
            with contextlib.suppress(ProcessLookupError):  # that rank already finished
                os.kill(self.procs[r].pid, sig)

    def sent(self) -> None:
        """Tell the paused ranks the signal is on its way (tests/stop_worker.py waits for this file)."""
        (self.markers / "sent").write_text("")

    def finish(self) -> tuple[list[int], list[str]]:
        """Every process's exit code and output; a process still running after WAIT_S is a hang."""
        outputs = []
        try:
            for p in self.procs:
                outputs.append(p.communicate(timeout=WAIT_S)[0])
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"hang: a rank did not exit within {WAIT_S} s of the signal")
        return [p.returncode for p in self.procs], outputs

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _run(tmp: Path, run_dir: Path, world: int) -> None:
    """A run to the end (the same command, no signal)."""
    rcs, outputs = Job(tmp, run_dir, world).finish()
    assert rcs == [0] * world, outputs[0][-3000:]


def _run_here(run_dir: Path) -> None:
    """The uninterrupted one-process run, in this process (saves a start-up); one thread, as the workers."""
    from models.training import run
    from tests.conftest import compose

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(compose(overrides=small_run_overrides(run_dir, STEPS, EXTRA)))
    finally:
        torch.set_num_threads(threads)


def _interrupt(tmp: Path, run_dir: Path, world: int, phase: str, step: int, sig: signal.Signals,
               ranks: list[int]) -> int | None:  # fmt: skip
    """Start the same command, signal `ranks` while they are inside `phase` of `step` (or at a random moment
    after the first batch: phase `start`), check how the run ended; the step it stopped at (None: the run had
    finished before the signal came)."""
    trial = f"{sig.name} to rank(s) {ranks} in {phase} of step {step}"
    job = Job(tmp, run_dir, world, phase, step)
    reached = job.wait_for(phase)
    if phase == "start":
        time.sleep(random.uniform(0.0, 0.3))  # a random moment of the next few steps
    requeues_before = job.scontrol_calls.read_text() if job.scontrol_calls.exists() else ""
    if reached:
        job.signal(sig, ranks)
        job.sent()
    rcs, outputs = job.finish()
    for out in outputs:
        assert "Traceback" not in out, f"{trial}:\n{out[-4000:]}"
    if rcs == [0] * world:  # the signal came after the last step: nothing to resume
        return None
    assert rcs == [128 + sig] * world, f"{trial}: exit codes {rcs}\n{outputs[0][-3000:]}"
    lines = [line for line in outputs[0].splitlines() if line.strip()]
    match = STOPPED.fullmatch(lines[-1])
    assert match, f"{trial}: the last line is not the stop message:\n{outputs[0][-3000:]}"
    assert sum(bool(STOPPED.search(line)) for out in outputs for line in out.splitlines()) == 1  # one line
    stopped_at, ckpt = int(match[2]), Path(match[3])
    assert match[1] == sig.name and ckpt == run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == stopped_at, trial
    if phase in ("forward", "backward", "optimizer"):
        assert stopped_at == step + 1, trial  # the step in progress was finished, and no other
    else:
        assert stopped_at >= step, trial
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt")), trial  # Lightning's own requeue (saves in the handler) is off
    requeues = job.scontrol_calls.read_text()[len(requeues_before) :] if job.scontrol_calls.exists() else ""
    if sig == signal.SIGUSR1 and world > 1:  # under SLURM: rank 0 requeued the job, once
        assert requeues.split() == ["requeue", "4242"], trial
        assert "requeued SLURM job 4242" in lines[-1]
    else:
        assert requeues == "", trial
    return stopped_at


def _assert_same_end(run_dir: Path, reference: Path) -> None:
    """The resumed run ends bit for bit where the uninterrupted one ends; metrics.csv has each step once."""
    a = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for i, state in a["optimizer_states"][0]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[name], b["optimizer_states"][0]["state"][i][name]), (i, name)
    with open(run_dir / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = Counter((k, r["step"]) for r in rows for k, v in r.items() if v and k not in ("step", "epoch"))
    assert max(logged.values()) == 1, [k for k, n in logged.items() if n > 1]
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == list(range(STEPS))
    with open(reference / "logs" / "metrics.csv") as f:
        expected = [r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")]
    assert [r["train/loss"] for r in rows if r.get("train/loss")] == expected


def test_sigterm_then_sigusr1_outside_slurm_stop_a_run_that_resumes_exactly(tmp_path):
    """One process, no SLURM: SIGTERM inside the forward pass, then (in the rerun) SIGUSR1 inside the
    optimizer step, which outside SLURM does what SIGTERM does, then SIGTERM while the resumed run starts up
    (where Lightning's own SIGTERM handler would be active: it exited 0 with no message); the fourth run ends
    like an uninterrupted one."""
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    _run_here(reference)
    assert _interrupt(tmp_path, run_dir, 1, "forward", 3, signal.SIGTERM, [0]) == 4
    assert _interrupt(tmp_path, run_dir, 1, "optimizer", 6, signal.SIGUSR1, [0]) == 7
    assert _interrupt(tmp_path, run_dir, 1, "startup", 7, signal.SIGTERM, [0]) == 8  # (the first step, then)
    _run(tmp_path, run_dir, 1)
    _assert_same_end(run_dir, reference)


def _two_rank_trials(tmp_path: Path, n: int) -> None:
    """n interruptions of one run at random (phase, signal, ranks), each in the run resumed from the last."""
    seed = int(os.environ.get("ERG_TEST_SEED", random.randrange(2**32)))
    print(f"trials of seed {seed} (ERG_TEST_SEED={seed} draws the same ones)")  # shown when the test fails
    rng = random.Random(seed)
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    _run(tmp_path, reference, 2)
    resumed_at = 0
    for _ in range(n):
        if resumed_at >= STEPS - 1:
            break
        step = rng.randint(resumed_at, min(resumed_at + 2, STEPS - 2))
        stopped = _interrupt(tmp_path, run_dir, 2, rng.choice(PHASES), step, rng.choice(SIGNALS),
                             rng.choice([[0], [1], [0, 1]]))  # fmt: skip
        if stopped is None:  # the signal came after the last step
            break
        resumed_at = stopped
    _run(tmp_path, run_dir, 2)
    _assert_same_end(run_dir, reference)


def test_two_ranks_stop_together_and_resume_bit_for_bit(tmp_path):
    """2 CPU ranks (gloo, Lightning DDP): a signal (SIGTERM / SIGINT / SIGUSR1, which requeues under SLURM) to
    one rank or both, at a random phase (forward, backward, optimizer, batch fetch, a random moment), twice."""
    _two_rank_trials(tmp_path, 2)


@pytest.mark.slow
@pytest.mark.parametrize("chain", range(4))
def test_two_ranks_stop_together_many_trials(tmp_path, chain):
    """The same, 4 chains x 4 interruptions at random phases, signals and ranks."""
    _two_rank_trials(tmp_path, 4)


def test_lightning_slurm_auto_requeue_is_off(monkeypatch):
    """Under SLURM the Trainer gets Lightning's SLURM environment with auto_requeue=False, so Lightning installs
    no SIGUSR1 handler of its own (it would save inside it: Lightning issue 21406); the default one would."""
    import lightning as L
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from models.checkpoint_io import AtomicCheckpointIO
    from models.training import _plugins

    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "erg-train", "SLURM_NTASKS": "1",
             "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}  # fmt: skip
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)

    def usr1_handler_lightning_installs(plugins: list) -> object:
        trainer = L.Trainer(accelerator="cpu", devices=1, plugins=plugins, logger=False, enable_checkpointing=False)
        before = signal.getsignal(signal.SIGUSR1)
        trainer._signal_connector.register_signal_handlers()
        try:
            return signal.getsignal(signal.SIGUSR1) if signal.getsignal(signal.SIGUSR1) is not before else None
        finally:
            trainer._signal_connector.teardown()

    plugins = _plugins(None)
    environments = [p for p in plugins if isinstance(p, SLURMEnvironment)]
    assert len(environments) == 1 and environments[0].auto_requeue is False
    assert any(isinstance(p, AtomicCheckpointIO) for p in plugins)
    assert usr1_handler_lightning_installs(plugins) is None
    assert usr1_handler_lightning_installs([SLURMEnvironment()]) is not None  # Lightning's default would


def test_the_handlers_only_set_flags_a_second_ctrl_c_stops_at_once_and_forks_ignore_them():
    """The handlers (no training): each signal sets its flag; a second SIGINT raises KeyboardInterrupt; a forked
    DataLoader worker ignores the signals (the main process decides); the previous handlers come back."""
    from models.preemption import GracefulStop

    before = {s: signal.getsignal(s) for s in SIGNALS}
    stop = GracefulStop(None)
    with stop.handling_signals():
        pid = os.fork()
        if pid == 0:  # a forked worker: SIGTERM must neither kill it nor set a flag that matters
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            os._exit(3 if stop.received[signal.SIGTERM] else 0)
        assert os.waitpid(pid, 0)[1] == 0  # alive, exited by itself, flag untouched
        for sig in SIGNALS:
            os.kill(os.getpid(), sig)
            time.sleep(0.01)
        assert all(stop.received[s] for s in SIGNALS) and not stop.received[signal.SIGUSR2]  # no submitit here
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert {s: signal.getsignal(s) for s in SIGNALS} == before


def test_a_run_ended_before_its_first_checkpoint_reruns_with_each_step_once(tmp_path):
    """Two Ctrl-C inside step 2 (the second stops at once: no checkpoint, Lightning flushes the rows logged so
    far on its way out); the rerun starts from nothing and logs those steps again, so it must replace them."""
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    _run_here(reference)
    job = Job(tmp_path, run_dir, 1, "optimizer", 2)
    assert job.wait_for("optimizer")
    job.signal(signal.SIGINT, [0])
    time.sleep(0.2)
    job.signal(signal.SIGINT, [0])
    job.sent()
    rcs, outputs = job.finish()
    assert rcs != [0], outputs[0][-3000:]
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()
    with open(run_dir / "logs" / "metrics.csv") as f:
        assert [r["step"] for r in csv.DictReader(f) if r.get("train/loss")], "no rows: nothing to log twice"
    _run(tmp_path, run_dir, 1)
    _assert_same_end(run_dir, reference)


def test_submitits_preemption_signal_saves_at_the_step_boundary_and_the_requeued_job_continues(tmp_path):
    """A job of a submitit sweep (hydra/launcher=submitit_local: submitit's real job process, its USR2 handler and
    its requeue, on this machine) gets SIGUSR2, submitit's preemption signal, inside the optimizer step of step 5:
    the step finishes, last.ckpt is saved at step 6 (not only the periodic one of step 4), submitit requeues the job
    (its local executor: exit 144, started again), the requeued job resumes at step 6, the sweep ends normally, and
    the run ends bit for bit where the uninterrupted one ends, every step once in metrics.csv."""
    reference, run_dir, markers, sweep = (tmp_path / n for n in ("reference", "run", "markers", "sweep"))
    _run_here(reference)
    markers.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", ERG_TEST_PACE=f"{markers}:optimizer:5",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "pace"), str(ROOT)]))  # fmt: skip
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}",
           *small_run_overrides(run_dir, STEPS, EXTRA)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marker = markers / "optimizer.rank0"
    deadline = time.monotonic() + WAIT_S
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if not marker.exists():
        proc.kill()
        pytest.fail(f"the submitit job never reached step 5:\n{proc.communicate()[0][-3000:]}")
    os.kill(int(marker.read_text().split()[1]), signal.SIGUSR2)
    (markers / "sent").write_text("")
    try:
        out = proc.communicate(timeout=2 * WAIT_S)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("hang: the sweep did not end after submitit's requeue")
    assert proc.returncode == 0, out[-3000:]
    job_logs = "\n".join(p.read_text() for p in sorted((sweep / ".submitit").glob("*/*_log.*")))
    stopped = [m for line in job_logs.splitlines() if (m := STOPPED.search(line))]
    assert len(stopped) == 1 and stopped[0][1] == "SIGUSR2" and stopped[0][2] == "6", job_logs[-4000:]
    assert "requeued through submitit" in stopped[0][0] and "Requeued job" in job_logs, job_logs[-4000:]
    assert re.search(r"resuming \S+ from \S+last\.ckpt \(step 6\)", job_logs), job_logs[-4000:]
    assert "Traceback" not in job_logs, job_logs[-4000:]
    _assert_same_end(run_dir, reference)


def test_a_full_disk_on_two_ranks_stops_both_with_rank_0s_one_line(tmp_path, monkeypatch):
    """2 ranks; rank 0's write of the periodic checkpoint of step 4 fails as a full disk does: both ranks end
    (rank 1 is not left waiting at the save's barrier), exit 1, rank 0 says so in one line, no traceback."""
    monkeypatch.setenv("ERG_TEST_FULL_DISK", "step_0000004.ckpt")
    rcs, outputs = Job(tmp_path, tmp_path / "run", 2).finish()
    assert rcs == [1, 1], (rcs, outputs[0][-3000:], outputs[1][-3000:])
    assert not any("Traceback" in out for out in outputs), outputs[1][-3000:]
    lines = [line for line in outputs[0].splitlines() if line.strip()]
    assert lines[-1].startswith("error: could not write checkpoint "), lines[-1]
    assert "step_0000004.ckpt: the disk is full" in lines[-1], lines[-1]
    assert not any(line.startswith("error:") for line in outputs[1].splitlines()), outputs[1][-2000:]
    assert not list((tmp_path / "run" / "checkpoints").glob("*step_0000004*"))  # no partial file
