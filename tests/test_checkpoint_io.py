"""Checkpoints are atomic on any filesystem (models/checkpoint_io.py) and resume=auto never picks a broken one:
a writer SIGKILLed at a random byte, a full disk (simulated, and a real tiny tmpfs), $TMPDIR on another
filesystem than the run folder, truncated checkpoints at resume."""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError, save_checkpoint_atomic
from models.io import stale_temporaries
from models.runtime import ConfigError, find_resume_checkpoint
from models.training import run
from tests.conftest import ROOT, compose, small_run_overrides


def _checkpoint(step: int, tensors: int = 4, size: int = 1000) -> dict:
    return {"global_step": step, "state_dict": {f"w{i}": torch.full((size,), float(step + i)) for i in range(tensors)}}


def _same(a: dict, b: dict) -> bool:
    return a["global_step"] == b["global_step"] and all(
        torch.equal(a["state_dict"][k], v) for k, v in b["state_dict"].items()
    )


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# --- a writer killed mid-write ------------------------------------------------------------------------
KILLED_WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from models.checkpoint_io import save_checkpoint_atomic
def _checkpoint(step, tensors=4, size=1000):  # as in the test module (not imported: it loads the trainer)
    weights = {{f"w{{i}}": torch.full((size,), float(step + i)) for i in range(tensors)}}
    return {{"global_step": step, "state_dict": weights}}
save_checkpoint_atomic(_checkpoint(1), {path!r})
print("previous saved", flush=True)
save_checkpoint_atomic(_checkpoint(2, tensors=512, size=65_536), {path!r})  # 128 MiB, 512 records
print("new saved", flush=True)
"""


def test_a_writer_killed_at_a_random_byte_leaves_the_previous_checkpoint(tmp_path):
    """A child process writes checkpoint 1, then a 128 MiB checkpoint 2 over it; it is frozen (SIGSTOP) once
    its temporary file has reached a random byte, then SIGKILLed: the final name holds checkpoint 1, whole;
    no partial file has a final name; the next save removes the leftover temporary file."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    buf = io.BytesIO()
    torch.save(_checkpoint(2, tensors=512, size=65_536), buf)
    full_size = buf.getbuffer().nbytes
    code = KILLED_WRITER.format(root=str(ROOT), path=str(path))
    for _ in range(5):  # a try in which the writer finished before the kill is repeated
        target = random.randrange(1, full_size)
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        assert child.stdout.readline().strip() == "previous saved"
        killed_at = None
        deadline = time.monotonic() + 120
        while killed_at is None and child.poll() is None and time.monotonic() < deadline:
            for tmp in stale_temporaries(path):
                try:
                    size = tmp.stat().st_size
                except FileNotFoundError:
                    continue
                if size >= target:
                    os.kill(child.pid, signal.SIGSTOP)
                    killed_at = tmp.stat().st_size
                    os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
        child.stdout.close()
        if killed_at is not None:
            break
        path.unlink(missing_ok=True)
    else:
        pytest.fail("the writer always finished before it could be killed")
    assert child.returncode == -signal.SIGKILL
    assert _same(_load(path), _checkpoint(1)), f"killed at byte {killed_at} of {full_size}"
    leftovers = stale_temporaries(path)
    assert len(leftovers) == 1 and 0 < leftovers[0].stat().st_size <= full_size
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.startswith(".")) == ["last.ckpt"]
    save_checkpoint_atomic(_checkpoint(3), path)  # the next writer of that file cleans up
    assert _same(_load(path), _checkpoint(3)) and stale_temporaries(path) == []


# --- a full disk --------------------------------------------------------------------------------------
class _FullDisk:
    """A file that accepts `budget` bytes, then fails as a full disk does (errno ENOSPC)."""

    def __init__(self, f, budget: int):
        self.f, self.budget = f, budget

    def write(self, data) -> int:
        if len(data) > self.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_leaves_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_checkpoint(1), path)
    fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _FullDisk(fdopen(fd, *a, **k), budget=20_000))
    with pytest.raises(CheckpointWriteError) as err:
        AtomicCheckpointIO().save_checkpoint(_checkpoint(2, tensors=8, size=10_000), path)
    monkeypatch.undo()
    message = str(err.value)
    assert err.value.errno == errno.ENOSPC and "\n" not in message
    assert f"could not write checkpoint {path}: the disk is full" in message
    assert "the previous last.ckpt is intact" in message and "rerun the same command to resume" in message
    assert _same(_load(path), _checkpoint(1))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # the temporary file is gone


