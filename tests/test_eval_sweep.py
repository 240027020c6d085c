"""A 2 x 2 sweep interrupted and rerun completes only the missing points (the sampler is a stand-in that
writes shards like sample.py; the evaluation is the real evaluate.py pipeline on digit features)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.sample_store import SampleStore
from eval.digits_net import DigitsFeatureNet, save_digits_net
from eval.evaluate import run
from eval.sweep import point_name, run_grid, run_point
from tests.conftest import compose


class Interrupted(Exception):
    pass


class FakeSampler:
    """Writes missing shards of a 16-image store (like sample.py: finished shards are skipped); can be told to
    die after writing one shard of a given point, as a killed job would."""

    def __init__(self, die_at: str | None = None):
        self.die_at, self.shards_written = die_at, []

    def __call__(self, run_dir, config):
        store = SampleStore(run_dir, 16, shard_size=8)
        store.write_layout()
        rng = np.random.default_rng(int(10 * config["guidance"]["scale"]) + len(config["guidance"]["name"]))
        for shard in store.missing_shards():
            idx = list(store.shard_indices(shard))
            images = rng.integers(0, 256, size=(len(idx), 16, 16, 1), dtype=np.uint8)
            store.write_shard(shard, images, [{"index": i, "seed": i, "label": i % 10} for i in idx])
            self.shards_written.append((run_dir.name, shard))
            if run_dir.name == self.die_at:
                raise Interrupted(run_dir.name)


@pytest.fixture
def evaluator(tmp_path):
    torch.manual_seed(0)
    weights = save_digits_net(tmp_path / "net.pt", DigitsFeatureNet(width=8, feature_dim=8), {})
    calls = []

    def evaluate(run_dir):
        calls.append(run_dir.name)
        cfg = compose("evaluate", [
            f"samples={run_dir}", "data=digits", "features=digits", f"features.weights={weights}",
            f"cache_dir={tmp_path / 'cache'}", "num_workers=0", "progress=false", "logger=none",
        ])  # fmt: skip
        return run(cfg)

    evaluate.calls = calls
    return evaluate


def grid():
    for method in ("cfg", "erg"):
        for scale in (2.0, 3.0):
            overrides = {"guidance": method, "guidance.scale": scale}
            yield overrides, {"guidance": {"name": method, "scale": scale}, "seed": 0}


def test_interrupted_sweep_reruns_only_the_missing_points(tmp_path, evaluator):
    sweep = tmp_path / "sweep"
    third = point_name({"guidance": "erg", "guidance.scale": 2.0})
    assert third == "guidance-erg__guidance.scale-2.0"
    first = FakeSampler(die_at=third)
    with pytest.raises(Interrupted):
        run_grid(sweep, grid(), first, evaluator)
    assert len(evaluator.calls) == 2  # two points done, the third died after its first shard
    assert (third, 0) in first.shards_written and (third, 1) not in first.shards_written

    second = FakeSampler()
    evaluator.calls.clear()
    results = run_grid(sweep, grid(), second, evaluator)
    # Only the missing work: the third point's second shard, the fourth point's two shards.
    assert second.shards_written == [
        (third, 1),
        ("guidance-erg__guidance.scale-3.0", 0),
        ("guidance-erg__guidance.scale-3.0", 1),
    ]
    assert evaluator.calls == [third, "guidance-erg__guidance.scale-3.0"]
    assert [r["sampled"] for r in results.values()] == [False, False, True, True]
    assert all(len(r["records"]) == 1 for r in results.values())

    # A third run does nothing at all; the sweep folder is ready for make_tables.py.
    third_run = run_grid(sweep, grid(), FakeSampler(), evaluator)
    assert not any(r["sampled"] or r["evaluated"] for r in third_run.values())
    from scripts.make_tables import main

    report, _ = main([str(sweep), "--grid", "2"])
    assert {r.label for r in report.rows} == {"CFG", "ERG"}


def test_a_point_folder_refuses_another_config(tmp_path, evaluator):
    _, config = next(grid())
    run_point(tmp_path / "p", config, FakeSampler(), evaluator)
    with pytest.raises(ValueError, match="another config"):
        run_point(tmp_path / "p", {**config, "seed": 1}, FakeSampler(), evaluator)
