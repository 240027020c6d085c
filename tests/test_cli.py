"""`python train.py` as a user runs it: smoke run, and bad input giving clear errors."""

from __future__ import annotations

import io
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


def _one_error_line(out: subprocess.CompletedProcess) -> str:
    """A user error from the command line: exit code 2, one line on stderr, no traceback."""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert lines[0].startswith("error: ")
    return lines[0]


def test_bad_input_gives_clear_errors(tmp_path):
    line = _one_error_line(train("model=dit_nonexistent", tmp_path=tmp_path))  # Hydra's composition error
    assert "model=dit_nonexistent: no config configs/model/dit_nonexistent.yaml" in line and "dit_xl2" in line

    line = _one_error_line(train("optim.lrr=0.1", tmp_path=tmp_path))  # a typo without +: never "append it"
    assert "optim.lrr (did you mean optim.lr?)" in line and "+optim.lrr" not in line

    line = _one_error_line(train("data=imagefolder", tmp_path=tmp_path))  # the body's checks
    assert "missing required config value(s): data.root" in line

    line = _one_error_line(train("data=imagefolder", "data.root=/no/such/folder", tmp_path=tmp_path))
    assert "image folder not found: /no/such/folder" in line


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_show_rate_and_eta_on_a_terminal_only():
    from models.cli import progress
    from scripts import make_shards, precompute_latents, precompute_text_embeddings, train_feature_net

    terminal = _Terminal()
    bar = progress(range(3), total=3, unit="img", file=terminal, mininterval=0)
    for _ in bar:
        pass
    bar.close()
    shown = terminal.getvalue()
    assert "3/3" in shown and "img/s" in shown and "<00:00" in shown  # count, rate, ETA
    log = io.StringIO()  # a log file (not a terminal): nothing but the tool's own lines
    for _ in progress(range(3), total=3, file=log):
        pass
    assert log.getvalue() == ""
    off = _Terminal()
    for _ in progress(range(3), total=3, file=off, enabled=False):
        pass
    assert off.getvalue() == ""
    # every long-running script has the flag
    assert not make_shards.parse_args(["--input", "i", "--out", "o", "--no-progress"]).progress
    latents = ["--shards", "s", "--out", "o", "--image-size", "8", "--autoencoder", "identity"]
    assert not precompute_latents.parse_args([*latents, "--no-progress"]).progress
    assert not precompute_text_embeddings.parse_args(["--shards", "s", "--out", "o", "--no-progress"]).progress
    assert not train_feature_net.parse_args(["--no-progress"]).progress and train_feature_net.parse_args([]).progress
