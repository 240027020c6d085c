"""`make quickstart` (scripts/quickstart.py) end to end on a tiny budget: a tiny DiT trained 16 steps, a
tiny feature net, 2 methods x 2 settings of 10 digits; then a rerun that redoes nothing."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from models.callbacks import CheckpointAtFractions
from tests.conftest import TINY_MODEL, small_run_overrides


def test_quickstart_trains_sweeps_and_prints_the_table(tmp_path, capsys):
    from scripts.quickstart import main

    run_dir, sweep = tmp_path / "run", tmp_path / "sweep"
    argv = [
        "--train", *small_run_overrides(run_dir, 16), "logger=none",
        "--features=--epochs 1 --width 4 --feature-dim 8",
        "--sweep", f"sweep_dir={sweep}", "methods=[cfg,autoguidance]", "sample.per_class=1", "sample.sampler.steps=2",
        "grid.cfg.scale=[2.0,3.0]", "grid.autoguidance.scale=2.0",
        f"evaluate.features.weights={tmp_path / 'net.pt'}", f"+evaluate.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    assert set(TINY_MODEL) <= set(argv)
    first = main(argv)
    out = capsys.readouterr().out

    # AutoGuidance's weak models: the checkpoints at 1/16 and 1/4 of training (steps 1 and 4 of 16), one setting each
    for step in (1, 4):
        config = (sweep / f"autoguidance__checkpoint-step_{step:07d}.ckpt" / "config.yaml").read_text()
        assert f"checkpoint: {run_dir}/checkpoints/step_{step:07d}.ckpt" in config  # guidance.checkpoint
        assert f"checkpoint: {run_dir}/checkpoints/last.ckpt" in config  # the model
        ckpt = torch.load(run_dir / "checkpoints" / f"step_{step:07d}.ckpt", weights_only=True)
        assert ckpt["global_step"] == step
    # the table in the paper's layout (best setting per method, NFE column), the files, the explanation
    assert re.search(r"\| Method \| FID \(↓\) \| Precision \(↑\) .* \| NFE \(↓\) \|", out)
    assert re.search(r"\| CFG \|.*\| \**2\** \|", out) and re.search(r"\| AutoGuidance \|.*\| \**2\** \|", out)
    assert "real training digits, scored the same way" in out and "What ran:" in out and "Time: training" in out
    assert {row.label for row in first["report"].rows} == {"CFG", "AutoGuidance"}
    for name in ("table.md", "table.tex", "ranking.md", "pareto.png", "grid.png"):
        assert (sweep / "report" / name).is_file()
    assert set(first["real"]) == {"fid", "precision", "recall", "density", "coverage"}

    # a rerun redoes nothing: no training, no feature net, no sampling, no evaluation; the same table
    second = main(argv)
    out = capsys.readouterr().out
    assert "already trained: step 16" in out
    assert not any(r["sampled"] or r["evaluated"] for r in second["points"].values())
    assert second["report"].markdown == first["report"].markdown and second["real"] == first["real"]


def test_checkpoints_at_fractions_of_training(tmp_path):
    """checkpoint.at_fractions: step int(f x max_steps) (at least 1); steps the periodic checkpoints write are
    left to them; bad fractions are refused."""
    callback = CheckpointAtFractions(tmp_path, [0.0625, 0.25], every_n_steps=250)
    callback.on_train_start(SimpleNamespace(max_steps=1000))
    assert callback.steps == {62}  # step 250 is a periodic checkpoint already
    callback = CheckpointAtFractions(tmp_path, [0.0625, 0.25], every_n_steps=0)
    callback.on_train_start(SimpleNamespace(max_steps=8))
    assert callback.steps == {1, 2}
    with pytest.raises(ValueError, match=r"at_fractions must hold numbers in \(0, 1\)"):
        CheckpointAtFractions(tmp_path, [1.5])
