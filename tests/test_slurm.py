"""SLURM: resume picks the newest checkpoint (requeue or last), the requeue signal path end to end
with a fake `scontrol`, the sbatch template, the submitit launcher and the trainer configs."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from models import training
from models.runtime import ConfigError, find_resume_checkpoint
from tests.conftest import ROOT, compose, small_run_overrides

SLURM_ENV = {
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "erg-train", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_NNODES": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
}  # fmt: skip


def _fake_checkpoint(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step}, path)
    return path


def test_resume_auto_takes_the_newest_checkpoint_of_the_run(tmp_path):
    run = tmp_path / "run"
    assert find_resume_checkpoint(run, "auto") is None
    last = _fake_checkpoint(run / "checkpoints" / "last.ckpt", 1000)
    assert find_resume_checkpoint(run, "auto") == last
    hpc1 = _fake_checkpoint(run / "hpc_ckpt_1.ckpt", 1500)  # written when SLURM signalled the requeue
    assert find_resume_checkpoint(run, "auto") == hpc1
    last = _fake_checkpoint(run / "checkpoints" / "last.ckpt", 2000)  # the requeued job went on
    assert find_resume_checkpoint(run, "auto") == last
    hpc2 = _fake_checkpoint(run / "hpc_ckpt_2.ckpt", 2000)  # same step, written later: the requeue one
    os.utime(hpc2, ns=(last.stat().st_mtime_ns + 10**9,) * 2)
    assert find_resume_checkpoint(run, "auto") == hpc2
    (run / "hpc_ckpt_3.ckpt").write_bytes(b"truncated")  # unreadable: never chosen
    assert find_resume_checkpoint(run, "auto") == hpc2

    only_hpc = tmp_path / "only_hpc"
    _fake_checkpoint(only_hpc / "hpc_ckpt_1.ckpt", 10)
    with pytest.raises(ConfigError, match=r"already holds a run \(hpc_ckpt_1.ckpt\)"):
        find_resume_checkpoint(only_hpc, "never")


def test_requeue_signal_saves_requeues_and_the_next_job_continues_exactly(tmp_path, monkeypatch):
    """SIGUSR1 under SLURM (`#SBATCH --signal=USR1@120`): the step finishes, last.ckpt is saved at it, rank 0
    runs `scontrol requeue $SLURM_JOB_ID` (a fake one here; tests/test_preemption.py runs real processes),
    the run stops with RunStopped, and the requeued job (same command) continues exactly."""
    import lightning as L

    from models.preemption import RunStopped

    calls = tmp_path / "scontrol_calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    extra = ["checkpoint.every_n_steps=3", "optim.warmup_steps=2"]

    straight = tmp_path / "straight"
    training.run(compose(overrides=small_run_overrides(straight, 8, extra)))

    class SignalAtStep5(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 5:
                os.kill(os.getpid(), signal.SIGUSR1)  # what `#SBATCH --signal=USR1@120` sends

    for key, value in {**SLURM_ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}"}.items():
        monkeypatch.setenv(key, value)
    build = training.build_callbacks
    monkeypatch.setattr(training, "build_callbacks", lambda cfg, run_dir: [*build(cfg, run_dir), SignalAtStep5()])
    run_dir = tmp_path / "job"
    with pytest.raises(RunStopped) as stopped:
        training.run(compose(overrides=small_run_overrides(run_dir, 8, extra)))
    assert calls.read_text().split() == ["requeue", "4242"]
    assert stopped.value.step == 5 and stopped.value.exit_code == 128 + signal.SIGUSR1
    assert "stopped by SIGUSR1 at step 5" in str(stopped.value) and "requeued SLURM job 4242" in str(stopped.value)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handlers are gone after the run

    monkeypatch.setattr(training, "build_callbacks", build)  # the requeued job: same command, same env
    assert find_resume_checkpoint(run_dir, "auto") == run_dir / "checkpoints" / "last.ckpt"
    summary = training.run(compose(overrides=small_run_overrides(run_dir, 8, extra)))
    assert summary["step"] == 8
    # it continued at step 5 (no step trained twice, as resuming from step_0000003.ckpt would), each step logged once
    with open(run_dir / "logs" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps == list(range(8))
    # ...and ends where an uninterrupted run ends (last.ckpt: the final step, 8)
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    a, b = a["state_dict"], b["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _sbatch(tmp_path: Path, *args: str, **slurm_env: str) -> subprocess.CompletedProcess:
    """Run slurm/train.sbatch as SLURM would on the first node, with `srun` replaced by a recorder of its
    arguments and of the thread settings its tasks would inherit."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(
        f'#!/bin/sh\necho "$@" > {tmp_path / "srun_args"}\necho "$OMP_NUM_THREADS $SRUN_CPUS_PER_TASK" > '
        f"{tmp_path / 'srun_threads'}\n"
    )
    (bin_dir / "srun").chmod(0o755)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (venv / "bin" / "activate").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "OMP_NUM_THREADS"}
    env = {**env, **SLURM_ENV, "SLURM_NNODES": "4", "SLURM_NTASKS_PER_NODE": "8(x4)", **slurm_env,
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "ERG_REPO": str(ROOT), "ERG_VENV": str(venv)}  # fmt: skip
    return subprocess.run(["bash", str(ROOT / "slurm" / "train.sbatch"), *args], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_sbatch_template_runs_one_task_per_gpu_and_resumes_by_name(tmp_path):
    text = (ROOT / "slurm" / "train.sbatch").read_text()
    for directive in ("--ntasks-per-node=8", "--gpus-per-node=8", "--signal=USR1@120", "--requeue"):
        assert f"#SBATCH {directive}" in text
    gpus = {"SLURM_CPUS_PER_TASK": "10", "SLURM_GPUS_ON_NODE": "8", "OMP_NUM_THREADS": "64"}
    result = _sbatch(tmp_path, "experiment=imagenet256_dit_xl2", "name=dit", **gpus)
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "srun_args").read_text().split()
    assert args[:3] == ["--kill-on-bad-exit=1", "python", "train.py"]
    assert args[3:] == ["trainer=multinode", "trainer.num_nodes=4", "trainer.devices=8", "resume=auto",
                        "experiment=imagenet256_dit_xl2", "name=dit"]  # fmt: skip
    # the tasks' threads follow --cpus-per-task (not the submitting shell's OMP_NUM_THREADS), and srun
    # is told the CPUs per task (Slurm 22.05's srun does not inherit them from sbatch)
    assert (tmp_path / "srun_threads").read_text().split() == ["10", "10"]
    assert "4 node(s) x 8 task(s) x 10 CPU(s), 8 GPU(s) per node; OMP_NUM_THREADS=10" in result.stdout
    refused = _sbatch(tmp_path, "experiment=imagenet256_dit_xl2")
    assert refused.returncode == 2 and "give name=<run name>" in refused.stderr


