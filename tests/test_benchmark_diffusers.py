"""scripts/benchmark_diffusers.py: runs end to end on a tiny pipeline on CPU (the real figures come from a GPU),
counts one forward of 2 rows per image and step for CFG and ERG, honours its time budget, and its real-size
configs are the releases' transformers (built on the meta device: no memory, no time)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from scripts import benchmark_diffusers as bd


def test_diffusers_benchmark_smoke_cpu(tmp_path):
    summary = bd.main(["--family", "flux_dev", "--size", "tiny", "--device", "cpu", "--methods", "cfg", "erg", "seg",
                       "--out", str(tmp_path / "t.md"), "--json", str(tmp_path / "t.json")])  # fmt: skip
    by = {r["method"]: r for r in summary["results"]}
    assert {m: (r["nfe_per_step"], r["forwards_per_step"], r["rows_per_forward"]) for m, r in by.items()} == {
        "cfg": (2, 1.0, 4), "erg": (2, 1.0, 4), "seg": (3, 1.0, 6),  # batch 2: one forward per step, all branches
    }  # fmt: skip
    assert by["erg"]["config"] == "erg_flux" and summary["erg_over_cfg"] > 0 and summary["skipped"] == []
    table = (tmp_path / "t.md").read_text()
    assert "| erg | erg_flux | 2 | 1.0 | 4 |" in table and "ERG / CFG wall time" in table
    assert json.loads((tmp_path / "t.json").read_text())["family"] == "flux_dev"


def test_a_method_that_would_not_fit_the_budget_is_skipped(monkeypatch, capsys):
    import time

    class Stub(torch.nn.Module):
        transformer = torch.nn.Linear(2, 2)

    monkeypatch.setattr(bd, "build_model", lambda *a, **k: Stub())

    def slow(model, family, method, *args):
        time.sleep(0.05)
        return {"method": method, "seconds": 1.0}

    monkeypatch.setattr(bd, "_time_method", slow)
    summary = bd.bench("sd3_medium", "tiny", "cpu", ("none", "cfg", "erg"), budget_s=0.07)
    assert [r["method"] for r in summary["results"]] == ["none"] and summary["skipped"] == ["cfg", "erg"]
    assert "skipped sd3_medium cfg" in capsys.readouterr().out


def test_the_real_sizes_are_the_released_transformers():
    import diffusers

    billions = {}
    for family, config in bd.REAL.items():
        if not family.startswith(("sd3", "flux")):
            continue  # PixArt-Sigma and Wan: the next test
        cls = diffusers.FluxTransformer2DModel if family.startswith("flux") else diffusers.SD3Transformer2DModel
        with torch.device("meta"):
            billions[family] = round(sum(p.numel() for p in cls(**config).parameters()) / 1e9, 2)
    assert billions == {"sd3_medium": 2.03, "sd35_large": 8.06, "sd35_medium": 2.24, "flux_dev": 11.9,
                        "flux_schnell": 11.89}  # fmt: skip


@pytest.mark.parametrize(
    ("family", "config"), [("pixart_sigma", "erg_pixart_sigma"), ("wan2_1_t2v_1_3b", "erg_wan_d30")]
)
def test_the_cross_attention_families_run_batched_too(family, config):
    """PixArt-Sigma and Wan (video) on their tiny pipelines: CFG and ERG one forward of 2 rows per image and step."""
    summary = bd.bench(family, "tiny", "cpu", ("cfg", "erg"))
    by = {r["method"]: r for r in summary["results"]}
    assert {m: (r["nfe_per_step"], r["forwards_per_step"], r["rows_per_forward"]) for m, r in by.items()} == {
        "cfg": (2, 1.0, 4), "erg": (2, 1.0, 4),
    }  # fmt: skip
    assert by["erg"]["config"] == config and summary["erg_over_cfg"] > 0
    assert "frames" in bd.markdown(summary) if family.startswith("wan") else "16px" in bd.markdown(summary)


def test_the_real_pixart_sigma_and_wan_sizes_are_the_released_transformers():
    import diffusers

    with torch.device("meta"):
        pixart = diffusers.PixArtTransformer2DModel(**bd.REAL["pixart_sigma"])
        wan = diffusers.WanTransformer3DModel(**bd.REAL["wan2_1_t2v_1_3b"])
    billions = [round(sum(p.numel() for p in m.parameters()) / 1e9, 2) for m in (pixart, wan)]
    assert billions == [0.61, 1.42]  # PixArt-Sigma-XL-2 (28 x 1152); Wan 2.1 T2V 1.3B (30 x 1536)
