"""Autoencoders and precomputed latents: shift/scale from the VAE's own config, encode/decode against
diffusers' AutoencoderKL directly, and the round trip images -> latent shards -> DataModule -> images."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.shard_datamodule import ShardDataModule
from data.shards import DataConfigError, expand_urls
from data.transforms import center_crop_arr, to_model_range
from models.autoencoder import DiffusersVAE, IdentityAutoencoder
from scripts import make_shards, precompute_latents
from tests.shard_data import write_digit_folder

pytest.importorskip("diffusers")


def tiny_vae(folder: Path, latent_channels: int, shift: float | None, scale: float) -> Path:
    """A randomly initialised AutoencoderKL with the SD (4 ch) or SD3 (16 ch, shift) layout, 2x downsampling."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=16, scaling_factor=scale,
        shift_factor=shift, use_quant_conv=shift is None, use_post_quant_conv=shift is None,
    )  # fmt: skip
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd3_vae(tmp_path_factory) -> Path:
    return tiny_vae(tmp_path_factory.mktemp("sd3") / "vae", 16, shift=0.0609, scale=1.5305)


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("digits")
    write_digit_folder(tmp / "images", n=30)
    out = ["--input", str(tmp / "images"), "--out", str(tmp / "shards"), "--samples-per-shard", "8"]
    return make_shards.main(out)["pattern"]


def test_shift_and_scale_come_from_the_vae_config(tmp_path, sd3_vae):
    from diffusers import AutoencoderKL

    sd = DiffusersVAE(str(tiny_vae(tmp_path / "sd", 4, shift=None, scale=0.18215)))
    assert (sd.channels, sd.factor, sd.shift, sd.scale) == (4, 2, 0.0, 0.18215)
    sd3 = DiffusersVAE(str(sd3_vae), channels=16)
    assert (sd3.channels, sd3.factor, sd3.shift, sd3.scale) == (16, 2, 0.0609, 1.5305)

    # against diffusers directly: z = (mean - shift) * scale, decode(z) = D(z / scale + shift)
    vae = AutoencoderKL.from_pretrained(sd3_vae).eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
        z = sd3.encode(images)
        torch.testing.assert_close(z, (dist.mean - 0.0609) * 1.5305)
        torch.testing.assert_close(sd3.decode(z), vae.decode(dist.mean).sample.clamp(-1, 1), atol=1e-5, rtol=1e-5)
        noise = torch.randn_like(z)
        torch.testing.assert_close(sd3.encode(images, "sample", noise=noise), z + dist.std * 1.5305 * noise)
    assert sd3.encode(images, "sample").shape == (2, 16, 8, 8)

    with pytest.raises(ValueError, match="has 16 latent channels, the config expects 4"):
        DiffusersVAE(str(sd3_vae), channels=4)
    with pytest.raises(FileNotFoundError, match="no diffusers AutoencoderKL at .*nothing is downloaded"):
        DiffusersVAE(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="encode mode"):
        sd3.encode(images, "mode")
    pixels = IdentityAutoencoder()
    assert pixels.encode(images) is images and pixels.decode(images) is images


