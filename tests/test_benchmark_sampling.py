"""scripts/benchmark_sampling.py runs end to end (tiny model on CPU); the real figures come from a GPU."""

from __future__ import annotations

import json

import pytest

from scripts.benchmark_sampling import main

SMOKE = ["--device", "cpu", "--arch", "DiT-S/8", "--input-size", "16", "--batch-size", "2", "--steps", "2",
         "--num-classes", "10", "--no-bf16", "--repeats", "1"]  # fmt: skip


def test_sampling_benchmark_smoke_cpu(tmp_path):
    results = main([*SMOKE, "--methods", "cfg", "erg", "seg", "autoguidance", "--modes", "eager",
                    "--out", str(tmp_path / "t.md"), "--json", str(tmp_path / "t.json")])  # fmt: skip
    nfe = {r["method"]: r["nfe_per_step"] for r in results}
    assert nfe == {"cfg": 2, "erg": 2, "seg": 3, "autoguidance": 2}
    assert all(r["img_per_s"] > 0 and r["image_steps_per_s"] > 0 for r in results)
    table = (tmp_path / "t.md").read_text()
    assert "| erg | eager | 2 |" in table and "ERG / CFG wall time (eager)" in table
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["ratios"]["eager"] > 0 and len(saved["results"]) == 4


@pytest.mark.slow
def test_sampling_benchmark_compiled_cpu():
    results = main([*SMOKE, "--methods", "cfg", "erg", "--modes", "compile"])
    assert [r["mode"] for r in results] == ["compile", "compile"]
