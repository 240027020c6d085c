"""Every config and experiment composes and validates; typos and missing values fail early and clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from models.runtime import ConfigError
from models.training import validate
from tests.conftest import CONFIGS, compose


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _required(group: str, option: str, tmp_path: Path) -> list[str]:
    """Values a config option needs from the user (paths)."""
    if group == "data" and option == "imagefolder":
        root = tmp_path / "imgs"
        for c in ("a", "b"):
            (root / c).mkdir(parents=True, exist_ok=True)
            (root / c / "x.png").write_bytes(b"")
        return [f"data.root={root}"]
    if group == "model" and option == "sit_xl2":
        return ["model.checkpoint=/path/to/SiT-XL-2-256x256.pt"]
    if group == "model" and option.startswith("mmdit"):  # text-to-image: its encoders and grid prompts
        encoders = "sd3" if option == "mmdit_sd3_d24" else "minilm" if option == "mmdit_quickstart" else "llama3_t5"
        return [f"text_encoder={encoders}", "samples.prompts=[a cat]"]
    if group == "data" and option.endswith("_shards"):
        return ["data.shards=/data/shards", "data.autoencoder.path=/models/vae"][
            : 2 if option == "latent_shards" else 1
        ]
    if group == "experiment" and option.startswith("imagenet"):
        return ["data.shards=/data/latents", "data.autoencoder.path=/models/sd-vae-ft-ema"]
    if group == "experiment" and option == "t2i_mmdit_b2":
        return ["data.shards=/data/latents", "data.autoencoder.path=/models/stable-diffusion-3-medium-diffusers"]
    return []


# diffusers pipelines for sample.py (erg/integrations/; tests/test_sd3.py, test_flux.py, test_pixart.py, ...)
SAMPLING_ONLY = {
    ("model", o) for o in options("model") if "erg.integrations." in (CONFIGS / "model" / f"{o}.yaml").read_text()
}


@pytest.mark.parametrize(
    ("group", "option"),
    [(g, o) for g in ("model", "data", "trainer", "logger", "experiment", "debug") for o in options(g)
     if (g, o) not in SAMPLING_ONLY],
)  # fmt: skip
def test_every_option_composes_and_validates(group, option, tmp_path):
    cfg = compose(overrides=[f"{group}={option}", f"run_dir={tmp_path / 'run'}", *_required(group, option, tmp_path)])
    container = validate(cfg)
    assert container["model"]["input_size"] == container["data"]["input_size"]
    assert container["model"]["in_channels"] == container["data"]["channels"]
    if "num_classes" in container["model"]:  # class-conditional families (MMDiT takes text instead)
        assert container["model"]["num_classes"] == container["data"]["num_classes"]


@pytest.mark.parametrize("option", sorted(o for _, o in SAMPLING_ONLY))
def test_sampling_only_models_are_refused_by_train_py(option, tmp_path):
    with pytest.raises(ConfigError, match=r"erg.integrations.*is a public model through diffusers.*sample.py"):
        validate(compose(overrides=[f"model={option}", f"run_dir={tmp_path}"]))


def test_model_size_and_channels_come_from_the_data(tmp_path):
    cfg = compose(overrides=["data.image_size=32", "data.channels=3", "model=dit_s4"])
    model = instantiate(cfg.model)
    assert (model.input_size, model.in_channels, model.num_classes, model.depth) == (32, 3, 10, 12)
    unconditional = compose(overrides=["experiment=digits_uncond"])
    assert instantiate(unconditional.model).num_classes == 0


def test_dit_xl2_is_the_papers_model():
    cfg = compose(overrides=["model=dit_xl2"])
    assert cfg.model.arch == "DiT-XL/2"


def test_unknown_keys_are_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"optim\.lrr \(did you mean optim\.lr\?\)"):
        validate(compose(overrides=["+optim.lrr=0.1"]))
    with pytest.raises(ConfigError, match=r"model\.hiden_size \(did you mean model\.hidden_size\?\)"):
        validate(compose(overrides=["+model.hiden_size=64"]))
    with pytest.raises(ConfigError, match=r"data\.batchsize"):
        validate(compose(overrides=["+data.batchsize=3"]))
    with pytest.raises(ConfigError, match=r"trainer\.max_step "):
        validate(compose(overrides=["+trainer.max_step=3"]))
    with pytest.raises(ConfigError, match=r"unknown config key\(s\): lr\. Valid keys at the top level"):
        validate(compose(overrides=["+lr=3"]))
    with pytest.raises(ConfigError, match=r"sed \(did you mean seed\?\)"):
        validate(compose(overrides=["+sed=3"]))


def test_missing_required_values_are_named():
    with pytest.raises(ConfigError, match=r"missing required config value\(s\): data\.root"):
        validate(compose(overrides=["data=imagefolder"]))
    with pytest.raises(ConfigError, match=r"model\.checkpoint"):
        validate(compose(overrides=["model=sit_xl2"]))


def test_bad_values_are_clear():
    with pytest.raises(ConfigError, match=r"flow\.timesteps must be"):
        validate(compose(overrides=["flow.timesteps=cosine"]))
    with pytest.raises(ConfigError, match="image folder not found"):
        validate(compose(overrides=["data=imagefolder", "data.root=/no/such/folder"]))
