"""Rank scoring, tables and Pareto fronts on hand-made pools; make_tables.py on a hand-made sweep folder;
numbers from different protocols are never mixed."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from data.sample_store import SampleStore
from eval.pareto import facet_pairs, pareto_mask
from eval.ranking import best_per_method, rank_runs
from eval.records import ProtocolMismatch, select_metrics, write_record
from eval.tables import Row, ablation_markdown, format_value, table_latex, table_markdown

# A hand-made pool: run -> (method, guidance scale, metrics)
POOL = {
    "a1": ("cfg", 2.0, {"fid": 10.0, "precision": 0.60, "coverage": 0.70}),
    "a2": ("cfg", 4.0, {"fid": 12.0, "precision": 0.70, "coverage": 0.70}),
    "b1": ("erg", 2.0, {"fid": 9.0, "precision": 0.65, "coverage": 0.80}),
    "b2": ("erg", 4.0, {"fid": 11.0, "precision": 0.75, "coverage": 0.60}),
}
METRICS = ["fid", "precision", "coverage"]


def test_rank_scoring_on_a_hand_made_pool():
    values = {n: v for n, (_, _, v) in POOL.items()}
    methods = {n: m for n, (m, _, _) in POOL.items()}
    ranked = {r.name: r for r in rank_runs(values, methods, METRICS)}
    # FID: lower is better (b1 9 < a1 10 < b2 11 < a2 12); coverage: a1 and a2 tie for 2nd -> 2.5 each.
    assert ranked["a1"].ranks == {"fid": 2, "precision": 4, "coverage": 2.5}
    assert ranked["a2"].ranks == {"fid": 4, "precision": 2, "coverage": 2.5}
    assert ranked["b1"].ranks == {"fid": 1, "precision": 3, "coverage": 1}
    assert ranked["b2"].ranks == {"fid": 3, "precision": 1, "coverage": 4}
    assert ranked["b1"].mean_rank == pytest.approx(5 / 3) and ranked["b2"].mean_rank == pytest.approx(8 / 3)
    assert ranked["a1"].mean_rank == ranked["a2"].mean_rank == pytest.approx(8.5 / 3)
    best = best_per_method(list(ranked.values()))
    assert best["erg"].name == "b1" and best["cfg"].name == "a1"  # tie broken by name
    # Ranked within each method's own runs instead: b1 still wins erg, cfg's two runs tie again.
    per_method = {r.name: r for r in rank_runs(values, methods, METRICS, pool="method")}
    assert per_method["b1"].ranks == {"fid": 1, "precision": 2, "coverage": 1}
    assert per_method["a1"].mean_rank == per_method["a2"].mean_rank == pytest.approx(1.5)
    with pytest.raises(KeyError, match="no known direction"):
        rank_runs(values, methods, ["sharpness"])


def test_table_layout_bold_and_sections():
    rows = [
        Row("CFG", POOL["a1"][2], nfe=2),
        Row("ERG", POOL["b1"][2], nfe=2),
        Row("ERG + APG", {"fid": 8.5, "precision": 0.62, "coverage": 0.75}, nfe=2, section=1),
    ]
    # Top part: best per column in bold (NFE ties: both); bottom part: bold only where it beats the top part.
    assert table_markdown(rows, METRICS) == "\n".join([
        "| Method | FID (↓) | Precision (↑) | Coverage (↑) | NFE (↓) |",
        "|---|---|---|---|---|",
        "| CFG | 10.00 | 60.00 | 70.00 | **2** |",
        "| ERG | **9.00** | **65.00** | **80.00** | **2** |",
        "| ERG + APG | **8.50** | 62.00 | 75.00 | 2 |",
    ])  # fmt: skip
    latex = table_latex(rows, METRICS, caption="Pool")
    assert r"\textbf{9.00} & \textbf{65.00} & \textbf{80.00}" in latex
    assert r"ERG + APG & \textbf{8.50} & 62.00 & 75.00 & 2 \\" in latex
    assert latex.count(r"\midrule") == 2 and r"FID ($\downarrow$)" in latex and r"\caption{Pool}" in latex


def test_values_are_printed_on_the_papers_scales():
    # metrics.json stores definitions (probabilities, ratios); the paper prints them x100, CLIPScore and FID as is.
    assert format_value("vqa_score", 0.7015) == "70.15" and format_value("density", 1.2025) == "120.25"
    assert format_value("clip_score", 26.45) == "26.45" and format_value("fid", 12.814) == "12.81"
    assert format_value("fid", None) == "–"


def test_grouped_table_bolds_within_each_group():
    rows = [
        Row("CFG", {"fid": 3.0}, group=256),
        Row("ERG", {"fid": 2.0}, group=256),
        Row("CFG", {"fid": 5.0}, group=512),
        Row("ERG", {"fid": 6.0}, group=512),
    ]
    lines = table_markdown(rows, ["fid"], nfe=False, group_name="Res.").splitlines()
    assert lines[0] == "| Method | Res. | FID (↓) |"
    assert lines[2:] == [
        "| CFG | 256 | 3.00 |",
        "| ERG |  | **2.00** |",
        "| CFG | 512 | **5.00** |",
        "| ERG |  | 6.00 |",
    ]


def test_ablation_layout_is_transposed():
    cols = [
        Row("CFG", {"density": 0.98, "coverage": 0.71}, extra={"tau_c": None, "tau_i": None}),
        Row("C-ERG", {"density": 1.10, "coverage": 0.72}, extra={"tau_c": 0.01, "tau_i": None}),
        Row("ERG", {"density": 1.20, "coverage": 0.73}, extra={"tau_c": 0.01, "tau_i": 0.01}),
    ]
    assert ablation_markdown(cols, ["density", "coverage"], ["tau_c", "tau_i"]).splitlines() == [
        "|  | CFG | C-ERG | ERG |",
        "|---|---|---|---|",
        "| tau_c | ✗ | 0.01 | 0.01 |",
        "| tau_i | ✗ | ✗ | 0.01 |",
        "| Density (↑) | 98.00 | 110.00 | **120.00** |",
        "| Coverage (↑) | 71.00 | 72.00 | **73.00** |",
    ]


def _record(metrics: dict[str, float], protocol: str) -> dict:
    return {"metrics": metrics, "protocols": dict.fromkeys(metrics, protocol), "num_samples": 10}


def test_protocols_are_never_mixed(tmp_path):
    runs = {
        "r1": {"k": _record({"fid": 1.0}, "ref__inception-aa")},
        "r2": {"k": _record({"fid": 2.0}, "ref__inception-tf")},
    }
    with pytest.raises(ProtocolMismatch, match="different protocols"):
        select_metrics(runs)
    both = {
        n: {"a": _record({"fid": 1.0}, "ref__inception"), "b": _record({"fid": 3.0}, "ref__dinov2")}
        for n in ("r1", "r2")
    }
    with pytest.raises(ProtocolMismatch, match="--match"):
        select_metrics(both)
    values, chosen = select_metrics(both, match="dinov2")
    assert values == {"r1": {"fid": 3.0}, "r2": {"fid": 3.0}} and chosen == {"fid": "ref__dinov2"}
    with pytest.raises(ProtocolMismatch, match="missing for run"):
        select_metrics({"r1": {"a": _record({"fid": 1.0}, "p")}, "r2": {}}, metrics=["fid"])


def test_pareto_front():
    pts = np.array([[1.0, 1.0], [2.0, 0.5], [0.5, 2.0], [0.9, 0.9], [2.0, 0.4]])
    assert pareto_mask(pts, [True, True]).tolist() == [True, True, True, False, False]
    assert pareto_mask(pts, [False, False]).tolist() == [False, False, True, True, True]
    assert facet_pairs(["fid", "density", "coverage", "vqa_score"]) == [
        ("coverage", "density"), ("density", "vqa_score"), ("coverage", "vqa_score"),
    ]  # fmt: skip
    assert facet_pairs(["fid"]) == []


# --- make_tables.py on a sweep folder ------------------------------------------------------------------
def make_sweep(root, seeds_offset: dict[str, int] | None = None):
    """One folder per run: config.yaml, a tiny paired sample store, metrics.json."""
    for name, (method, scale, metrics) in POOL.items():
        run = root / name
        run.mkdir(parents=True)
        OmegaConf.save({"guidance": {"name": method, "scale": scale, "nfe": 2}, "seed": 0}, run / "config.yaml")
        store = SampleStore(run, 6, shard_size=4)
        store.write_layout()
        off = (seeds_offset or {}).get(name, 0)
        for s in range(store.num_shards):
            idx = list(store.shard_indices(s))
            images = np.stack([np.full((8, 8, 1), 40 * i + 10 * len(name), dtype=np.uint8) for i in idx])
            store.write_shard(s, images, [{"index": i, "seed": 1000 + i + off, "label": i % 3} for i in idx])
        density = {"a1": 0.9, "a2": 1.0, "b1": 1.2, "b2": 1.1}[name]
        write_record(run / "metrics.json", _record({**metrics, "density": density}, "data-digits__digitscnn__asis"))
    return root


def test_make_tables_on_a_sweep_folder(tmp_path, capsys):
    from scripts.make_tables import main

    sweep = make_sweep(tmp_path / "sweep")
    report, paths = main([str(sweep), "--grid", "4"])
    out = capsys.readouterr().out
    # With density added, cfg's best mean rank is a2 (11.5 / 4 vs a1's 12.5 / 4); erg's is b1.
    assert {r.extra["run"] for r in report.rows} == {"a2", "b1"}
    assert "| CFG | 12.00 | **70.00** | 100.00 | 70.00 | **2** |" in out
    table = (sweep / "report" / "table.md").read_text()
    assert table.splitlines()[0] == "| Method | FID (↓) | Precision (↑) | Density (↑) | Coverage (↑) | NFE (↓) |"
    assert "| ERG | **9.00** | 65.00 | **120.00** | **80.00** | **2** |" in table
    assert (sweep / "report" / "ranks.csv").read_text().splitlines()[0].startswith("group,run,method,fid")
    for png in ("pareto.png", "grid.png"):
        with Image.open(sweep / "report" / png) as img:
            assert img.format == "PNG" and img.size[0] > 100
    with Image.open(paths["grid"]) as grid:  # 2 rows (CFG, ERG) of 4 samples enlarged to 64 px, 2 px gaps
        assert grid.size[1] == 2 * (64 + 2)


def test_grid_refuses_samples_from_different_seeds(tmp_path):
    from eval.grids import method_grid

    sweep = make_sweep(tmp_path / "sweep", seeds_offset={"b1": 7})
    with pytest.raises(ValueError, match="same seeds"):
        method_grid([("CFG", sweep / "a1"), ("ERG", sweep / "b1")], tmp_path / "g.png")


def test_make_tables_refuses_mixed_protocols(tmp_path, capsys):
    from scripts.make_tables import main

    sweep = make_sweep(tmp_path / "sweep")
    write_record(sweep / "b2" / "metrics.json", _record({"fid": 1.0}, "other__protocol"))  # b2 has both: fine
    main([str(sweep), "--grid", "0"])
    (sweep / "a2" / "metrics.json").unlink()
    write_record(sweep / "a2" / "metrics.json", _record({"fid": 12.0}, "other__protocol"))
    with pytest.raises(SystemExit) as exc:
        main([str(sweep), "--metrics", "fid"])
    assert exc.value.code == 2 and "different protocols" in capsys.readouterr().err
