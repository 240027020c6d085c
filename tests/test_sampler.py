"""The shared sampler on a tiny random DiT: batched == one by one, neutral settings reduce to CFG or
to no guidance, the kickoff switches exactly when t > kappa, the model is untouched."""

from __future__ import annotations

import copy

import pytest
import torch

from erg.attention import Temperature
from erg.guidance import build_guidance
from erg.sampler import GuidedSampler, SamplerConfig
from erg.sampling import euler, sample_noise
from models.checkpoints import build_dit
from tests.conftest import randomize

LAYERS = [1, 3]
METHODS = {
    "none": {"method": "none"},
    "cfg": {"method": "cfg", "scale": 2.0},
    "apg": {"method": "cfg", "scale": 2.0, "apg": {"norm_threshold": 1.0}},
    "cads": {"method": "cfg", "scale": 2.0, "cads": {"noise_scale": 0.5}},
    "i_erg": {"method": "erg", "scale": 2.0, "condition": "cond", "image": {"layers": LAYERS, "kappa": 0.2}},
    "erg": {"method": "erg", "scale": 2.0, "image": {"layers": LAYERS, "kappa": 0.2, "gamma": 1.5}},
    "erg_apg": {"method": "erg", "scale": 2.0, "image": {"layers": LAYERS}, "apg": {}},
    "erg_cads": {"method": "erg", "scale": 2.0, "image": {"layers": LAYERS}, "cads": {"branch": "both"}},
    "pag": {"method": "pag", "scale": 2.0, "layers": LAYERS},
    "seg": {"method": "seg", "layers": LAYERS, "sigma": 0.7},
    "sag": {"method": "sag", "scale": 2.0, "layers": LAYERS, "blur_kernel": 3},
    "autoguidance": {"method": "autoguidance", "checkpoint": "weak.ckpt"},
    "cfg_zero_star": {"method": "cfg_zero_star", "scale": 2.0},
    "slg": {"method": "slg", "scale": 2.0, "layers": LAYERS, "start": 0.2, "stop": 0.8},
    "slg_attention": {"method": "slg", "layers": LAYERS, "skip": "attention", "start": -1, "stop": 1},
    "fdg": {"method": "fdg", "scales": [3.0, 1.5], "parallel_weights": [0.5, 1.0]},
    "tcfg": {"method": "tcfg", "scale": 2.0},
    "mambo_g": {"method": "mambo_g", "scale": 3.0, "alpha": 1.0},
    "cfg_interval": {"method": "cfg", "scale": 2.0, "interval": [0.3, 0.7]},
    "erg_interval": {"method": "erg", "scale": 2.0, "image": {"layers": LAYERS, "kappa": 0.2}, "interval": [0.2, 0.6]},
}
STEPS = 4


def tiny(seed: int = 0):
    model = build_dit(depth=4, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=2, num_classes=5)
    return randomize(model, seed=seed).eval()


@pytest.fixture(scope="module")
def models():
    return {"main": tiny(0), "weak": tiny(1)}


def sampler(models, cfg, **kw):
    return GuidedSampler(build_guidance(cfg), models, config=SamplerConfig(steps=STEPS, **kw))


