"""scripts/benchmark_eval.py runs end to end on CPU with tiny sizes; the real figures come from a GPU."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eval.fid import frechet_distance
from scripts.benchmark_eval import main


def test_benchmark_eval_smoke_cpu(tmp_path):
    results = main([
        "--device", "cpu", "--image-size", "32", "--batch-size", "2", "--inception-images", "3", "--warmup", "0",
        "--sources", "host", "device", "--prdc-n", "64", "--prdc-dim", "16", "--chunk-size", "20", "--fid-batch", "24",
        "--out", str(tmp_path / "eval.md"), "--json", str(tmp_path / "eval.json"),
    ])  # fmt: skip
    host, device = results["inception"]
    assert (host["source"], device["source"]) == ("host", "device")
    assert all(r["img_per_s"] > 0 and r["images"] == 4 for r in (host, device))  # 3 images: two batches of 2
    assert results["prdc"]["n"] == 64 and 0 <= results["prdc"]["precision"] <= 1
    fid = results["fid"]
    assert fid["sqrtm_value"] == pytest.approx(fid["eigh_value"], rel=1e-9)
    table = (tmp_path / "eval.md").read_text()
    assert (
        "| PRDC (k = 3) | seconds | peak memory |" in table and "end to end from uint8 images in host memory" in table
    )
    assert json.loads((tmp_path / "eval.json").read_text())["prdc"]["chunk_size"] == 20


def test_benchmark_eval_fid_statistics_are_those_of_the_features():
    """The streamed statistics (batches of 24 of 64 points) give the FID of numpy's mean and covariance."""
    import torch

    from scripts.benchmark_eval import EvalBench, random_features

    cfg = EvalBench(prdc_n=64, prdc_dim=16, fid_batch=24)
    results = main(["--device", "cpu", "--skip-inception", "--skip-prdc", "--prdc-n", "64", "--prdc-dim", "16",
                    "--fid-batch", "24"])  # fmt: skip
    real, fake = (x.double().numpy() for x in random_features(cfg, torch.device("cpu")))
    expected = frechet_distance(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))
    assert set(results) == {"device", "torch", "fid"}
    assert results["fid"]["sqrtm_value"] == pytest.approx(expected, rel=1e-9)