def test_a_killed_step_checkpoint_write_is_cleaned_up_by_the_next_checkpoint_of_the_folder(tmp_path):
    """A step_*.ckpt name is written once: the temporary its killed writer left is removed by the next write of
    any checkpoint of the folder (a checkpoint of a real model is GBs: left there, they fill the disk)."""
    folder = tmp_path / "checkpoints"
    save_checkpoint_atomic(_checkpoint(1), folder / "step_0000004.ckpt")
    stale = folder / ".step_0000008.ckpt.abc123.tmp"  # as atomic_open names its temporary
    stale.write_bytes(b"half a checkpoint")
    save_checkpoint_atomic(_checkpoint(2), folder / "last.ckpt")
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step_0000004.ckpt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_checkpoint_folder_says_so_and_not_to_free_space(tmp_path):
    folder = tmp_path / "checkpoints"
    save_checkpoint_atomic(_checkpoint(1), folder / "last.ckpt")
    folder.chmod(0o555)
    try:
        with pytest.raises(CheckpointWriteError) as err:
            save_checkpoint_atomic(_checkpoint(2), folder / "last.ckpt")
    finally:
        folder.chmod(0o755)
    message = str(err.value)
    assert "the folder is not writable" in message and f"Make {folder} writable" in message, message
    assert "Free space" not in message and "\n" not in message


def test_the_write_error_names_a_fix_that_fits_its_cause(tmp_path, monkeypatch):
    """(As root a read-only folder is writable, so the cause is injected too: EROFS, a read-only mount.)"""
    import models.checkpoint_io as cio

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(cio, "atomic_open", refuse)
    with pytest.raises(CheckpointWriteError) as err:
        save_checkpoint_atomic(_checkpoint(2), tmp_path / "last.ckpt")
    message = str(err.value)
    assert "the folder is not writable (Read-only file system)" in message and "Free space" not in message


