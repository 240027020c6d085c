"""The paper's evaluation protocol as configs: the COCO'14 prompt file + reference folder (built from a local
COCO annotations json + image folder), evaluate.py's coco14 benchmarks, and the sweep specs of Tables 1, 2, 5:
every point composes and validates as a sample.py / evaluate.py config, with the paper's rows and NFE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from PIL import Image

from eval.evaluate import validate as validate_evaluation
from eval.features import FeatureExtractor
from models.generation import validate as validate_sampling
from models.runtime import ConfigError
from scripts.make_coco_prompts import main as make_coco
from tests.conftest import compose


class ColourStats(FeatureExtractor):
    """A stand-in feature extractor (no weights): per-channel mean and std of the image."""

    dim = 6

    @property
    def identity(self) -> str:
        return "colourstats6"

    def forward(self, images):
        x = images.float() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def fake_coco(root: Path, n_images: int = 6) -> tuple[Path, Path]:
    """A COCO-layout captions file and val2014 folder: image i has 3 captions (one with a newline, one empty)."""
    images = root / "val2014"
    images.mkdir(parents=True)
    anns, imgs = [], []
    for i in range(n_images):
        image_id = 100 + 7 * i
        name = f"COCO_val2014_{image_id:012d}.jpg"
        Image.fromarray(np.full((12, 16, 3), 20 * i, np.uint8)).save(images / name)
        imgs.append({"id": image_id, "file_name": name, "height": 12, "width": 16})
        anns += [
            {"id": 1000 + 3 * i + 2, "image_id": image_id, "caption": f"  A photo\nof thing {i}. "},
            {"id": 1000 + 3 * i, "image_id": image_id, "caption": f"the first caption of {i}"},
            {"id": 1000 + 3 * i + 1, "image_id": image_id, "caption": "   "},
        ]
    path = root / "captions_val2014.json"
    path.write_text(json.dumps({"images": imgs[::-1], "annotations": anns}))
    return path, images


def test_coco_prompts_and_reference_folder(tmp_path):
    ann, images = fake_coco(tmp_path)
    out = tmp_path / "coco14"
    manifest = make_coco(["--annotations", str(ann), "--images", str(images), "--out", str(out), "--caption", "first"])
    assert manifest["complete"] and manifest["count"] == 6
    prompts = (out / "prompts.txt").read_text().splitlines()
    assert prompts == [f"the first caption of {i}" for i in range(6)]  # ordered by image id, smallest caption id
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert [p["image_id"] for p in pairs] == [100 + 7 * i for i in range(6)] and pairs[2]["caption_id"] == 1006
    refs = sorted((out / "reference").iterdir())
    assert [r.name for r in refs] == [f"{i:06d}_{100 + 7 * i}.jpg" for i in range(6)]
    assert np.asarray(Image.open(refs[3]))[0, 0, 0] == 60  # the linked file is image 3
    # random captions: seeded per image, never the empty one, inner whitespace collapsed
    other = tmp_path / "random"
    make_coco(["--annotations", str(ann), "--images", str(images), "--out", str(other), "--seed", "1"])
    chosen = (other / "prompts.txt").read_text().splitlines()
    assert all(c in (f"A photo of thing {i}.", f"the first caption of {i}") for i, c in enumerate(chosen))
    # a rerun is instant; other settings into the same folder are refused; a subset is seeded
    assert make_coco(["--annotations", str(ann), "--images", str(images), "--out", str(other), "--seed", "1"]) == \
        json.loads((other / "manifest.json").read_text())  # fmt: skip
    with pytest.raises(SystemExit, match="other settings"):
        make_coco(["--annotations", str(ann), "--images", str(images), "--out", str(other), "--seed", "2"])
    subset = tmp_path / "subset"
    make_coco(["--annotations", str(ann), "--images", str(images), "--out", str(subset), "--limit", "4"])
    assert len((subset / "prompts.txt").read_text().splitlines()) == len(list((subset / "reference").iterdir())) == 4


def test_coco_missing_images_are_named(tmp_path):
    ann, images = fake_coco(tmp_path)
    next(images.iterdir()).unlink()
    with pytest.raises(FileNotFoundError, match="1 of 6 images are not in"):
        make_coco(["--annotations", str(ann), "--images", str(images), "--out", str(tmp_path / "o")])


def test_the_coco_reference_folder_feeds_evaluate_py(tmp_path, monkeypatch):
    """evaluate.py benchmark=coco14_uncond against the folder (digits features stand in for Inception)."""
    from eval.evaluate import run

    ann, images = fake_coco(tmp_path, n_images=8)
    out = tmp_path / "coco14"
    make_coco(["--annotations", str(ann), "--images", str(images), "--out", str(out)])
    monkeypatch.setenv("COCO14_EVAL", str(out))
    cfg = compose("evaluate", ["benchmark=coco14_uncond", f"samples={out / 'reference'}", "prdc.k=2", "logger=none",
                               f"cache_dir={tmp_path / 'cache'}", "num_workers=0", "progress=false"])  # fmt: skip
    assert cfg.reference.path == f"{out}/reference"
    with open_dict(cfg):
        cfg.features = OmegaConf.create({"_target_": f"{__name__}.ColourStats"})
    record = run(cfg)  # the reference folder against itself
    assert record["num_samples"] == 8 and record["metrics"]["fid"] == pytest.approx(0, abs=1e-3)
    assert record["metrics"]["precision"] == record["metrics"]["recall"] == 1.0
    assert record["protocols"]["fid"].endswith("resize256")


def test_benchmark_configs_wire_the_text_metrics(monkeypatch):
    from eval.evaluate import validate

    monkeypatch.setenv("ERG_WEIGHTS", "/w")
    t2i = compose("evaluate", ["benchmark=coco14", "samples=/s"])
    assert validate(t2i) == ["fid", "precision", "recall", "density", "coverage", "clip_score", "vqa_score"]
    assert (t2i.protocol.mode, t2i.protocol.size) == ("resize", 256)
    assert t2i.clip_score.path == "/w/clip-vit-large-patch14" and t2i.vqa_score.cache_dir == "/w/t2v_metrics"
    uncond = compose("evaluate", ["benchmark=coco14_uncond", "samples=/s"])
    assert "clip_score" not in validate(uncond)


PAPER = {
    "table1_t2i": ({"cfg", "apg", "cads", "pag", "sag", "seg", "autoguidance", "erg", "erg_apg", "erg_cads"}, "coco14"),
    "table2_uncond": ({"none", "sag", "pag", "seg", "autoguidance", "erg"}, "coco14_uncond"),
    "table5_ablation": ({"cfg", "c_erg", "erg", "erg_alpha"}, "coco14"),
}


@pytest.mark.parametrize("table", sorted(PAPER))
def test_every_point_of_the_paper_sweeps_is_a_valid_sampling_and_evaluation_config(table, monkeypatch, tmp_path):
    """configs/sweeps/table*.yaml (scripts/sweep.py sweeps=<table>): the paper's rows, Euler 50 steps, the
    COCO'14 prompts (or the empty prompt), the benchmark's evaluation, and the NFE column of Tables 1 / 2."""
    from erg.guidance import build_guidance
    from eval.sweep import point_configs, validate
    from models.runtime import ConfigError

    monkeypatch.setenv("COCO14_EVAL", str(tmp_path / "coco14"))
    with pytest.raises(ConfigError, match=r"missing required .*sample\.checkpoint"):
        validate(compose("sweep", [f"sweeps={table}"]))
    weak = ["grid.autoguidance.checkpoint=/w/weak.ckpt"] if "autoguidance" in PAPER[table][0] else []
    cfg = compose("sweep", [f"sweeps={table}", f"sweep_dir={tmp_path / 'sweep'}", "sample.checkpoint=/w/t2i.ckpt",
                            *weak])  # fmt: skip
    rows, benchmark = PAPER[table]
    pts = validate(cfg)
    assert {p.method for p in pts} == rows
    assert len({p.name for p in pts}) == len(pts)  # one folder per point
    nfe = {}
    for p in pts:
        sample_cfg, eval_cfg = point_configs(cfg, p)
        container = validate_sampling(sample_cfg)
        guidance = build_guidance(container["guidance"])
        assert guidance.name == container["guidance"]["name"] == p.method  # the row's name, e.g. erg for erg_mmdit
        assert container["sampler"] == {"steps": 50, "shift": 1.0, "schedule": "uniform", "bf16": True,
                                        "batch_branches": True, "compile": False}  # Euler, 50 steps  # fmt: skip
        nfe.setdefault(p.method, set()).add(guidance.nfe)
        if table != "table2_uncond":
            assert container["prompts"] == str(tmp_path / "coco14" / "prompts.txt")
            assert container["per_prompt"] == 1
        else:
            assert container["prompts"] is None and container["num_samples"] == 40504
        assert validate_evaluation(eval_cfg) == validate_evaluation(
            compose("evaluate", [f"benchmark={benchmark}", "samples=/s"])
        )
        assert eval_cfg.reference.path == f"{tmp_path / 'coco14'}/reference"
    expected = {row: {1} if row == "none" else {3} if row == "seg" and table == "table1_t2i" else {2} for row in rows}
    assert nfe == expected  # the NFE column of Tables 1 / 2
    if table == "table1_t2i":  # the paper's CADS grid and APG setting; ERG at Table 7's text-to-image row
        cads = [point_configs(cfg, p)[0].guidance.cads for p in pts if p.method == "cads"]
        assert {(c.tau1, c.tau2, c.noise_scale, c.psi) for c in cads} == {
            (a, b, s, 1.0) for a in (0.6, 0.8) for b in (0.8, 1.0) for s in (0.25, 1.0)
        }
        erg = point_configs(cfg, next(p for p in pts if p.method == "erg_apg"))[0].guidance
        assert (erg.image.kappa, erg.image.layers, erg.image.gamma, erg.text.tau) == (0.4, [10, 17], 1.5, 0.01)
        assert OmegaConf.to_container(erg.apg) == {"momentum": -0.5, "eta": 0.0, "norm_threshold": 5.0}
    if table == "table5_ablation":  # alpha = 1 in the ERG column, swept in the last
        alphas = {p.method: {point_configs(cfg, p)[0].guidance.image.alpha} for p in pts if p.method.startswith("erg")}
        assert alphas["erg"] == {1.0} and len({p.settings["image.alpha"] for p in pts if p.method == "erg_alpha"}) == 4


def test_a_row_named_otherwise_names_its_guidance_config():
    from eval.sweep import expand_grid

    (point,) = expand_grid({"erg_alpha": {"config": "erg_mmdit", "image": {"alpha": 0.5}}})
    assert (point.method, point.guidance_config) == ("erg_alpha", "erg_mmdit")
    assert point.settings == {"image.alpha": 0.5, "name": "erg_alpha"}
    (plain,) = expand_grid({"cfg": {"scale": 2.0}})
    assert plain.guidance_config == "cfg" and "name" not in plain.settings
    with pytest.raises(ConfigError, match=r"grid\.erg_x\.config: no guidance config configs/guidance/nope\.yaml"):
        expand_grid({"erg_x": {"config": "nope"}})
    with pytest.raises(ConfigError, match=r"grid\.erg_x: no guidance config .*grid\.<row>\.config="):
        expand_grid({"erg_x": {"scale": 2.0}})
