"""evaluate.py end to end on tiny sets: digit features from a net trained for one epoch, every kind of
reference, the cache named by feature space and protocol, metrics equal to a direct computation,
records never overwritten across protocols, text metrics, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from data.digits import DigitsDataModule
from data.sample_store import SampleStore
from data.transforms import to_uint8
from eval.evaluate import run
from eval.features import DigitsFeatures
from eval.fid import GaussianStats, frechet_distance
from eval.io import write_adm_npz
from eval.prdc import compute_prdc
from eval.records import read_records
from models.runtime import ConfigError
from tests.conftest import ROOT, compose


@pytest.fixture(scope="module")
def digits_net(tmp_path_factory):
    from scripts.train_feature_net import main

    out = tmp_path_factory.mktemp("net") / "digits_cnn.pt"
    result = main(["--epochs", "1", "--out", str(out)])
    assert out.is_file() and 0.0 <= result["held_out_accuracy"] <= 1.0 and result["num_held_out"] == 180
    return str(out)


@pytest.fixture(scope="module")
def digits():
    (xt, yt), (xv, _) = DigitsDataModule(seed=0).split()
    return to_uint8(xt).numpy(), yt, to_uint8(xv).numpy()


def make_store(root, images, labels=None, prompts=None, shard_size=32):
    store = SampleStore(root, len(images), shard_size=shard_size)
    store.write_layout()
    for s in range(store.num_shards):
        idx = list(store.shard_indices(s))
        records = [{"index": i, "seed": i} for i in idx]
        for r in records:
            if labels is not None:
                r["label"] = int(labels[r["index"]])
            if prompts is not None:
                r["prompt"] = prompts[r["index"]]
        store.write_shard(s, images[idx], records)
    return root


def evaluate(tmp_path, *overrides, edit=None):
    cfg = compose("evaluate", [f"cache_dir={tmp_path / 'cache'}", "num_workers=0", "progress=false", *overrides])
    if edit is not None:
        edit(cfg)
    return run(cfg)


def test_end_to_end_matches_a_direct_computation(tmp_path, digits_net, digits):
    train, labels, val = digits
    samples = make_store(tmp_path / "run", train[:70], labels)
    rec = evaluate(tmp_path, f"samples={samples}", "data=digits", "features=digits", f"features.weights={digits_net}")

    # Independent: features of the held-out split and the samples, then the formulas directly.
    ext = DigitsFeatures(digits_net)
    f_real = ext(torch.from_numpy(val).permute(0, 3, 1, 2))
    f_fake = ext(torch.from_numpy(train[:70]).permute(0, 3, 1, 2))
    sr, sf = GaussianStats.from_features(f_real.double()), GaussianStats.from_features(f_fake.double())
    assert rec["metrics"]["fid"] == pytest.approx(frechet_distance(sr.mu, sr.sigma, sf.mu, sf.sigma), rel=1e-6)
    prdc = compute_prdc(f_real, f_fake, k=3).as_dict()
    assert {m: rec["metrics"][m] for m in prdc} == pytest.approx(prdc, abs=1e-12)
    assert rec["num_samples"] == 70 and rec["num_reference"] == 180 and rec["prdc_k"] == 3

    # metrics.json next to the samples, one record, each metric with its protocol
    records = read_records(samples / "metrics.json")
    (record,) = records.values()
    assert record["metrics"] == rec["metrics"]
    space = f"{ext.identity}__asis"
    key = f"{rec['reference']}__{space}"
    # FID's protocol is reference + feature space; PRDC's adds k (a different k is a different metric)
    assert record["protocols"] == {"fid": key, **{m: f"{key}__k3" for m in prdc}}
    # the cache is named by reference, extractor identity and protocol; the radii sit next to it
    (cached,) = [p for p in (tmp_path / "cache").glob("*.npz") if ".radii-" not in p.name]
    assert cached.name == f"{rec['reference']}__{space}.npz" and rec["reference"].startswith("data-digits-val-")
    assert cached.with_name(cached.stem + ".radii-k3-exact.npz").is_file()  # exact float64 radii (eval/prdc.py)
    assert rec["prdc_exact"] is True and rec["prdc_dtype"] == "float32"
    # logged to the CSV logger next to metrics.json
    assert "eval/fid" in (samples / "logs" / "metrics.csv").read_text()

    # a second run reads the cache (not rewritten) and gives the same numbers
    mtime = cached.stat().st_mtime_ns
    again = evaluate(tmp_path, f"samples={samples}", "data=digits", "features=digits", f"features.weights={digits_net}")
    assert again["metrics"] == rec["metrics"] and cached.stat().st_mtime_ns == mtime


def test_every_kind_of_reference_gives_the_same_numbers(tmp_path, digits_net, digits):
    from PIL import Image

    train, _, val = digits
    samples = make_store(tmp_path / "run", train[100:160])
    feats = ["features=digits", f"features.weights={digits_net}"]
    base = evaluate(tmp_path, f"samples={samples}", "data=digits", *feats)["metrics"]
    (tmp_path / "ref_png").mkdir()
    for i, img in enumerate(val):
        Image.fromarray(img[..., 0]).save(tmp_path / "ref_png" / f"{i:04d}.png")
    write_adm_npz(tmp_path / "ref.npz", [val], len(val))
    for ref in ("ref_png", "ref.npz"):
        got = evaluate(tmp_path, f"samples={samples}", f"reference.path={tmp_path / ref}", *feats)["metrics"]
        assert got == pytest.approx(base, rel=1e-6), ref
    # A statistics file written by evaluate.py is itself a reference (features included: PRDC works).
    (stats,) = [p for p in (tmp_path / "cache").glob("npz-ref-*.npz") if ".radii" not in p.name]
    got = evaluate(tmp_path, f"samples={samples}", f"reference.path={stats}", *feats)["metrics"]
    assert got == pytest.approx(base, rel=1e-6)
    # ... but never in another feature space: resizing changes the protocol.
    with pytest.raises(ValueError, match="never mixed"):
        evaluate(tmp_path, f"samples={samples}", f"reference.path={stats}", *feats, "protocol.mode=resize",
                 "protocol.size=16")  # fmt: skip
    # Samples as an ADM .npz: metrics land in <stem>.metrics.json beside it.
    write_adm_npz(tmp_path / "s.npz", [train[100:160]], 60)
    rec = evaluate(tmp_path, f"samples={tmp_path / 's.npz'}", "data=digits", *feats)
    assert rec["metrics"] == pytest.approx(base, rel=1e-6) and rec["path"] == str(tmp_path / "s.metrics.json")


def test_another_protocol_adds_a_record_instead_of_overwriting(tmp_path, digits_net, digits):
    train, _, _ = digits
    samples = make_store(tmp_path / "run", train[:40])
    feats = ["features=digits", f"features.weights={digits_net}"]
    evaluate(tmp_path, f"samples={samples}", "data=digits", *feats)
    evaluate(tmp_path, f"samples={samples}", "data=digits", *feats, "protocol.mode=resize", "protocol.size=32")
    first = read_records(samples / "metrics.json")
    evaluate(tmp_path, f"samples={samples}", "data=digits", *feats)  # the same protocol again: replaces
    records = read_records(samples / "metrics.json")
    assert len(records) == 2 and set(records) == set(first)
    assert [len(r["metrics"]) for r in records.values()] == [5, 5]
    assert any("resize32" in key for key in records) and any("asis" in key for key in records)
    evaluate(tmp_path, f"samples={samples}", "data=digits", *feats, "prdc.k=5")  # PRDC's k is part of the protocol
    records = read_records(samples / "metrics.json")
    assert len(records) == 3 and any(key.endswith("__k5") for key in records)
    assert sorted((tmp_path / "cache").glob("*resize32.npz"))


def test_text_metrics_with_a_tiny_clip_and_a_stand_in_vqa(tmp_path, digits):
    from eval.text_metrics import CLIPScore
    from tests.test_eval_text import TinyVQA, make_tiny_clip

    train, _, _ = digits
    prompts = [f"digit {'abcdefghij'[i % 10]}" for i in range(24)]
    samples = make_store(tmp_path / "run", train[:24], prompts=prompts, shard_size=10)
    clip = make_tiny_clip(tmp_path / "clipdir")

    def plug_in_the_stand_in(cfg):  # any VQAScorer subclass plugs in through the vqa_score node
        cfg.vqa_score = OmegaConf.create({"_target_": "tests.test_eval_text.TinyVQA", "batch_size": 7})

    rec = evaluate(
        tmp_path, f"samples={samples}", "metrics=[clip_score,vqa_score]", f"clip_score.path={clip}",
        "clip_score.batch_size=5", edit=plug_in_the_stand_in,
    )  # fmt: skip
    expected_clip = CLIPScore(clip)(train[:24], prompts).double().mean().item()
    expected_vqa = TinyVQA()(train[:24], prompts).double().mean().item()  # a probability; tables print x100
    assert rec["metrics"]["clip_score"] == pytest.approx(expected_clip, rel=1e-5)
    assert rec["metrics"]["vqa_score"] == pytest.approx(expected_vqa, rel=1e-6)
    assert rec["protocols"]["vqa_score"] == "tiny-vqa" and rec["protocols"]["clip_score"].startswith("clip-")

    no_prompts = make_store(tmp_path / "noprompt", train[:8], labels=np.zeros(8))
    with pytest.raises(ValueError, match="need a prompt per image"):
        evaluate(tmp_path, f"samples={no_prompts}", "metrics=[clip_score]", f"clip_score.path={clip}")


def test_config_errors_are_clear(tmp_path, digits_net):
    with pytest.raises(ConfigError, match="no reference"):
        evaluate(tmp_path, f"samples={tmp_path}", "features=digits")
    with pytest.raises(ConfigError, match="choose from"):
        evaluate(tmp_path, f"samples={tmp_path}", "data=digits", "metrics=[fdi]")
    with pytest.raises(ConfigError, match="missing required config value"):
        evaluate(tmp_path)
    with pytest.raises(ConfigError, match="unknown config key.*features.weigths"):
        evaluate(tmp_path, f"samples={tmp_path}", "data=digits", "features=digits", "+features.weigths=x")
    with pytest.raises(ConfigError, match=r"prdc.dtype must be one of \['float32', 'float64'\].*got 'float16'"):
        evaluate(tmp_path, f"samples={tmp_path}", "data=digits", "features=digits", "prdc.dtype=float16")
    with pytest.raises(ConfigError, match="prdc.exact must be true or false"):
        evaluate(tmp_path, f"samples={tmp_path}", "data=digits", "features=digits", "prdc.exact=maybe")


def test_prdc_dtype_and_exactness_reach_the_computation_and_the_digest(tmp_path, digits_net, digits):
    from eval.evaluate import settings_digest

    train, labels, val = digits
    samples = make_store(tmp_path / "run", train[:40], labels)
    common = [f"samples={samples}", "data=digits", "features=digits", f"features.weights={digits_net}"]
    exact64 = evaluate(tmp_path, *common, "prdc.dtype=float64")
    exact32 = evaluate(tmp_path, *common)
    assert exact64["prdc_dtype"] == "float64" and exact64["metrics"] == exact32["metrics"]  # exact: same numbers
    ext = DigitsFeatures(digits_net)
    f_real = ext(torch.from_numpy(val).permute(0, 3, 1, 2))
    f_fake = ext(torch.from_numpy(train[:40]).permute(0, 3, 1, 2))
    plain = evaluate(tmp_path, *common, "prdc.exact=false")
    expected = compute_prdc(f_real, f_fake, k=3, exact=False).as_dict()
    assert {m: plain["metrics"][m] for m in expected} == pytest.approx(expected, abs=1e-12)
    digest = lambda *o: settings_digest(compose("evaluate", [*common, *o]))
    assert digest() == digest("prdc.dtype=float64")  # exact PRDC does not depend on the GEMMs' dtype
    assert digest() != digest("prdc.exact=false") != digest("prdc.exact=false", "prdc.dtype=float64")


def test_command_line(tmp_path, digits_net, digits):
    train, _, _ = digits
    samples = make_store(tmp_path / "run", train[:30])
    common = [f"cache_dir={tmp_path / 'cache'}", "num_workers=0", "features=digits", f"features.weights={digits_net}"]
    out = subprocess.run(
        [sys.executable, "evaluate.py", f"samples={samples}", "data=digits", *common],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"fid"' in out.stdout and f"metrics written to {samples / 'metrics.json'}" in out.stdout
    assert json.loads((samples / "metrics.json").read_text())["schema"] == 1


@pytest.mark.parametrize("option", sorted(p.stem for p in (ROOT / "configs" / "features").glob("*.yaml")))
def test_every_features_option_composes_and_validates(option):
    from eval.evaluate import validate

    extra = ["features.weights=/path/to/weights"] if option == "dinov2" else []
    cfg = compose("evaluate", ["samples=/some/samples", "data=digits", f"features={option}", *extra])
    assert validate(cfg) == ["fid", "precision", "recall", "density", "coverage"]