def _in_private_tmpfs(tmp_path: Path) -> subprocess.CompletedProcess:
    """Run tests/checkpoint_fs_worker.py in a mount namespace of its own, $TMPDIR and a 1 MiB folder on tmpfs
    mounts that vanish with it (nothing is mounted on this machine's tree); skip where that is not allowed."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("needs unshare and mount (util-linux) to put $TMPDIR on a tmpfs")
    tmpdir, full, out = tmp_path / "tmpfs_tmpdir", tmp_path / "tmpfs_full", tmp_path / "out"
    for d in (tmpdir, full, out):
        d.mkdir()
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "tmpfs",
                            str(tmpdir)], capture_output=True, text=True)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.strip()}")
    script = (f"mount -t tmpfs -o size=64m tmpfs {tmpdir} && mount -t tmpfs -o size=1m tmpfs {full} && "
              f"exec {sys.executable} {ROOT / 'tests' / 'checkpoint_fs_worker.py'} {out} {full}")  # fmt: skip
    env = {**os.environ, "TMPDIR": str(tmpdir), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads((out / "records.json").read_text()) | {"out": os.path.realpath(out)}


@pytest.fixture(scope="module")
def fs_records(tmp_path_factory):
    return _in_private_tmpfs(tmp_path_factory.mktemp("fs"))


def test_tmpdir_on_another_filesystem_is_never_used_for_checkpoints(fs_records):
    """$TMPDIR on a tmpfs, the run folder on the disk: Lightning's own writer puts the bytes under $TMPDIR and
    copies them over the final name (what left truncated checkpoints); ours and a real training run write
    beside the final name and rename within the folder, never touching $TMPDIR."""
    tmpdir, out = fs_records["tmpdir"], fs_records["out"]
    lightning = fs_records["lightning"]
    assert any(e[0] == "write" and e[1].startswith(tmpdir + os.sep) for e in lightning)
    assert any(e[0] == "copy" and e[1].startswith(tmpdir) and e[2] == f"{out}/lightning/last.ckpt" for e in lightning)
    for name in ("ours", "training"):
        events = fs_records[name]
        assert not [e for e in events if any(p.startswith(tmpdir + os.sep) for p in e[1:])], (name, events)
        assert not [e for e in events if e[0] == "copy"], name
        targets = [e for e in events if e[0] == "rename" and e[2].endswith(".ckpt")]
        assert targets and all(os.path.dirname(src) == os.path.dirname(dst) for _, src, dst in targets)
    written = {os.path.basename(e[2]) for e in fs_records["training"] if e[0] == "rename"}
    assert {"step_0000001.ckpt", "step_0000002.ckpt", "step_0000003.ckpt", "last.ckpt"} <= written
    assert _load(Path(out) / "run" / "checkpoints" / "last.ckpt")["global_step"] == 3


def test_a_real_full_disk_keeps_the_previous_checkpoint(fs_records):
    """Growing checkpoints on a 1 MiB tmpfs until one does not fit: ENOSPC is reported in one line and the
    previous checkpoint is what remains, with no temporary file left."""
    full = fs_records["full"]
    assert full is not None, "the 1 MiB tmpfs never filled up"
    assert full["errno"] == errno.ENOSPC and full["saved"], full
    assert "the disk is full" in full["error"] and "the previous last.ckpt is intact" in full["error"]
    assert full["files"] == ["last.ckpt"]
    assert full["remaining_step"] == full["saved"][-1] and full["remaining_intact"]  # read in the worker's tmpfs


# --- resume=auto picks a checkpoint that loads --------------------------------------------------------
def _truncate(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(random.randrange(1, size))


def test_resume_auto_falls_back_from_truncated_checkpoints_with_a_warning(tmp_path, caplog):
    """A run of 4 steps (checkpoints at 2 and 4, last.ckpt at 4) whose newest files are truncated (as an older
    writer left them): resume=auto warns naming each broken file, resumes from step 2, and ends where an
    uninterrupted run of 6 steps ends."""
    extra = ["checkpoint.every_n_steps=2", "checkpoint.at_fractions=[]", "optim.warmup_steps=2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(compose(overrides=small_run_overrides(straight, 6, extra)))
    run(compose(overrides=small_run_overrides(split, 4, extra)))
    last, step4 = split / "checkpoints" / "last.ckpt", split / "checkpoints" / "step_0000004.ckpt"
    _truncate(last)
    _truncate(step4)
    with caplog.at_level(logging.WARNING, logger="erg.train"):
        assert find_resume_checkpoint(split, "auto") == split / "checkpoints" / "step_0000002.ckpt"
    warned = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(warned) == 2 and {str(last), str(step4)} == {m.split()[1] for m in warned}
    assert all("resuming from" in m and "step_0000002.ckpt" in m for m in warned)
    run(compose(overrides=small_run_overrides(split, 6, extra)))
    a, b = _load(straight / "checkpoints" / "last.ckpt"), _load(split / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 6
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_resume_auto_with_no_readable_checkpoint_names_the_files(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    (run_dir / "checkpoints" / "step_0000100.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"no checkpoint of .* can be read: .*last\.ckpt .*step_0000100\.ckpt"):
        find_resume_checkpoint(run_dir, "auto")


def test_a_resumed_csv_log_drops_the_rows_after_its_checkpoint_and_a_cut_row(tmp_path):
    """metrics.csv of a run killed after logging steps 0-5 (its last row cut mid-write), resumed from a
    checkpoint of step 3: rows 0-2 stay, the resumed run logs 3 onwards once."""
    from models.runtime import csv_logger

    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    rows = "".join(f"0,{s},{s / 10}\r\n" for s in range(6))
    (log_dir / "metrics.csv").write_text("epoch,step,train/loss\r\n" + rows + "0,6,0.", newline="")
    logger = csv_logger(str(tmp_path), name="logs", version="")
    logger.resume_from(3)
    for step in range(3, 5):
        logger.log_metrics({"train/loss": step / 10, "epoch": 0}, step=step)
    logger.save()
    with open(log_dir / "metrics.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == [0, 1, 2, 3, 4]


def test_a_rerun_after_a_kill_before_the_first_checkpoint_logs_each_step_once(tmp_path):
    """An attempt killed before its first checkpoint left rows 0-2 in metrics.csv; the rerun starts from
    nothing (resume_from(0), what models/training.py passes without a checkpoint) and holds each step once."""
    from models.runtime import csv_logger

    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (log_dir / "metrics.csv").write_text("epoch,step,train/loss\n" + "".join(f"0,{s},{s}\n" for s in range(3)))
    logger = csv_logger(str(tmp_path), name="logs", version="")
    logger.resume_from(0)
    for step in range(5):
        logger.log_metrics({"train/loss": step / 10, "epoch": 0}, step=step)
    logger.save()
    with open(log_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4]
    assert [float(r["train/loss"]) for r in rows] == [0.0, 0.1, 0.2, 0.3, 0.4]
