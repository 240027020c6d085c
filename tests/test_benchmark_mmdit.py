"""scripts/benchmark_mmdit.py runs end to end (tiny MMDiT on CPU); the real figures come from a GPU."""

from __future__ import annotations

import json

import pytest

from models.mmdit import build_mmdit, mmdit_flops_per_forward
from scripts.benchmark_mmdit import main

TINY = [
    "--device", "cpu", "--archs", "MMDiT-d2", "--input-size", "8", "--channels", "4", "--batch-size", "2",
    "--context-tokens", "4", "--context-dim", "16", "--pooled-dim", "8", "--steps", "1", "--warmup", "1", "--no-bf16",
]  # fmt: skip


def test_benchmark_mmdit_smoke_cpu(tmp_path):
    results = main([*TINY, "--modes", "eager", "--out", str(tmp_path / "t.md"), "--json", str(tmp_path / "t.json")])
    r = results[0]
    assert r["img_per_s"] > 0 and r["mode"] == "eager" and (r["depth"], r["hidden_size"]) == (2, 128)
    assert r["tokens"] == "16 image + 4 text" and r["mfu"] is None  # no peak known for a CPU
    assert "| MMDiT-d2 | 2 x 128 |" in (tmp_path / "t.md").read_text()
    assert json.loads((tmp_path / "t.json").read_text())["results"][0]["batch_size"] == 2


def test_benchmark_mmdit_checkpointing_and_mfu_with_a_given_peak():
    """MFU = img/s x 3 x forward FLOPs / peak (a tiny peak so the tiny model's MFU is a readable number)."""
    r = main([*TINY, "--modes", "eager", "--grad-checkpointing", "--peak-tflops", "1e-6"])[0]
    model = build_mmdit("MMDiT-d2", input_size=8, in_channels=4, context_dim=16, pooled_dim=8)
    expected = r["img_per_s"] * 3 * mmdit_flops_per_forward(model, context_tokens=4) / 1e12 / 1e-6
    rounding = 0.05 / r["img_per_s"]  # img_per_s is rounded to 0.1: a slow (busy) CPU makes that a few percent
    assert r["grad_checkpointing"] and r["mfu"] == pytest.approx(expected, rel=0.01 + rounding)


@pytest.mark.slow
def test_benchmark_mmdit_compile_matches_eager_cpu():
    r = main([*TINY, "--modes", "compile", "--match-tol", "1e-4"])[0]
    assert r["compiled_matches_eager"] and not r["check_recompiled"]
