"""Rectified-flow training on the digits: learning, exact resume, divergence, EMA, saved config."""

from __future__ import annotations

import csv

import pytest
import torch

from models.rectified_flow import EMAConfig, RectifiedFlowModule, WarmupSchedule
from models.runtime import ConfigError
from models.training import run
from tests.conftest import compose, small_run_overrides


def _losses(run_dir):
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_loss_goes_down_on_the_digits(tmp_path):
    run_dir = tmp_path / "run"
    summary = run(compose(overrides=small_run_overrides(run_dir, 80, ["optim.warmup_steps=10"])))
    losses = _losses(run_dir)
    assert len(losses) == 80
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)
    assert summary["step"] == 80
    # artefacts: resolved config, checkpoints (periodic + last), a final sample grid
    assert (run_dir / "config.yaml").is_file()
    ckpt = _ckpt(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 80
    assert ckpt["config"]["model"]["depth"] == 2 and ckpt["config"]["run_dir"] == str(run_dir)
    assert any(k.startswith("ema.") for k in ckpt["state_dict"])
    assert list((run_dir / "samples").glob("step_0000080.png"))


def test_resume_is_exact(tmp_path):
    """N steps + resume N steps == 2N steps: model, EMA, optimizer, scheduler and step all equal."""
    n = 6
    extra = [
        "checkpoint.every_n_steps=3",
        "optim.warmup_steps=4",
        "optim.schedule=cosine",
        f"optim.decay_steps={2 * n}",
    ]
    straight = tmp_path / "straight"
    run(compose(overrides=small_run_overrides(straight, 2 * n, extra)))
    split = tmp_path / "split"
    run(compose(overrides=small_run_overrides(split, n, extra)))
    assert _ckpt(split / "checkpoints" / "last.ckpt")["global_step"] == n
    run(compose(overrides=small_run_overrides(split, 2 * n, extra)))  # resume=auto picks up last.ckpt

    a, b = _ckpt(straight / "checkpoints" / "last.ckpt"), _ckpt(split / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 2 * n
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in opt_a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a[i][name], opt_b[i][name])
    assert a["lr_schedulers"] == b["lr_schedulers"]
    # the logged losses of the resumed half equal the uninterrupted run's
    assert _losses(straight)[n:] == _losses(split)[n:]


def test_nan_loss_stops_and_names_the_step(tmp_path):
    run_dir = tmp_path / "nan"
    cfg = compose(overrides=small_run_overrides(run_dir, 50, ["optim.lr=1e12", "trainer.gradient_clip_val=null"]))
    with pytest.raises(FloatingPointError, match=r"NaN/inf at step \d+"):
        run(cfg)
    # no checkpoint holding diverged weights was written
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()


def test_refuses_to_overwrite_a_run(tmp_path):
    run_dir = tmp_path / "run"
    run(compose(overrides=small_run_overrides(run_dir, 2)))
    with pytest.raises(ConfigError, match="already holds a run"):
        run(compose(overrides=small_run_overrides(run_dir, 4, ["resume=never"])))


def test_ema_follows_the_configured_decay(tiny_dit):
    module = RectifiedFlowModule(tiny_dit, ema=EMAConfig(decay=0.9))
    before = [p.clone() for p in module.ema.parameters()]
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(1.0)
    from models.ema import ema_update

    ema_update(module.ema, module.model, module.ema_decay(100))
    for b, e, m in zip(before, module.ema.parameters(), module.model.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * m)
    warm = RectifiedFlowModule(tiny_dit, ema=EMAConfig(decay=0.999, warmup=True))
    assert warm.ema_decay(0) == pytest.approx(0.1) and warm.ema_decay(10_000) == 0.999


def test_learning_rate_schedule():
    s = WarmupSchedule(warmup_steps=4, schedule="cosine", total_steps=14, min_lr_ratio=0.1)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == 1.0 and s(9) == pytest.approx(0.55) and s(14) == pytest.approx(0.1)
    assert WarmupSchedule(0, "constant", 10, 0.0)(7) == 1.0


def test_label_dropout_uses_the_null_class(tiny_dit):
    seen = []
    module = RectifiedFlowModule(tiny_dit)
    module.flow.label_dropout = 0.5
    original = module.model.forward
    module.model.forward = lambda x, t, y=None, plan=None: (seen.append(y.clone()), original(x, t, y))[1]
    batch = {"x": torch.randn(400, 2, 8, 8), "y": torch.zeros(400, dtype=torch.long)}
    module.flow_loss(batch, torch.Generator().manual_seed(0), drop_labels=True)
    dropped = (seen[0] == tiny_dit.null_class).float().mean().item()
    assert 0.4 < dropped < 0.6 and set(seen[0].tolist()) == {0, tiny_dit.null_class}
