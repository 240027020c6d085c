"""Training from webdataset shards: a few steps from image, latent and caption shards through the
real configs, a corrupted shard skipped and counted in the logs, the global batch size split."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from data.shard_datamodule import ShardDataModule
from data.shards import DataConfigError
from models.training import run
from scripts import make_shards, precompute_latents
from tests.conftest import compose, small_run_overrides
from tests.shard_data import write_captioned_digits, write_digit_folder
from tests.test_autoencoder import tiny_vae


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("shards")
    write_digit_folder(tmp / "images", n=96)
    make_shards.main(["--input", str(tmp / "images"), "--out", str(tmp / "digits"), "--samples-per-shard", "24"])
    write_captioned_digits(tmp / "pairs", n=48)
    make_shards.main(["--layout", "captions", "--input", str(tmp / "pairs"), "--out", str(tmp / "captions"),
                      "--samples-per-shard", "24"])  # fmt: skip
    vae = tiny_vae(tmp / "vae", 4, shift=None, scale=0.18215)
    precompute_latents.main(["--shards", str(tmp / "digits"), "--out", str(tmp / "latents"), "--image-size", "16",
                             "--autoencoder", str(vae), "--flip"])  # fmt: skip
    return {"digits": tmp / "digits", "captions": tmp / "captions", "latents": tmp / "latents", "vae": vae}


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _train(run_dir: Path, steps: int, data: list[str]) -> dict:
    extra = ["data.num_workers=0", "data.shuffle_buffer=16", *data]
    return run(compose(overrides=small_run_overrides(run_dir, steps, extra)))


@pytest.mark.parametrize("kind", ["images", "latents", "captions"])
def test_a_few_training_steps_from_shards(tmp_path, shards, kind):
    data = {
        "images": ["data=image_shards", f"data.shards={shards['digits']}", "data.image_size=16", "data.channels=1",
                   "data.num_classes=10", f"data.val_shards={shards['digits']}", "trainer.val_check_interval=3"],
        "latents": ["data=latent_shards", f"data.shards={shards['latents']}", f"data.autoencoder.path={shards['vae']}",
                    "data.image_size=16", "data.input_size=8", "data.num_classes=10"],
        "captions": ["data=text_image_shards", f"data.shards={shards['captions']}", "data.image_size=16",
                     "data.captions=[txt,json:short_caption]"],
    }[kind]  # fmt: skip
    run_dir = tmp_path / kind
    summary = _train(run_dir, 6, data)
    assert summary["step"] == 6 and summary["train_loss"] is not None
    rows = _metrics(run_dir)
    assert len([r for r in rows if r.get("train/loss")]) == 6
    skipped = [float(r["data/skipped_shards"]) for r in rows if r.get("data/skipped_shards")]
    assert skipped and set(skipped) == {0.0}
    if kind == "images":  # held-out shards: the validation loss over all 96 samples, twice
        assert len([r for r in rows if r.get("val/loss")]) == 2
    # the sample grid at the end went through the DataModule's decode (the VAE's decoder for latents)
    assert (run_dir / "samples" / "step_0000006.png").is_file()


def test_training_skips_and_logs_a_corrupted_shard(tmp_path, shards):
    broken = tmp_path / "broken"
    broken.mkdir()
    for i, p in enumerate(sorted(shards["digits"].glob("*.tar"))):
        (broken / p.name).write_bytes(p.read_bytes() if i else p.read_bytes()[:3000])  # first shard truncated
    data = ["data=image_shards", f"data.shards={broken}", "data.image_size=16", "data.channels=1"]
    summary = _train(tmp_path / "run", 12, data)
    assert summary["step"] == 12
    skipped = [float(r["data/skipped_shards"]) for r in _metrics(tmp_path / "run") if r.get("data/skipped_shards")]
    assert skipped[-1] >= 1 and skipped == sorted(skipped)  # counted, cumulative, and the run went on


def test_global_batch_size_is_split_over_gpus_and_accumulation(shards):
    class FakeTrainer:
        global_rank, world_size, accumulate_grad_batches, global_step = 1, 8, 2, 0

    dm = ShardDataModule(str(shards["digits"]), image_size=16, channels=1, global_batch_size=256, num_workers=0)
    dm.trainer = FakeTrainer()
    assert dm.per_rank_batch_size() == 16
    dm.global_batch_size = 100
    with pytest.raises(DataConfigError, match="does not split over 8 GPU"):
        dm.per_rank_batch_size()


def test_missing_shards_fail_early_and_plainly(tmp_path):
    cfg = compose(overrides=small_run_overrides(tmp_path / "run", 1, ["data=image_shards", "data.shards=/no/such/dir"]))
    with pytest.raises(FileNotFoundError, match=r"none of the 1 shard file\(s\) of data.shards=/no/such/dir"):
        run(cfg)  # not wrapped in Hydra's InstantiationException: train.py prints it as a plain error