def _read(shard: str) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_latent_round_trip_through_shards(tmp_path, sd3_vae, digit_shards):
    args = ["--shards", digit_shards, "--image-size", "16", "--autoencoder", str(sd3_vae), "--flip",
            "--batch-size", "3"]  # fmt: skip
    result = precompute_latents.main([*args, "--out", str(tmp_path / "latents")])
    assert result["written"] == 30 and not result["failed"]

    ae = DiffusersVAE(str(sd3_vae))
    images = {}
    for url in expand_urls(digit_shards):
        for key, sample in _read(url).items():
            images[key] = (
                sample,
                to_model_range(center_crop_arr(Image.open(io.BytesIO(sample["png"])).convert("RGB"), 16)),
            )
    latents = {k: v for url in sorted((tmp_path / "latents").glob("*.tar")) for k, v in _read(str(url)).items()}
    assert latents.keys() == images.keys()
    keys = sorted(images)[:4]
    x = torch.stack([images[k][1] for k in keys])
    stored = torch.stack([torch.from_numpy(np.load(io.BytesIO(latents[k]["npy"]))) for k in keys])
    mirrored = torch.stack([torch.from_numpy(np.load(io.BytesIO(latents[k]["flip.npy"]))) for k in keys])
    torch.testing.assert_close(stored, ae.encode(x), atol=1e-5, rtol=1e-5)  # batches of 3 vs 4: same latents
    torch.testing.assert_close(mirrored, ae.encode(x.flip(-1)), atol=1e-5, rtol=1e-5)
    for k in keys:  # labels and metadata travel with the latents
        assert latents[k]["cls"] == images[k][0]["cls"] and latents[k]["json"] == images[k][0]["json"]

    # the DataModule reads them in model space and decodes them with the same autoencoder
    dm = ShardDataModule(str(tmp_path / "latents"), kind="latents", image_size=16, input_size=8, channels=16,
                         num_classes=10, batch_size=4, num_workers=0, autoencoder=ae)  # fmt: skip
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (4, 16, 8, 8) and batch["x"].dtype == torch.float32
    assert dm.decode(batch["x"]).shape == (4, 3, 16, 16)
    torch.testing.assert_close(dm.decode(stored), ae.vae.decode(stored / 1.5305 + 0.0609).sample.clamp(-1, 1))

    # a config that does not match latents.json is refused, naming the difference
    with pytest.raises(DataConfigError, match="scale: shards 1.5305 vs config 0.5"):
        ShardDataModule(str(tmp_path / "latents"), kind="latents", image_size=16, input_size=8, channels=16,
                        autoencoder=DiffusersVAE(str(sd3_vae), scale=0.5))  # fmt: skip


def test_precompute_by_rank_and_resumed_equals_one_run(tmp_path, sd3_vae, digit_shards):
    args = ["--shards", digit_shards, "--image-size", "16", "--autoencoder", str(sd3_vae), "--mode", "sample"]
    # (one batch size throughout: a conv backend may round differently for other batch sizes)
    precompute_latents.main([*args, "--out", str(tmp_path / "one"), "--batch-size", "5"])
    # two "GPUs"; rank 1 is interrupted (a shard lost), then rerun
    precompute_latents.main([*args, "--out", str(tmp_path / "two"), "--rank", "0", "--world-size", "2",
                             "--batch-size", "5"])  # fmt: skip
    rank1 = [*args, "--out", str(tmp_path / "two"), "--rank", "1", "--world-size", "2", "--batch-size", "5"]
    done = precompute_latents.main(rank1)
    assert done["shards"] == 2  # shards 1 and 3 of 4
    (tmp_path / "two" / "train-000003.tar").unlink()
    assert precompute_latents.main(rank1)["shards"] == 1
    digest = lambda d: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.tar"))}
    assert len(digest(tmp_path / "one")) == 4 and digest(tmp_path / "one") == digest(tmp_path / "two")
    with pytest.raises(ValueError, match="describes a different run"):
        precompute_latents.main([*args, "--out", str(tmp_path / "one"), "--flip"])


def test_unreadable_input_shard_is_not_written(tmp_path, digit_shards):
    bad = tmp_path / "in" / "train-000009.tar"
    bad.parent.mkdir()
    bad.write_bytes(b"garbage" * 50)
    result = precompute_latents.main(["--shards", f"{digit_shards}::{bad}", "--image-size", "16",
                                      "--autoencoder", "identity", "--out", str(tmp_path / "px")])  # fmt: skip
    assert result["failed"] == [str(bad)] and result["shards"] == 4
    assert not (tmp_path / "px" / "train-000009.tar").exists()


def test_autoencoder_configs_set_the_latent_space_of_data_and_model():
    from models.training import validate
    from tests.conftest import compose

    base = ["data=latent_shards", "data.shards=/data/latents", "data.autoencoder.path=/models/vae"]
    sd = validate(compose(overrides=base))
    assert sd["data"]["autoencoder"]["channels"] == sd["data"]["channels"] == sd["model"]["in_channels"] == 4
    sd3 = validate(compose(overrides=[*base, "autoencoder@data.autoencoder=sd3_vae"]))
    assert sd3["data"]["channels"] == sd3["model"]["in_channels"] == 16
    assert sd3["data"]["autoencoder"]["subfolder"] == "vae"