LABELS = [0, 3, 4]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_batched_branches_equal_one_forward_per_branch(models, name):
    batched = sampler(models, METHODS[name]).sample_indices(range(3), LABELS)
    separate = sampler(models, METHODS[name], batch_branches=False).sample_indices(range(3), LABELS)
    torch.testing.assert_close(batched, separate, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_sample_does_not_depend_on_its_batch(models, name):
    """Per-sample seeds: sample i is the same alone or in a batch (noise and CADS' noise included)."""
    s = sampler(models, METHODS[name])
    together = s.sample_indices([5, 6, 7], LABELS, base_seed=3)
    alone = torch.cat([s.sample_indices([i], [y], base_seed=3) for i, y in zip([5, 6, 7], LABELS)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together[0], together[1])


def test_the_model_is_unchanged_after_every_method(models):
    before = copy.deepcopy(models["main"].state_dict())
    x = sample_noise(range(2), (2, 8, 8))
    t, y = torch.full((2,), 0.5), torch.tensor([1, 2])
    plain = models["main"](x, t, y)
    for cfg in METHODS.values():
        sampler(models, cfg).sample_indices(range(2), [1, 2])
    after = models["main"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in models["main"].modules())
    assert torch.equal(models["main"](x, t, y), plain)


def test_no_guidance_is_the_plain_euler_sampler(models):
    model = models["main"]
    noise = sample_noise(range(3), (2, 8, 8))
    y = torch.tensor(LABELS)
    plain = euler(lambda x, t: model(x, t, y), noise, steps=STEPS)
    guided = sampler(models, METHODS["none"]).sample(noise, LABELS)
    torch.testing.assert_close(guided, plain, atol=1e-6, rtol=1e-6)


def _run(models, cfg, **kw):
    return sampler(models, cfg, **kw).sample_indices(range(3), LABELS, base_seed=1)


@pytest.mark.parametrize(
    ("neutral", "reference"),
    [
        # ERG on CFG's null-class negative (erg_null): tau = 1 or kappa = 1 is CFG
        ({"method": "erg", "scale": 2.0, "condition": "null", "image": {"layers": LAYERS, "tau": 1.0}}, "cfg"),
        ({"method": "erg", "scale": 2.0, "condition": "null", "image": {"layers": LAYERS, "kappa": 1.0}}, "cfg"),
        ({"method": "erg", "scale": 1.0, "image": {"layers": LAYERS}}, "none"),  # w = 1
        ({"method": "sag", "scale": 2.0, "sag_scale": 0.0, "layers": LAYERS}, "cfg"),  # its extra forward comes after
        ({"method": "cfg", "scale": 2.0, "cads": {"tau1": 1.0, "tau2": 1.0, "rescale": False}}, "cfg"),  # gamma = 1
        ({"method": "cfg", "scale": 1.0}, "none"),
    ],
)
def test_neutral_settings_reduce_exactly(models, neutral, reference):
    """The same rows in the same forwards as the reference: bit for bit."""
    assert torch.equal(_run(models, neutral), _run(models, METHODS[reference]))


@pytest.mark.parametrize(
    "neutral",
    [
        {"method": "pag", "scale": 2.0, "pag_scale": 0.0, "layers": LAYERS},
        {"method": "seg", "scale": 2.0, "seg_scale": 0.0, "layers": LAYERS},
    ],
    ids=["pag", "seg"],
)
def test_a_zero_perturbation_term_is_cfg(models, neutral):
    """PAG / SEG with scale 0 are CFG. One forward per branch runs exactly CFG's forwards (bit for bit);
    batched, the pos / neg rows share a forward with the perturbed rows (3B rows instead of CFG's 2B),
    which CPU BLAS need not round alike, so that path is compared to float rounding."""
    exact = _run(models, neutral, batch_branches=False)
    assert torch.equal(exact, _run(models, METHODS["cfg"], batch_branches=False))
    torch.testing.assert_close(_run(models, neutral), _run(models, METHODS["cfg"]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("neutral", "reference"),
    [
        ({"method": "cfg", "scale": 2.0, "apg": {"momentum": 0.0, "eta": 1.0, "norm_threshold": 0.0}}, "cfg"),
        ({"method": "erg", "scale": 2.0, "condition": "cond", "image": {"layers": LAYERS, "kappa": 1.0}}, "none"),
        # ERG (eq. (10)): on a class model its negative is the class itself, so tau = 1 / kappa = 1 / C-ERG
        # alone (nothing to rectify) is no guidance (up to rounding: pos and neg rows of one batched forward)
        ({"method": "erg", "scale": 2.0, "image": {"layers": LAYERS, "tau": 1.0, "kappa": -1}}, "none"),
        ({"method": "erg", "scale": 2.0, "image": {"layers": LAYERS, "kappa": 1.0}}, "none"),
        ({"method": "erg", "scale": 2.0, "image": None}, "none"),
        ({"method": "cfg", "scale": 2.0, "cads": {"tau1": 1.0, "tau2": 1.0, "psi": 1.0}}, "cfg"),
    ],
)
def test_neutral_settings_reduce_up_to_rounding(models, neutral, reference):
    torch.testing.assert_close(_run(models, neutral), _run(models, METHODS[reference]), atol=1e-5, rtol=1e-5)


def test_autoguidance_with_the_main_model_as_weak_is_no_guidance(models):
    same = {"main": models["main"], "weak": models["main"]}
    assert torch.equal(_run(same, METHODS["autoguidance"]), _run(same, METHODS["none"]))
    assert not torch.allclose(_run(models, METHODS["autoguidance"]), _run(models, METHODS["none"]))


class PlanSpy(torch.nn.Module):
    """Delegates to a DiT and records, per call, the times and the rectifiers of the plan."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []
        self.num_attention_layers = model.num_attention_layers
        self.in_channels, self.input_size = model.in_channels, model.input_size

    def forward(self, x, t, plan=None, **inputs):
        rules = [(type(r.rectifier).__name__, r.rows, r.layers) for r in plan.rules] if plan else []
        self.calls.append((float(t[0]), rules))
        return self.model(x, t, plan=plan, **inputs)


def test_kickoff_rectifies_exactly_when_t_is_above_kappa(models):
    spy = PlanSpy(models["main"])
    cfg = {"method": "erg", "scale": 2.0, "image": {"layers": LAYERS, "kappa": 0.3}}
    s = GuidedSampler(build_guidance(cfg), {"main": spy}, {"main": sampler(models, cfg).conditionings["main"]},
                      SamplerConfig(steps=10))  # fmt: skip
    s.sample_indices(range(2), [0, 1])
    assert [t for t, _ in spy.calls] == pytest.approx([i / 10 for i in range(10)])
    for i, (_, rules) in enumerate(spy.calls):
        if i / 10 > 0.3:  # t = 0.3 itself is not rectified
            assert rules == [("Temperature", slice(2, 4), frozenset({1, 2}))]  # the negative rows only
        else:
            assert rules == []
    assert len(spy.calls) == 10  # one forward per step: pos and neg rows together


def test_erg_cads_before_the_kickoff_is_the_conditional_prediction_on_the_noised_class(models):
    """ERG + CADS on a class model (erg_cads.yaml: both branches noised): ERG's negative is the class itself, so
    before the kickoff (no I-ERG) neg must see the same CADS-noised class as pos and the guidance term vanish.
    Noising pos alone (or each branch with its own noise) would guide away from the class there."""
    cads = {"noise_scale": 0.5, "branch": "both"}  # 10 steps: CADS is active for t < 0.4 (s > tau1 = 0.6)
    erg_cads = {"method": "erg", "scale": 3.0, "image": {"layers": LAYERS, "kappa": 0.5}, "cads": cads}
    seen = []
    s = GuidedSampler(build_guidance(erg_cads), models, config=SamplerConfig(steps=10))
    s.sample_indices(range(2), [0, 3], on_step=lambda step, v: seen.append((step.time, dict(step.preds), v)))
    noised = [t for t, _, _ in seen if t <= 0.5 and 0.0 < s.guidance.branch("pos").condition.noise.gamma(t) < 1.0]
    assert noised  # the comparison below covers steps where the class is noised
    for t, preds, v in seen:
        if t <= 0.5:  # t <= kappa: I-ERG off
            torch.testing.assert_close(preds["neg"], preds["pos"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v, preds["pos"], atol=1e-5, rtol=1e-5)
        else:  # after the kickoff the rectified attention makes the difference
            assert not torch.allclose(preds["neg"], preds["pos"], atol=1e-3)
    # never kicked off, ERG + CADS is the unguided sampler on the CADS-noised class, step for step
    never = {**erg_cads, "image": {"layers": LAYERS, "kappa": 1.0}}
    plain = {"method": "none", "cads": {"noise_scale": 0.5}}
    run = {k: GuidedSampler(build_guidance(c), models, config=SamplerConfig(steps=10)).sample_indices(range(2), [0, 3])
           for k, c in (("erg_cads", never), ("cads_pos", plain))}  # fmt: skip
    torch.testing.assert_close(run["erg_cads"], run["cads_pos"], atol=1e-5, rtol=1e-5)


def test_the_erg_cads_configs_noise_both_branches_on_class_models_and_pos_on_text_models():
    from models.generation import validate
    from tests.conftest import compose

    def cads(*overrides):
        return validate(compose("sample", list(overrides)))["guidance"]["cads"]["branch"]

    assert cads("guidance=erg_cads", "checkpoint=x.ckpt") == "both"
    assert cads("guidance=erg_cads", "model=sit_xl2", "model.checkpoint=x.pt") == "both"
    assert cads("guidance=erg_mmdit_cads", "checkpoint=x.ckpt") == "pos"  # appendix D, C-ERG's negative
    assert cads("guidance=erg_cads", "model=sd3_medium") == "pos"


def test_layers_outside_the_model_are_an_error_before_sampling(models):
    with pytest.raises(ValueError, match=r"guidance\.image\.layers=\[12, 15\] but the main model has 4 attention"):
        sampler(models, {"method": "erg", "image": {}})
    with pytest.raises(ValueError, match=r"guidance\.layers=\[3, 6\]"):
        sampler(models, {"method": "sag", "layers": [3, 6]})
    with pytest.raises(ValueError, match="needs a 'weak' model"):
        GuidedSampler(build_guidance(METHODS["autoguidance"]), {"main": models["main"]})


def test_dit_channel_quirk_guides_only_the_first_channels(models):
    noise = sample_noise(range(2), (2, 8, 8))
    captured = {}

    def grab(step, v):
        captured.setdefault("first", (dict(step.preds), v))

    cfg = {**METHODS["cfg"], "guided_channels": 1}
    sampler(models, cfg).sample(noise, [0, 1], on_step=grab)
    preds, v = captured["first"]
    torch.testing.assert_close(v[:, :1], preds["pos"][:, :1] + (preds["pos"][:, :1] - preds["neg"][:, :1]))
    assert torch.equal(v[:, 1:], preds["pos"][:, 1:])


def test_erg_uses_the_fused_temperature_path(models):
    """K = 1, alpha = gamma = 1 is a logit scale: the seam folds it into the queries (one SDPA call)."""
    g = build_guidance(METHODS["i_erg"])
    assert g.branch("neg").perturbation.rectifier.query_scale() == pytest.approx(0.01)
    assert Temperature(0.01, gamma=1.5).query_scale() is None


def test_bad_conditions_are_clear(models):
    s = sampler(models, METHODS["cfg"])
    with pytest.raises(ValueError, match="2 conditions for 3 noises"):
        s.sample(sample_noise(range(3), (2, 8, 8)), [0, 1])
    with pytest.raises(ValueError, match=r"class labels must be a 1D list of ids in \[0, 5\)"):
        s.sample_indices(range(2), [0, 7])
    with pytest.raises(ValueError, match="class-conditional"):
        s.sample_indices(range(2), None)


def test_training_grids_use_the_shared_cfg(models):
    """models/callbacks.SampleGrid samples through the shared sampler; CFG written out by hand here."""
    from models.callbacks import SampleGrid

    class Module:
        ema = models["main"]

    images = SampleGrid(out_dir="unused", steps=3, per_class=2, max_classes=3, guidance_scale=2.5).sample(Module())
    model = models["main"]
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    null = torch.full_like(y, model.null_class)

    def cfg_velocity(x, t):
        cond, uncond = model(x, t, y), model(x, t, null)
        return uncond + 2.5 * (cond - uncond)

    expected = euler(cfg_velocity, sample_noise(range(6), (2, 8, 8)), steps=3)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=1e-5)


def test_class_embedding_input_is_the_label_path(models):
    model = models["main"]
    x, t, y = sample_noise(range(3), (2, 8, 8)), torch.full((3,), 0.3), torch.tensor([0, 4, 5])
    assert torch.equal(model(x, t, y), model(x, t, class_embedding=model.y_embedder(y)))
    with pytest.raises(ValueError, match="either labels y or class_embedding"):
        model(x, t, y, class_embedding=model.y_embedder(y))
