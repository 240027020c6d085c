"""The paper's analyses as scripts (appendix B.1, B.2, B.4): their statistics by hand, and each script
end to end on a tiny checkpoint (CSV + PNG)."""

from __future__ import annotations

import csv

import pytest
import torch

from erg.attention import Site
from scripts import attention_blocks, initial_velocity, kickoff_analysis
from tests.tiny_checkpoint import fake_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return fake_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_max_probability_share_by_hand():
    sink = attention_blocks.MaxProbabilityShare(threshold=0.95)
    probs = torch.tensor([[0.96, 0.04], [0.5, 0.5], [0.01, 0.99], [0.94, 0.06]])  # 2 of 4 queries above
    sink.record(Site(layer=2), probs.view(1, 2, 2, 2))
    sink.record(Site(layer=2), torch.full((1, 1, 2, 2), 0.5))  # 0 of 2 more
    assert sink.shares() == {2: pytest.approx(2 / 6)}


def test_suggested_layers_are_the_longest_low_run_in_the_middle():
    assert attention_blocks.suggest_layers([0.3, 0.3, 0.01, 0.02, 0.01, 0.3, 0.4]) == (2, 5)
    assert attention_blocks.suggest_layers([0.0, 0.01, 0.0, 0.4, 0.0, 0.0]) == (1, 3)  # first block excluded


def test_no_regime_no_suggestion():
    flat = [0.2, 0.205, 0.199, 0.2, 0.201]  # every block within 1 point: nothing to read
    assert attention_blocks.suggest_layers(flat) is None
    assert attention_blocks.report(flat, None, 0.95).startswith("no blocks suggested: no clear regime")
    ends_low = [0.4, 0.4, 0.4, 0.4, 0.0]  # only the last block is below the mean: no middle run
    assert attention_blocks.suggest_layers(ends_low) is None
    assert "no middle block" in attention_blocks.report(ends_low, None, 0.95)


def test_parallel_and_orthogonal_parts_by_hand():
    pos = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 2.0]]]])
    neg = torch.tensor([[[[-2.0, -4.0]]], [[[1.0, 2.0]]]])  # pos - neg = (3, 4) and (-1, 0)
    par, orth = kickoff_analysis.decompose(pos, neg)
    torch.testing.assert_close(par, torch.tensor([3.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(orth, torch.tensor([4.0, 1.0], dtype=torch.float64))
    rows = [(0, 0.0, 1.0, 0), (1, 0.1, 4.0, 0), (2, 0.2, 1.0, 0), (3, 0.3, 0.3, 0)]
    assert kickoff_analysis.suggest_kappa(rows, fraction=0.1) == 0.3  # first t after the peak below 10%


def test_no_kickoff_is_suggested_when_cfgs_parallel_part_never_falls_low_enough():
    # the case that printed "kappa=0.75 (< 10% of peak)": the parallel part only fell from 0.043 to 0.030
    rows = [(0, 0.0, 0.02, 0), (1, 0.25, 0.043, 0), (2, 0.5, 0.036, 0), (3, 0.75, 0.030, 0)]
    assert kickoff_analysis.suggest_kappa(rows, fraction=0.1) is None
    line = kickoff_analysis.report(rows, 0.1, None)
    assert line.startswith("no kickoff suggested") and "0.043" in line and "0.03" in line and "kappa=" not in line


def test_initial_velocity_variances_by_hand():
    # 2 conditions x 3 noises of a single location
    neg = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], dtype=torch.float64).view(2, 3, 1, 1, 1)
    pos = neg + torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 4.0]], dtype=torch.float64).view(2, 3, 1, 1, 1)
    marginal, conditional = initial_velocity.variances(pos, neg)
    torch.testing.assert_close(marginal, torch.tensor([3.5], dtype=torch.float64))  # var of 0..5
    torch.testing.assert_close(conditional, torch.tensor([(0.0 + 4.0) / 2], dtype=torch.float64))


def test_scripts_write_csv_and_png(ckpt, tmp_path, capsys):
    blocks = attention_blocks.main(["--checkpoint", str(ckpt), "--out", str(tmp_path), "--steps", "4",
                                    "--times", "0.25", "0.75", "--per-class", "1", "--device", "cpu"])  # fmt: skip
    rows = _rows(tmp_path / "attention_blocks.csv")
    assert len(rows) == 2 * 4 and {r["t"] for r in rows} == {"0.2500", "0.7500"}
    assert all(0.0 <= float(r["share_max_prob_above_threshold"]) <= 1.0 for r in rows)
    assert blocks["png"].is_file()
    assert blocks["suggestion"] == attention_blocks.suggest_layers(blocks["mean_shares"])
    # a threshold no probability exceeds: every share is 0, no regime, nothing suggested
    flat = attention_blocks.main(["--checkpoint", str(ckpt), "--out", str(tmp_path), "--steps", "4", "--times",
                                  "0.25", "--per-class", "1", "--threshold", "1.0", "--device", "cpu"])  # fmt: skip
    out = capsys.readouterr().out
    assert flat["suggestion"] is None and "no blocks suggested" in out.splitlines()[-2]
    assert "guidance.image.layers=" not in out.splitlines()[-2]

    kick = kickoff_analysis.main(["--checkpoint", str(ckpt), "--out", str(tmp_path), "--steps", "4",
                                  "--layers", "1", "3", "--per-class", "1", "--device", "cpu"])  # fmt: skip
    rows = _rows(tmp_path / "kickoff.csv")
    assert [r["method"] for r in rows] == ["cfg"] * 4 + ["i_erg"] * 4
    assert kick["png"].is_file() and kick["kappa"] == kickoff_analysis.suggest_kappa(kick["curves"]["cfg"], 0.1)
    # a fraction no norm goes below: the criterion cannot be met, nothing suggested
    never = kickoff_analysis.main(["--checkpoint", str(ckpt), "--out", str(tmp_path), "--steps", "4", "--layers",
                                   "1", "3", "--per-class", "1", "--fraction", "0", "--device", "cpu"])  # fmt: skip
    out = capsys.readouterr().out
    assert never["kappa"] is None and out.splitlines()[-2].startswith("no kickoff suggested")

    init = initial_velocity.main(["--checkpoint", str(ckpt), "--out", str(tmp_path), "--noises", "5",
                                  "--layers", "1", "3", "--device", "cpu"])  # fmt: skip
    rows = _rows(tmp_path / "initial_velocity.csv")
    assert len(rows) == 3 * 64 and init["png"].is_file()  # 3 methods x (1 x 8 x 8) locations
    cfg, c_erg = init["stats"]["cfg"], init["stats"]["c_erg"]
    # no text encoder: C-ERG has nothing to rectify, its negative is the class itself (pos - neg = 0)
    torch.testing.assert_close(c_erg[1], torch.zeros_like(c_erg[1]), atol=1e-10, rtol=0)
    assert cfg[1].abs().max() > 0
