"""scripts/benchmark_diffusers.py: runs end to end on a tiny pipeline on CPU (the real figures come from a GPU),
counts one forward of 2 rows per image and step for CFG and ERG, honours its time budget, its real-size
configs are the releases' transformers, and the real-size build (pipeline, adapter, presets, sampler checks;
benchmark_all's GPU stage included) goes through on the meta device (no memory, no time)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from scripts import benchmark_diffusers as bd


def test_diffusers_benchmark_smoke_cpu(tmp_path):
    results = bd.main(["--family", "flux_dev", "--size", "tiny", "--device", "cpu", "--methods", "cfg", "erg", "seg",
                       "--out", str(tmp_path / "t.md"), "--json", str(tmp_path / "t.json")])  # fmt: skip
    by = {r["method"]: r for r in results}
    assert {m: (r["nfe_per_step"], r["forwards_per_step"], r["rows_per_forward"]) for m, r in by.items()} == {
        "cfg": (2, 1.0, 4), "erg": (2, 1.0, 4), "seg": (3, 1.0, 6),  # batch 2: one forward per step, all branches
    }  # fmt: skip
    assert by["erg"]["config"] == "erg_flux" and by["erg"]["steps"] == 2 and by["erg"]["family"] == "flux_dev"
    table = (tmp_path / "t.md").read_text()
    assert "| erg | erg_flux | 2 | 1.0 | 4 |" in table and "ERG / CFG wall time" in table
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["config"]["family"] == "flux_dev" and saved["erg_over_cfg"] > 0


def test_a_method_that_would_not_fit_the_budget_is_skipped(monkeypatch):
    from scripts.benchmark import Budget

    class Stub(torch.nn.Module):
        transformer = torch.nn.Linear(2, 2)
        num_attention_layers = 8

    monkeypatch.setattr(bd, "build_model", lambda *a, **k: Stub())
    monkeypatch.setattr(bd, "_time_method", lambda cfg, model, method, g, dev: {"method": method, "nfe_per_step": 2,
                                                                               "seconds": 100.0})  # fmt: skip
    reported = []
    cfg = bd.DiffusersBench(family="sd3_medium", size="tiny", methods=("cfg", "erg", "none"))
    results = bd.run(cfg, "cpu", Budget(60.0), reported.append)
    assert [("seconds" in r, "skipped" in r) for r in results] == [(True, False), (False, True), (False, True)]
    assert "skipped: needs ~200 s" in results[1]["skipped"] and len(reported) == 3
    assert "| erg | erg_sd3 | 2 | skipped" in bd.markdown(results, cfg, "CPU")
    with pytest.raises(ValueError, match="unknown family 'sd4'"):
        bd.DiffusersBench(family="sd4")


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
    cfg = bd.DiffusersBench(family=family, size="tiny", methods=("cfg", "erg"))
    results = bd.run(cfg, "cpu")
    by = {r["method"]: r for r in results}
    assert {m: (r["nfe_per_step"], r["forwards_per_step"], r["rows_per_forward"]) for m, r in by.items()} == {
        "cfg": (2, 1.0, 4), "erg": (2, 1.0, 4),
    }  # fmt: skip
    assert by["erg"]["config"] == config and bd.ratio(results) > 0
    table = bd.markdown(results, cfg, "CPU")
    assert "frames" in table if family.startswith("wan") else "16px" in table


def test_the_real_pixart_sigma_and_wan_sizes_are_the_released_transformers():
    import diffusers

    with torch.device("meta"):
        pixart = diffusers.PixArtTransformer2DModel(**bd.REAL["pixart_sigma"])
        wan = diffusers.WanTransformer3DModel(**bd.REAL["wan2_1_t2v_1_3b"])
    billions = [round(sum(p.numel() for p in m.parameters()) / 1e9, 2) for m in (pixart, wan)]
    assert billions == [0.61, 1.42]  # PixArt-Sigma-XL-2 (28 x 1152); Wan 2.1 T2V 1.3B (30 x 1536)


@pytest.mark.parametrize("family", bd.FAMILIES)
def test_the_real_size_build_reaches_the_sampler_on_the_meta_device(family):
    """`--size real` runs on a GPU only (the CPU rehearsal is tiny): the same code path, the real pipeline and the
    adapter around it, each method's presets and the sampler's checks of them, on the meta device (no memory, no
    compute), so a typo there cannot first fail the GPU run."""
    from erg.guidance import build_guidance
    from erg.sampler import GuidedSampler, SamplerConfig

    cfg = bd.DiffusersBench(family=family, size="real", methods=("cfg", "erg"))
    model = bd.build_model(cfg.family, cfg.size, torch.device("meta"), torch.bfloat16)
    assert model.transformer.dtype == torch.bfloat16 and model.num_attention_layers >= 24
    for method in cfg.methods:
        guidance = build_guidance(bd.method_config(family, method, model.num_attention_layers))
        sampler = GuidedSampler(guidance, model, config=SamplerConfig(steps=cfg.run_steps, schedule="pipeline"))
        assert len(sampler.config.times(model)) == cfg.run_steps + 1


def test_benchmark_alls_gpu_diffusers_stage_builds_on_the_meta_device():
    """scripts/benchmark_all.py's GPU sizes of the diffusers stage (its CPU rehearsal runs size=tiny)."""
    from scripts import benchmark_all

    cfg = benchmark_all.stage_configs(benchmark_all.STAGES, "gpu", [])["diffusers"]
    assert (cfg.family, cfg.size) == ("flux_dev", "real")
    model = bd.build_model(cfg.family, cfg.size, torch.device("meta"), torch.bfloat16, offload=cfg.offload)
    assert round(sum(p.numel() for p in model.transformer.parameters()) / 1e9, 1) == 11.9
