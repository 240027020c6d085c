"""Two-process data-parallel training on CPU (gloo) over shards, started as srun would start it
(Lightning's SLURM environment, trainer=multinode): each rank reads its own samples, the ranks stay
in sync (same weights, same steps), gradient accumulation and the global batch size split work."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from scripts import make_shards
from tests.conftest import ROOT, TINY_MODEL
from tests.shard_data import write_digit_folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard_keys(path: Path) -> set[str]:
    with tarfile.open(path) as tar:
        return {m.name.split(".")[0] for m in tar.getmembers()}


def _digit_shards(tmp_path: Path) -> Path:
    write_digit_folder(tmp_path / "images", n=64)
    make_shards.main(["--input", str(tmp_path / "images"), "--out", str(tmp_path / "shards"),
                      "--samples-per-shard", "16"])  # fmt: skip
    return tmp_path / "shards"


def _launch(tmp_path: Path, world: int, overrides: list[str]) -> list[dict]:
    """Start `world` processes the way `srun --ntasks-per-node=<world>` does on one node."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ, "SLURM_JOB_ID": str(random.randint(10_000, 99_999)), "SLURM_JOB_NAME": "erg-test",
            "SLURM_NTASKS": str(world), "SLURM_NTASKS_PER_NODE": str(world), "SLURM_NNODES": "1",
            "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0",
            "SLURM_NODELIST": "localhost", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
        }  # fmt: skip
        cmd = [sys.executable, str(ROOT / "tests" / "distributed_worker.py"), str(tmp_path), *overrides]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def test_two_ranks_read_different_shards_and_stay_in_sync(tmp_path):
    _digit_shards(tmp_path)
    steps, accumulate = 4, 2
    overrides = [
        *TINY_MODEL, f"run_dir={tmp_path / 'run'}", "trainer=multinode", "trainer.accelerator=cpu",
        "trainer.devices=2", "trainer.num_nodes=1", "trainer.precision=32-true", f"trainer.max_steps={steps}",
        f"trainer.accumulate_grad_batches={accumulate}", "trainer.val_check_interval=1000000",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "logger=csv",
        "data=image_shards", f"data.shards={tmp_path / 'shards'}", "data.image_size=16", "data.channels=1",
        "data.num_classes=10", "data.global_batch_size=16", "data.num_workers=1", "data.shuffle_buffer=8",
        "samples.every_n_steps=0", "samples.steps=2", "samples.per_class=1", "checkpoint.every_n_steps=1000",
    ]  # fmt: skip
    ranks = _launch(tmp_path, 2, overrides)

    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert {r["step"] for r in ranks} == {steps}
    # in sync: data-parallel replicas end with identical weights (and EMA weights)
    assert ranks[0]["model"] == ranks[1]["model"] and ranks[0]["ema"] == ranks[1]["ema"]
    # each rank read its own shards: global batch 16 = 2 ranks x 2 micro-batches x 4 samples
    urls = sorted((tmp_path / "shards").glob("*.tar"))
    own = [_shard_keys(urls[0]) | _shard_keys(urls[2]), _shard_keys(urls[1]) | _shard_keys(urls[3])]
    for r, record in enumerate(ranks):
        assert len(record["keys"]) == steps * accumulate and {len(b) for b in record["keys"]} == {4}
        assert {k for b in record["keys"] for k in b} <= own[r]
    assert not {k for b in ranks[0]["keys"] for k in b} & {k for b in ranks[1]["keys"] for k in b}
    # rank 0 wrote the checkpoint and the logs, with the skipped-data counts summed over ranks
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert "data/skipped_shards" in (tmp_path / "run" / "logs" / "metrics.csv").read_text()


@pytest.mark.slow
def test_trainer_ddp_starts_its_own_processes(tmp_path):
    """trainer=ddp on one machine: Lightning starts the second process itself (re-running train.py)."""
    shards = _digit_shards(tmp_path)
    cmd = [
        sys.executable, str(ROOT / "train.py"), *TINY_MODEL, f"run_dir={tmp_path / 'run'}", "trainer=ddp",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", "trainer.max_steps=3",
        "trainer.enable_progress_bar=false", "data=image_shards", f"data.shards={shards}", "data.image_size=16",
        "data.channels=1", "data.num_classes=10", "data.batch_size=4", "data.num_workers=0",
        "samples.every_n_steps=0", "samples.steps=2", "samples.per_class=1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stdout + result.stderr
    assert (result.stdout + result.stderr).count("Trained to step 3") == 2  # both ranks finished
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
