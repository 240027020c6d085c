"""scripts/benchmark_loader.py runs end to end on CPU (tiny synthetic latent shards); the real
figures come from the GPU machine."""

from __future__ import annotations

import json

from scripts.benchmark_loader import main


def test_loader_benchmark_smoke_cpu(tmp_path):
    train = tmp_path / "train.json"
    train.write_text(json.dumps({"device": "cpu", "results": [
        {"batch_size": 2, "mode": "eager", "img_per_s": 10.0}, {"batch_size": 4, "mode": "eager", "img_per_s": 20.0},
    ]}))  # fmt: skip
    results = main([
        "--synthetic-samples", "64", "--samples-per-shard", "16", "--shape", "4,8,8", "--workers", "0,1",
        "--batch-size", "4", "--batches", "3", "--warmup", "1", "--shuffle-buffer", "8",
        "--train-json", str(train), "--out", str(tmp_path / "loader.md"), "--json", str(tmp_path / "loader.json"),
    ])  # fmt: skip
    assert [r["workers"] for r in results] == [0, 1]
    assert all(r["samples"] == 12 and r["samples_per_s"] > 0 for r in results)
    table = (tmp_path / "loader.md").read_text()
    assert "| 1 |" in table and "20 img/s per GPU" in table  # compared with the fastest training setting
    assert json.loads((tmp_path / "loader.json").read_text())["results"][1]["workers"] == 1
