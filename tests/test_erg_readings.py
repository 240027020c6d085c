"""One rule for `guidance=erg` on every kind of model (issue 11.3), and the other reading as its own config.

eq. (10): neg = D^xi(x, phi_c^tau), phi_c^tau = the user's condition through C-ERG's text temperature, or
the condition itself where there is no temperature / no text encoder. So ERG with tau_i = 1 is the
conditional prediction (no guidance) on class-conditional, text-to-image and unconditional models alike.
`erg_null` (section 3.1: I-ERG on "the negative/unconditional prediction part of CFG") conditions the
negative on the null class / empty prompt: with tau_i = 1 it is CFG."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from erg.conditioning import ClassLabels, Prompts
from erg.guidance import build_guidance
from erg.guidance.base import NULL, RECTIFIED, Condition, TextTemperature
from erg.sampler import GuidedSampler, SamplerConfig
from erg.sampling import sample_noise
from models.checkpoints import build_dit
from models.mmdit import MMDiT
from tests.conftest import compose, randomize

LAYERS = [1, 3]
NEUTRAL_IMAGE = {"layers": LAYERS, "tau": 1.0, "kappa": -1}  # I-ERG at tau_i = 1 on every step
STEPS = 3


def class_model():
    model = build_dit(depth=4, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=2, num_classes=5)
    return randomize(model, seed=3).eval(), [0, 3, 4], None


def unconditional_model():
    model = build_dit(depth=4, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=2, num_classes=0)
    return randomize(model, seed=4).eval(), None, None


def text_model():
    """An MMDiT with a prompt conditioning whose null (empty prompt) differs from every prompt."""
    torch.manual_seed(0)
    model = MMDiT(input_size=8, in_channels=2, context_dim=12, pooled_dim=6, patch_size=2, hidden_size=32, depth=4,
                  num_heads=2, mlp_ratio=2.0)  # fmt: skip
    model = randomize(model, seed=5).eval()

    def encode(prompts):
        g = torch.Generator().manual_seed(sum(map(ord, "".join(prompts))))
        return {
            "context": torch.randn(len(prompts), 5, 12, generator=g),
            "pooled": torch.randn(len(prompts), 6, generator=g),
        }

    null = lambda n: {"context": torch.zeros(n, 5, 12), "pooled": torch.zeros(n, 6)}
    return model, ["a cat", "a dog", "two cats"], Prompts(encode, encoders={}, null=null)


KINDS = {"class": class_model, "text": text_model, "unconditional": unconditional_model}


def run(kind, cfg):
    model, conditions, conditioning = KINDS[kind]()
    conditionings = {"main": conditioning} if conditioning is not None else None
    sampler = GuidedSampler(build_guidance(cfg), model, conditionings, SamplerConfig(steps=STEPS))
    noise = sample_noise(range(3), (2, 8, 8), base_seed=2)
    return sampler.sample(noise, conditions)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_erg_at_tau_one_is_the_conditional_prediction_on_every_model(kind):
    erg = run(kind, {"method": "erg", "scale": 2.0, "image": NEUTRAL_IMAGE})
    # pos and neg rows run in one batched forward: equal up to BLAS rounding, not bit for bit
    torch.testing.assert_close(erg, run(kind, {"method": "none"}), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_erg_null_at_tau_one_is_cfg(kind):
    erg_null = run(kind, {"method": "erg", "scale": 2.0, "condition": "null", "image": NEUTRAL_IMAGE})
    assert torch.equal(erg_null, run(kind, {"method": "cfg", "scale": 2.0}))


@pytest.mark.parametrize("kind", ["class", "text"])
def test_the_two_readings_differ_where_there_is_a_condition(kind):
    image = {"layers": LAYERS, "tau": 0.01, "kappa": -1}
    erg = run(kind, {"method": "erg", "scale": 2.0, "image": image})
    erg_null = run(kind, {"method": "erg", "scale": 2.0, "condition": "null", "image": image})
    assert (erg - erg_null).abs().max() > 1e-3
    # eq. (10)'s reading with no text temperature is I-ERG alone (condition=cond): the same method
    i_erg = run(kind, {"method": "erg", "scale": 2.0, "condition": "cond", "image": image})
    torch.testing.assert_close(erg, i_erg, atol=1e-6, rtol=1e-6)


def test_class_labels_encode_c_erg_as_the_class_and_null_as_the_null_class():
    model, labels, _ = class_model()
    cond = ClassLabels(model)
    as_class = cond.encode(labels, Condition(RECTIFIED))["class_embedding"]
    assert torch.equal(as_class, model.y_embedder(torch.tensor(labels)))
    null = cond.encode(labels, Condition(NULL))["class_embedding"]
    assert torch.equal(null, model.y_embedder(torch.full((3,), model.null_class)))
    with pytest.warns(UserWarning, match="conditioned on the class itself"):
        with_text = cond.encode(labels, Condition(RECTIFIED, text=TextTemperature(0.01, (("t5", (0, 24)),))))
    assert torch.equal(with_text["class_embedding"], as_class)


def _guidance(name):
    cfg = compose("sample", [f"guidance={name}", "checkpoint=x"]).guidance
    return build_guidance(OmegaConf.to_container(cfg, resolve=True))


def test_configs_name_the_two_readings():
    erg, erg_null, i_erg = _guidance("erg"), _guidance("erg_null"), _guidance("i_erg")
    assert erg.branch("neg").condition.kind == RECTIFIED and erg_null.branch("neg").condition.kind == NULL
    assert erg_null.name == "erg_null" and i_erg.branch("neg").condition.kind == "cond"
    # the same I-ERG settings (Table 7's class-conditional row), only the negative's condition differs
    assert erg.branch("neg").perturbation == erg_null.branch("neg").perturbation
    # `guidance.condition=null` on a command line is YAML null: it means the null condition
    assert build_guidance({"method": "erg", "condition": None, "image": {}}).branch("neg").condition.kind == NULL
