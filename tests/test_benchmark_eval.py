"""scripts/benchmark_eval.py runs end to end on CPU with tiny sizes; the real figures come from a GPU."""

from __future__ import annotations

import json

import pytest

from scripts.benchmark_eval import main


def test_benchmark_eval_smoke_cpu(tmp_path):
    results = main([
        "--device", "cpu", "--image-size", "32", "--batch-size", "1", "--inception-images", "1", "--warmup", "0",
        "--prdc-n", "64", "--prdc-dim", "16", "--chunk-size", "20", "--fid-dim", "16",
        "--out", str(tmp_path / "eval.md"), "--json", str(tmp_path / "eval.json"),
    ])  # fmt: skip
    assert results["inception"]["img_per_s"] > 0 and results["inception"]["images"] == 1
    assert results["prdc"]["n"] == 64 and 0 <= results["prdc"]["precision"] <= 1
    assert results["fid"]["sqrtm_value"] == pytest.approx(results["fid"]["eigh_value"], rel=1e-9)
    assert "| PRDC (k = 3) | exact (default), s | float32 comparisons only" in (tmp_path / "eval.md").read_text()
    assert results["prdc"]["plain"]["precision"] == results["prdc"]["precision"]
    assert json.loads((tmp_path / "eval.json").read_text())["prdc"]["chunk_size"] == 20
