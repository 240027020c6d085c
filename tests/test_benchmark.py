"""scripts/benchmark.py runs end to end (tiny model on CPU); the real figures come from the GPU."""

from __future__ import annotations

import json

import pytest

from scripts.benchmark import main


def test_benchmark_smoke_cpu(tmp_path):
    results = main([
        "--device", "cpu", "--arch", "DiT-S/8", "--input-size", "16", "--batch-sizes", "2", "--steps", "1",
        "--warmup", "1", "--modes", "eager", "--no-bf16", "--out", str(tmp_path / "t.md"),
        "--json", str(tmp_path / "t.json"),
    ])  # fmt: skip
    assert results[0]["img_per_s"] > 0 and results[0]["mode"] == "eager"
    assert "| 2 | eager |" in (tmp_path / "t.md").read_text()
    assert json.loads((tmp_path / "t.json").read_text())["results"][0]["batch_size"] == 2


@pytest.mark.slow
def test_benchmark_compile_matches_eager_cpu(tmp_path):
    results = main([
        "--device", "cpu", "--arch", "DiT-S/8", "--input-size", "16", "--batch-sizes", "2", "--steps", "1",
        "--warmup", "1", "--modes", "compile", "--no-bf16", "--match-tol", "1e-4",
    ])  # fmt: skip
    # inductor's code on the same weights; the check reuses the training graph (no recompilation)
    assert results[0]["compiled_matches_eager"] and not results[0]["check_recompiled"]
