"""On a real SLURM scheduler (`make test-slurm`: a one-host cluster from slurm/local_cluster.sh): the sbatch
template with 2 CPU ranks, training and sampling sweeps through the submitit launchers (one job array
each, the report after it), a sweep whose job fails with a config error, and requeues by USR1 (the
template) and USR2 (submitit) that continue the same run.

Marked `slurm`: not part of the default run. Each test submits real jobs and waits for them (timeouts
make a hang fail, never block)."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, TINY_MODEL

pytestmark = pytest.mark.slurm

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
CPU_JOB = [  # what a CPU job asks instead of the template's GPUs
    "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=0", "--time=15",
]  # fmt: skip
CPU_TRAINING = [  # train.py settings of a CPU run of a few seconds
    *TINY_MODEL, "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.val_check_interval=1000000",
    "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "data.batch_size=16",
    "samples.every_n_steps=0", "samples.steps=2", "samples.per_class=1", "checkpoint.at_fractions=[]",
    "logger=csv",
]  # fmt: skip
SUBMITIT_CPU = [  # the submitit launchers' resources for one CPU task per job on this cluster
    "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0", "hydra.launcher.tasks_per_node=1",
    "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=15",
]  # fmt: skip


# --- the cluster -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    """The environment of a client of the running cluster (and of its jobs: sbatch exports it)."""
    env = dict(os.environ)
    if "SLURM_CONF" not in env:  # a cluster of slurm/local_cluster.sh started by hand
        out = subprocess.run([str(ROOT / "slurm" / "local_cluster.sh"), "env"], capture_output=True, text=True)
        match = re.search(r"SLURM_CONF=(\S+)", out.stdout)
        if match:
            env["SLURM_CONF"] = match.group(1)
    for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
        del env[key]  # not a job's: these tests submit their own
    env.pop("HYDRA_FULL_ERROR", None)  # the tests read Hydra's short error reports
    probe = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True)
    if probe.returncode != 0 or not probe.stdout.strip():
        pytest.fail(
            "no SLURM cluster answers (sinfo: "
            f"{(probe.stderr or probe.stdout).strip()[-200:]}): run `make test-slurm`, or start one with "
            '`slurm/local_cluster.sh start` and `eval "$(slurm/local_cluster.sh env)"`'
        )
    venv = env.get("ERG_VENV") or sys.prefix  # the environment running the tests
    env.update({
        "ERG_REPO": str(ROOT), "ERG_VENV": venv, "WANDB_MODE": "disabled",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    })  # fmt: skip
    return env


def job_info(env: dict[str, str], job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (finished jobs stay visible for MinJobAge: 10 min on the local cluster)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True)
    return dict(tok.split("=", 1) for tok in out.stdout.split() if "=" in tok)


def wait_for_job(env: dict[str, str], job_id: str, timeout: float, log: Path | None = None) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(env, job_id)
        if info.get("JobState") in TERMINAL:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id], env=env)
    tail = log.read_text()[-3000:] if log and log.is_file() else ""
    pytest.fail(f"job {job_id} did not end within {timeout:.0f} s (state {job_info(env, job_id)}):\n{tail}")


def wait_for_file(path: Path, timeout: float, what: str, until_gone: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline or (until_gone is not None and until_gone.poll() is not None):
            pytest.fail(f"{what}: {path} did not appear within {timeout:.0f} s")
        time.sleep(0.2)


def sbatch(env: dict[str, str], cwd: Path, *args: str) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], env=env, cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def logged_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def multirun(env: dict[str, str], cwd: Path, script: str, *overrides: str) -> subprocess.Popen:
    """`python <script> -m ...` (the launching process of a sweep), its output in cwd/launcher.log."""
    log = open(cwd / "launcher.log", "w")  # noqa: SIM115 - closed with the process by finish()
    cmd = [sys.executable, str(ROOT / script), "-m", *overrides]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, cwd: Path, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the sweep did not end within {timeout:.0f} s:\n{_launcher_log(cwd)[-3000:]}")
    return _launcher_log(cwd)


def _launcher_log(cwd: Path) -> str:
    return "\n".join(line for line in (cwd / "launcher.log").read_text().splitlines() if "sacct" not in line)


def array_tasks(submitit_dir: Path) -> list[str]:
    """The SLURM job ids of a sweep's jobs from submitit's folders (<array id>_<task>)."""
    return sorted(p.name for p in submitit_dir.iterdir() if re.fullmatch(r"\d+_\d+", p.name))


# --- the sbatch template -------------------------------------------------------------------------------
def test_sbatch_template_trains_on_two_cpu_ranks(slurm_env, tmp_path):
    """slurm/train.sbatch as a user submits it, with 2 tasks x 1 CPU: srun starts both ranks, DDP (gloo)
    trains to the last step, the log says what the job has (no GPUs) and OMP_NUM_THREADS follows
    --cpus-per-task."""
    run_dir = tmp_path / "run"
    job = sbatch(
        slurm_env, tmp_path, *CPU_JOB, "--ntasks-per-node=2", f"--output={tmp_path}/%x-%j.out",
        str(ROOT / "slurm" / "train.sbatch"), "name=two_ranks", f"run_dir={run_dir}", *CPU_TRAINING,
        "trainer.max_steps=4",
    )  # fmt: skip
    log = tmp_path / f"erg-train-{job}.out"
    info = wait_for_job(slurm_env, job, 300, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert f"job {job} (restart 0): 1 node(s) x 2 task(s) x 1 CPU(s) per node; OMP_NUM_THREADS=1" in text
    assert "MEMBER: 1/2" in text and "MEMBER: 2/2" in text  # two DDP ranks, one per SLURM task
    assert text.count("Trained to step 4") == 2
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 4
    assert logged_steps(run_dir) == [0, 1, 2, 3]


# --- sweeps through the submitit launchers -------------------------------------------------------------------
def test_training_sweep_is_one_job_array_and_writes_only_its_points(slurm_env, tmp_path):
    """train.py -m with hydra/launcher=submitit_slurm: the two points are the two tasks of one job array;
    each trains in its own run folder, and nothing is written into any other run folder (Hydra's and
    submitit's files go to multirun/train/<time>)."""
    proc = multirun(
        slurm_env, tmp_path, "train.py", "hydra/launcher=submitit_slurm", *SUBMITIT_CPU, *CPU_TRAINING,
        "trainer.max_steps=3", "name=lr${optim.lr}", "optim.lr=0.001,0.002",
    )  # fmt: skip
    out = finish(proc, tmp_path, 420)
    assert proc.returncode == 0, out[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["lr0.001", "lr0.002"]
    for name in ("lr0.001", "lr0.002"):
        assert checkpoint_step(tmp_path / "runs" / name / "checkpoints" / "last.ckpt") == 3
        assert not (tmp_path / "runs" / name / "multirun").exists()
    (sweep_dir,) = (tmp_path / "multirun" / "train").iterdir()
    tasks = array_tasks(sweep_dir / ".submitit")
    assert len(tasks) == 2 and len({t.split("_")[0] for t in tasks}) == 1, tasks  # one array, two tasks
    (script,) = (sweep_dir / ".submitit").glob("*/*_submission.sh")
    assert "#SBATCH --array=0-1" in script.read_text()
    assert all((sweep_dir / str(i) / "train.log").is_file() for i in (0, 1))  # Hydra's files of each job


@pytest.fixture(scope="module")
def sweep_assets(tmp_path_factory):
    from eval.digits_net import DigitsFeatureNet, save_digits_net
    from tests.tiny_checkpoint import fake_checkpoint

    root = tmp_path_factory.mktemp("slurm_sweep_assets")
    torch.manual_seed(0)
    weights = save_digits_net(root / "net.pt", DigitsFeatureNet(width=8, feature_dim=8), {})
    return {"ckpt": fake_checkpoint(root / "tiny.ckpt"), "weights": weights, "cache": root / "cache"}


def sampling_sweep(assets: dict, sweep_dir: Path, *extra: str) -> list[str]:
    """2 points of CFG on the tiny checkpoint (3 classes x 2 samples, 2 Euler steps), one CPU task each."""
    return [
        "hydra/launcher=submitit_slurm_1gpu", *SUBMITIT_CPU, f"sweep_dir={sweep_dir}",
        f"sample.checkpoint={assets['ckpt']}", "sample.per_class=2", "sample.shard_size=4", "sample.batch_size=4",
        "sample.sampler.steps=2", f"evaluate.features.weights={assets['weights']}",
        f"+evaluate.cache_dir={assets['cache']}", "methods=[cfg]", "grid.cfg.scale=[2.0,3.0]", "report.grid=3",
        *extra,
    ]  # fmt: skip


def test_sampling_sweep_is_one_job_array_then_the_report(slurm_env, sweep_assets, tmp_path):
    """scripts/sweep.py -m with hydra/launcher=submitit_slurm_1gpu: one array task per grid point, each
    samples and evaluates its point; the launching process waits for the array, then writes the report."""
    sweep_dir = tmp_path / "sweep"
    proc = multirun(slurm_env, tmp_path, "scripts/sweep.py", *sampling_sweep(sweep_assets, sweep_dir))
    out = finish(proc, tmp_path, 420)
    assert proc.returncode == 0, out[-3000:]
    points = ["cfg__scale-2.0", "cfg__scale-3.0"]
    assert all((sweep_dir / p / "metrics.json").is_file() for p in points)
    tasks = array_tasks(sweep_dir / ".hydra" / ".submitit")
    assert len(tasks) == 2 and len({t.split("_")[0] for t in tasks}) == 1, tasks
    ranking = (sweep_dir / "report" / "ranking.md").read_text()
    assert all(p in ranking for p in points)
    assert (sweep_dir / "report" / "table.md").is_file() and "| CFG |" in out  # printed after the array


def test_a_job_ending_with_a_config_error_fails_the_sweep_with_that_error(slurm_env, sweep_assets, tmp_path):
    """The job's entry point stops on a config error (a missing checkpoint here): the sweep ends with that
    error once the array is done. (It used to sys.exit inside the job: submitit got no result, and without
    sacct the launching process polled forever.)"""
    missing = tmp_path / "no_such.ckpt"
    sweep_dir = tmp_path / "sweep"
    overrides = sampling_sweep(sweep_assets, sweep_dir, f"sample.checkpoint={missing}", "grid.cfg.scale=[2.0]")
    proc = multirun(slurm_env, tmp_path, "scripts/sweep.py", *overrides)
    out = finish(proc, tmp_path, 300)
    assert proc.returncode != 0
    assert f"{missing}: checkpoint file not found" in out, out[-2000:]  # the job's error...
    assert "Error executing job with overrides: ['point=cfg__scale-2.0'" in out  # ...naming the point
    assert "Traceback" not in out and not (sweep_dir / "report").exists()


# --- requeue: the same run continues ----------------------------------------------------------------------
def test_template_requeue_by_usr1_on_two_ranks_continues_the_same_run(slurm_env, tmp_path):
    """SIGUSR1 (what the template's --signal=USR1@120 sends before the time limit) to both ranks of a
    slurm/train.sbatch job: the ranks agree at the next step, save checkpoints/last.ckpt together, rank 0
    runs `scontrol requeue`; SLURM starts the same script again (restart 1), which resumes the run folder
    from that checkpoint (the step the signal stopped at, not the last periodic one) and trains to the last
    step, each step logged once (models/preemption.py)."""
    steps, every = 60, 10  # the signal lands after the first checkpoint, long before the last step
    run_dir = tmp_path / "run"
    job = sbatch(
        slurm_env, tmp_path, *CPU_JOB, "--ntasks-per-node=2", f"--output={tmp_path}/%x-%j.out",
        str(ROOT / "slurm" / "train.sbatch"), "name=usr1", f"run_dir={run_dir}", *CPU_TRAINING,
        f"trainer.max_steps={steps}", f"checkpoint.every_n_steps={every}",
    )  # fmt: skip
    log = tmp_path / f"erg-train-{job}.out"
    wait_for_file(run_dir / "checkpoints" / f"step_{every:07d}.ckpt", 300, "the first checkpoint")
    signalled = subprocess.run(["scancel", "--signal=USR1", job], env=slurm_env, capture_output=True, text=True)
    assert signalled.returncode == 0, f"the job ended before the signal: {signalled.stderr} (raise steps)"
    info = wait_for_job(slurm_env, job, 600, log)
    text = log.read_text()  # both runs of the job (--open-mode=append)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-3000:]
    assert f"job {job} (restart 0)" in text and f"job {job} (restart 1)" in text

    stopped = re.findall(r"stopped by SIGUSR1 at step (\d+), checkpoint (\S+): rerun", text)
    assert len(stopped) == 1, text[-3000:]  # one line, from rank 0
    step, checkpoint = int(stopped[0][0]), Path(stopped[0][1])
    assert checkpoint == run_dir.resolve() / "checkpoints" / "last.ckpt" and every <= step < steps
    assert f"requeued SLURM job {job}" in text
    resumed = re.findall(r"resuming (\S+) from (\S+) \(step (\d+)\)", text)
    assert {(Path(a), Path(b), int(c)) for a, b, c in resumed} == {(run_dir.resolve(), checkpoint, step)}, resumed
    assert "MEMBER: 2/2" in text.split(f"job {job} (restart 1)")[1]  # the requeued job: 2 ranks again
    assert text.count("Trained to step 60") == 2
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == steps
    assert logged_steps(run_dir) == list(range(steps))  # every step once: none lost, none twice


def test_submitit_requeue_by_usr2_continues_the_same_run(slurm_env, tmp_path):
    """SIGUSR2 (what submitit's --signal=USR2@<signal_delay_s> sends before the time limit) to a training
    sweep's job: the run saves last.ckpt at the end of its step, submitit requeues the job; the requeued job
    runs the same point again, which resumes at that step and trains to the last step; the sweep then ends
    normally, every step once in metrics.csv."""
    steps, every = 60, 10  # the signal lands after the first checkpoint, long before the last step
    proc = multirun(
        slurm_env, tmp_path, "train.py", "hydra/launcher=submitit_slurm", *SUBMITIT_CPU, *CPU_TRAINING,
        f"trainer.max_steps={steps}", f"checkpoint.every_n_steps={every}", "name=usr2", "optim.lr=0.001",
    )  # fmt: skip
    run_dir = tmp_path / "runs" / "usr2"
    wait_for_file(run_dir / "checkpoints" / f"step_{every:07d}.ckpt", 300, "the first checkpoint", until_gone=proc)
    (sweep_dir,) = (tmp_path / "multirun" / "train").iterdir()
    (job,) = [p.name for p in (sweep_dir / ".submitit").iterdir() if re.fullmatch(r"\d+", p.name)]
    signalled = subprocess.run(["scancel", "--signal=USR2", job], env=slurm_env, capture_output=True, text=True)
    assert signalled.returncode == 0, f"the job ended before the signal: {signalled.stderr} (raise steps)"
    out = finish(proc, tmp_path, 600)
    assert proc.returncode == 0, out[-3000:]

    job_log = "\n".join(p.read_text() for p in sorted((sweep_dir / ".submitit").glob("*/*_log.*")))  # out, err
    assert "Requeued job" in job_log, job_log[-3000:]
    resumed = re.findall(r"resuming (\S+) from (\S+) \(step (\d+)\)", job_log)
    assert len(resumed) == 1, job_log[-3000:]
    folder, checkpoint, step = resumed[0]
    assert Path(folder) == run_dir.resolve() and Path(checkpoint).parent == run_dir.resolve() / "checkpoints"
    stopped = re.findall(r"stopped by SIGUSR2 at step (\d+), checkpoint (\S+): .*requeued through submitit", job_log)
    assert len(stopped) == 1, job_log[-3000:]
    assert int(step) == int(stopped[0][0]) >= every and Path(checkpoint).name == "last.ckpt"  # where it stopped
    assert job_info(slurm_env, job).get("Restarts") == "1"
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == steps
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["usr2"]
    assert logged_steps(run_dir) == list(range(steps))  # the retrained steps replace their first rows