def test_sbatch_template_on_cpus_names_no_gpus(tmp_path):
    """A CPU job (--gpus-per-node=0, or none asked): no GPU count printed; one thread per task by default."""
    cpu = {"SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "2", "SLURM_GPUS_PER_NODE": "0"}
    result = _sbatch(tmp_path, "name=cpu", "trainer.accelerator=cpu", **cpu)
    assert result.returncode == 0, result.stderr
    assert "1 node(s) x 2 task(s) x 1 CPU(s) per node; OMP_NUM_THREADS=1" in result.stdout
    assert "GPU" not in result.stdout
    assert (tmp_path / "srun_threads").read_text().split() == ["1", "1"]


def test_submitit_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = hydra_compose("train", ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                                      "hydra.launcher.gpus_per_node=4"], return_hydra_config=True)  # fmt: skip
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 4, 4)
    assert launcher.timeout_min > 0 and launcher.array_parallelism > 0 and launcher.signal_delay_s > 0


def test_training_sweep_files_go_outside_every_run_folder():
    """train.py -m: Hydra's (and submitit's) files of the sweep go to multirun/train/<time>, not into the
    run folder of the base config or of a point (they used to land in ${run_dir}/multirun)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = hydra_compose("train", ["name=lr${optim.lr}", "hydra/launcher=submitit_slurm"], return_hydra_config=True)
    sweep_dir = Path(cfg.hydra.sweep.dir)
    assert sweep_dir.parts[:2] == ("multirun", "train") and "runs" not in sweep_dir.parts
    assert Path(cfg.hydra.launcher.submitit_folder).parts[:3] == sweep_dir.parts[:3]


def test_trainer_configs_build_their_strategies():
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    def kwargs(option: str) -> dict:
        cfg = compose(overrides=[f"trainer={option}"])
        return instantiate(OmegaConf.to_container(cfg.trainer, resolve=True), _convert_="all")

    ddp = kwargs("ddp")
    assert isinstance(ddp["strategy"], DDPStrategy) and ddp["use_distributed_sampler"] is False
    multinode = kwargs("multinode")
    assert (multinode["num_nodes"], multinode["devices"]) == (2, 8) and isinstance(multinode["strategy"], DDPStrategy)
    fsdp = kwargs("fsdp")["strategy"]  # FSDP2, sharded by RectifiedFlowModule.configure_model (tests/test_fsdp.py)
    assert isinstance(fsdp, ModelParallelStrategy) and fsdp._save_distributed_checkpoint is False


def test_local_cluster_never_stops_daemons_of_a_folder_it_did_not_make(tmp_path):
    """slurm/local_cluster.sh stop / start with ERG_SLURM_DIR on a folder holding someone else's pid files (say
    /var, whose run/slurmctld.pid is the system's): exit 1 naming the setting, before anything is stopped."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "slurmctld.pid").write_text(f"{os.getpid()}\n")  # this test's process: must survive
    for command in ("stop", "start"):
        out = subprocess.run([str(ROOT / "slurm" / "local_cluster.sh"), command], capture_output=True, text=True,
                             env={**os.environ, "ERG_SLURM_DIR": str(tmp_path)}, timeout=60)  # fmt: skip
        assert out.returncode == 1 or (command == "start" and out.returncode == 3), (command, out.stderr)
        if out.returncode == 1:
            assert "is not a folder of this script: set ERG_SLURM_DIR" in out.stderr, out.stderr
    assert (tmp_path / "run" / "slurmctld.pid").exists()
