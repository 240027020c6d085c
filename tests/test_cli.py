"""`python train.py` as a user runs it: smoke run, and bad input giving clear errors."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def train(*args: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", f"run_dir={tmp_path / 'run'}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_fast_dev_run_smoke(tmp_path):
    out = train("debug=fast_dev_run", "model.depth=2", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Trained to step 1" in out.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()  # a smoke run keeps nothing


def test_bad_input_gives_clear_errors(tmp_path):
    out = train("model=dit_nonexistent", tmp_path=tmp_path)
    assert out.returncode != 0 and "Could not find 'model/dit_nonexistent'" in out.stderr
    assert "dit_xl2" in out.stderr  # Hydra lists the available options

    out = train("data=imagefolder", tmp_path=tmp_path)
    assert out.returncode == 2 and "missing required config value(s): data.root" in out.stderr

    out = train("data=imagefolder", "data.root=/no/such/folder", tmp_path=tmp_path)
    assert out.returncode == 2 and "image folder not found: /no/such/folder" in out.stderr

    out = train("optim.lrr=0.1", tmp_path=tmp_path)
    assert out.returncode != 0 and "Key 'lrr' is not in struct" in out.stderr
