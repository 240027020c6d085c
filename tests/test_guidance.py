"""Guidance methods: combine rules and schedules against hand-computed numbers, config validation,
composition (ERG + APG, ERG + CADS reuse ERG's branches)."""

from __future__ import annotations

import math

import pytest
import torch

from erg.attention import AttentionMaps, Capture, Site, Temperature
from erg.flow import from_diffusion_time
from erg.guidance import GuidanceConfigError, build_guidance
from erg.guidance.apg import APG, apg_update
from erg.guidance.base import NULL, RECTIFIED, Guidance, Linear, Step, Term
from erg.guidance.cads import CADS
from erg.guidance.sag import SAGDegrade


def step_with(preds: dict[str, torch.Tensor], t: float = 0.0, x: torch.Tensor | None = None) -> Step:
    like = next(iter(preds.values()))
    x = torch.zeros_like(like) if x is None else x
    return Step(0, t, torch.full((like.shape[0],), t, dtype=like.dtype), x, dict(preds))


def const(value: float, shape=(1, 1, 1, 2)) -> torch.Tensor:
    return torch.full(shape, value, dtype=torch.float64)


# --- linear combinations -------------------------------------------------------------------------
def test_cfg_and_erg_are_eq_10():
    pos, neg = const(1.0), const(0.5)
    for cfg in ({"method": "cfg", "scale": 3.0}, {"method": "erg", "scale": 3.0, "image": {}}):
        g = build_guidance(cfg)
        out = g.combine(step_with({"pos": pos, "neg": neg}), {})
        torch.testing.assert_close(out, 3.0 * pos + (1 - 3.0) * neg)  # w D + (1 - w) D^xi
        assert out[0, 0, 0, 0].item() == pytest.approx(2.0)


@pytest.mark.parametrize("method", ["pag", "seg"])
def test_pag_and_seg_add_a_perturbation_term(method):
    g = build_guidance({"method": method, "scale": 2.0, f"{method}_scale": 3.0})
    assert [b.name for b in g.branches] == ["pos", "neg", "perturbed"] and g.nfe == 3
    pos, neg, ptb = const(1.0), const(0.25), const(0.5)
    out = g.combine(step_with({"pos": pos, "neg": neg, "perturbed": ptb}), {})
    # neg + w (pos - neg) + s (pos - perturbed) = 0.25 + 2 * 0.75 + 3 * 0.5
    assert out[0, 0, 0, 0].item() == pytest.approx(3.25)
    alone = build_guidance({"method": method, "scale": 1.0, f"{method}_scale": 3.0})
    assert [b.name for b in alone.branches] == ["pos", "perturbed"]
    out = alone.combine(step_with({"pos": pos, "perturbed": ptb}), {})
    assert out[0, 0, 0, 0].item() == pytest.approx(1.0 + 3.0 * 0.5)  # pos + s (pos - perturbed)


def test_autoguidance_guides_with_the_weak_model():
    g = build_guidance({"method": "autoguidance", "scale": 2.5, "checkpoint": "weak.ckpt"})
    assert [(b.name, b.model) for b in g.branches] == [("pos", "main"), ("weak", "weak")]
    out = g.combine(step_with({"pos": const(1.0), "weak": const(0.6)}), {})
    assert out[0, 0, 0, 0].item() == pytest.approx(0.6 + 2.5 * 0.4)  # weak + w (pos - weak)


def test_sag_combines_against_the_degraded_source():
    g = build_guidance({"method": "sag", "scale": 2.0, "sag_scale": 0.5})
    names = {b.name: b for b in g.branches}
    assert names["neg"].capture == frozenset({12, 13, 14}) and names["degraded"].stage == 1
    assert names["degraded"].condition.kind == NULL  # evaluated with the source's (null) condition
    out = g.combine(step_with({"pos": const(1.0), "neg": const(0.5), "degraded": const(0.25)}), {})
    assert out[0, 0, 0, 0].item() == pytest.approx(1.0 + 1.0 * 0.5 + 0.5 * 0.25)
    alone = build_guidance({"method": "sag"})
    assert [b.name for b in alone.branches] == ["pos", "degraded"] and alone.branch("pos").capture


# --- APG -----------------------------------------------------------------------------------------
def test_apg_update_by_hand():
    pos = torch.tensor([[[[1.0, 0.0]]]])  # direction of the positive prediction
    diff = torch.tensor([[[[3.0, 4.0]]]])  # parallel (3, 0), orthogonal (0, 4), norm 5
    torch.testing.assert_close(apg_update(diff, pos, eta=0.0, norm_threshold=0.0), torch.tensor([[[[0.0, 4.0]]]]))
    torch.testing.assert_close(apg_update(diff, pos, eta=0.5, norm_threshold=0.0), torch.tensor([[[[1.5, 4.0]]]]))
    # r = 2.5 halves the difference first
    torch.testing.assert_close(apg_update(diff, pos, eta=0.0, norm_threshold=2.5), torch.tensor([[[[0.0, 2.0]]]]))
    # below the threshold nothing is rescaled; norms are per sample
    both = apg_update(torch.cat([diff, diff / 10]), torch.cat([pos, pos]), eta=1.0, norm_threshold=1.0)
    torch.testing.assert_close(both, torch.tensor([[[[0.6, 0.8]]], [[[0.3, 0.4]]]]))


def test_apg_on_x0_with_momentum_reset_per_run():
    apg = APG(scale=3.0, momentum=-0.5, eta=1.0, norm_threshold=0.0)
    x = const(0.2)
    t = 0.5  # x0 = x + (1 - t) v
    d1 = {"pos": const(1.0), "neg": const(0.0)}
    d2 = {"pos": const(2.0), "neg": const(1.5)}
    state = apg.new_state()
    out1 = apg(step_with(d1, t, x), state)
    out2 = apg(step_with(d2, t, x), state)
    # x0 differences: 0.5 * (v_pos - v_neg): 0.5, then 0.25; running = 0.25 + (-0.5) * 0.5 = 0
    x0_pos2 = 0.2 + 0.5 * 2.0
    expected2 = (x0_pos2 + 2.0 * 0.0 - 0.2) / 0.5
    assert out2[0, 0, 0, 0].item() == pytest.approx(expected2)
    assert out1[0, 0, 0, 0].item() == pytest.approx(((0.2 + 0.5) + 2.0 * 0.5 - 0.2) / 0.5)
    fresh = apg(step_with(d2, t, x), apg.new_state())  # a new run starts without momentum
    assert fresh[0, 0, 0, 0].item() == pytest.approx(((0.2 + 1.0) + 2.0 * 0.25 - 0.2) / 0.5)


def test_apg_defaults_are_the_papers_and_it_composes_with_erg():
    erg = build_guidance({"method": "erg", "image": {}})
    erg_apg = build_guidance({"method": "erg", "image": {}, "apg": {}})
    assert erg.branches == erg_apg.branches  # same branches: ERG's negative, APG's combination
    assert isinstance(erg_apg.combine, APG) and isinstance(erg.combine, Linear)
    apg = erg_apg.combine
    assert (apg.momentum, apg.eta, apg.norm_threshold, apg.scale) == (-0.5, 0.0, 5.0, 3.0)
    with pytest.raises(GuidanceConfigError, match="'pos' and 'neg'"):
        build_guidance({"method": "pag", "apg": {}})


# --- CADS ----------------------------------------------------------------------------------------
def test_cads_schedule_in_our_time():
    cads = CADS(tau1=0.6, tau2=0.9)
    # diffusion time s = 1 - t: pure noise for s >= 0.9, clean for s <= 0.6, linear in between
    for t, gamma in [(0.0, 0.0), (0.1, 0.0), (0.25, 0.5), (0.4, 1.0), (0.9, 1.0), (1.0, 1.0)]:
        assert cads.gamma(t) == pytest.approx(gamma), t
    assert from_diffusion_time(0.9) == pytest.approx(0.1)
    step = CADS(tau1=0.5, tau2=0.5)  # a step function at s = 0.5
    assert step.gamma(0.49) == 0.0 and step.gamma(0.5) == 1.0


def test_cads_noise_and_rescale_by_hand():
    g = torch.Generator().manual_seed(0)
    y, n = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64)
    cads = CADS(tau1=0.6, tau2=0.9, noise_scale=0.5, rescale=False)
    t = 0.175  # gamma = 0.25
    torch.testing.assert_close(cads(y, t, n), 0.5 * y + 0.5 * math.sqrt(0.75) * n)
    rescaled = CADS(tau1=0.6, tau2=0.9, noise_scale=0.5, psi=1.0)(y, t, n)
    torch.testing.assert_close(rescaled.mean(1), y.mean(1))  # per sample: y's mean and std
    torch.testing.assert_close(rescaled.std(1), y.std(1))
    mixed = CADS(tau1=0.6, tau2=0.9, noise_scale=0.5, psi=0.3)(y, t, n)
    torch.testing.assert_close(mixed, 0.3 * rescaled + 0.7 * (0.5 * y + 0.5 * math.sqrt(0.75) * n))


def test_cads_composes_with_erg_on_the_positive_branch():
    g = build_guidance({"method": "erg", "image": {}, "cads": {"noise_scale": 0.5}})
    assert isinstance(g.branch("pos").condition.noise, CADS) and g.branch("neg").condition.noise is None
    assert g.branch("neg").condition.kind == RECTIFIED and isinstance(g.combine, Linear)
    both = build_guidance({"method": "cfg", "cads": {"branch": "both"}})
    assert both.branch("neg").condition.noise is not None


# --- SAG's degraded input ------------------------------------------------------------------------
def test_sag_mask_and_degraded_input():
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    v = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    maps = AttentionMaps()
    attn = torch.full((2, 4, 4), 0.05)  # a 2x2 token grid; token 1 gets most attention
    attn[:, :, 1] = 0.85
    maps.record(Site(layer=0, grid=(2, 2)), attn.unsqueeze(1))
    t = 0.4
    step = Step(0, t, torch.full((2,), t), x, {"pos": v}, {"pos": maps})
    degrade = SAGDegrade("pos", (0,), blur_sigma=1.0, blur_kernel=3, threshold=1.0)
    mask = degrade.mask(step)
    expected = torch.zeros(2, 1, 4, 4)
    expected[:, :, :2, 2:] = 1  # token 1 = top-right 2x2 patch of the image
    assert torch.equal(mask, expected)
    x_deg = degrade(step)
    x0, eps = x + (1 - t) * v, x - t * v
    from erg.blur import gaussian_blur_2d

    blurred = gaussian_blur_2d(x0, 1.0, 3)
    torch.testing.assert_close(x_deg, t * (blurred * expected + x0 * (1 - expected)) + (1 - t) * eps)
    nothing = SAGDegrade("pos", (0,), threshold=10.0)(step)  # empty mask: re-noising gives back x_t
    torch.testing.assert_close(nothing, x)


def test_sag_refuses_an_attention_map_above_max_map_gb_before_allocating_it():
    """Wan 2.1 at 480 x 832, 81 frames: 12 heads x 32,760 tokens, about 51 GB of float32 map per row and layer.
    On the meta device nothing is computed: the refusal comes before any allocation."""

    def limit(cfg):
        return next(b for b in build_guidance({"method": "sag", **cfg}).branches if b.capture).capture_max_gb

    capture = limit({})
    assert capture == 16.0  # the default
    q = torch.empty(1, 12, 32760, 128, device="meta")
    refused = r"layer 3 needs 51\.5 GB .*guidance\.max_map_gb=16: lower model\.height"
    with pytest.raises(GuidanceConfigError, match=refused):
        Capture(AttentionMaps(), max_gb=capture)(q, q, q, Site(layer=3, grid=(21, 30, 52)))
    small = torch.randn(1, 2, 4, 8)
    maps = AttentionMaps()
    Capture(maps, max_gb=capture)(small, small, small, Site(layer=0, grid=(2, 2)))  # a small map: recorded
    assert maps.image_to_image(0).shape == (1, 4, 4)
    with pytest.raises(GuidanceConfigError, match=r"guidance\.max_map_gb must be > 0"):
        build_guidance({"method": "sag", "max_map_gb": 0})
    assert limit({"max_map_gb": None}) is None


# --- config validation ---------------------------------------------------------------------------
def test_configs_fail_early_and_say_how_to_fix():
    with pytest.raises(GuidanceConfigError, match=r"guidance\.imag \(did you mean guidance\.image\?\)"):
        build_guidance({"method": "erg", "imag": {}})
    with pytest.raises(GuidanceConfigError, match=r"guidance\.image\.kapa \(did you mean guidance\.image\.kappa\?\)"):
        build_guidance({"method": "erg", "image": {"kapa": 0.3}})
    with pytest.raises(GuidanceConfigError, match=r"guidance\.image\.tau must be > 0"):
        build_guidance({"method": "erg", "image": {"tau": 0.0}})
    with pytest.raises(GuidanceConfigError, match=r"guidance\.image\.tau must be > 0"):
        build_guidance({"method": "erg", "image": {"tau": -1}})
    with pytest.raises(GuidanceConfigError, match=r"guidance\.image\.layers=\[15, 12\] needs 0 <= l_min < l_max"):
        build_guidance({"method": "erg", "image": {"layers": [15, 12]}})
    with pytest.raises(GuidanceConfigError, match=r"guidance\.layers=\[3, 3\] needs"):
        build_guidance({"method": "pag", "layers": [3, 3]})
    with pytest.raises(GuidanceConfigError, match=r"guidance\.text\.tau must be > 0"):
        build_guidance({"method": "erg", "text": {"tau": 0, "layers": {"t5": [0, 24]}}})
    with pytest.raises(GuidanceConfigError, match="needs guidance.condition=c_erg"):
        build_guidance({"method": "erg", "condition": "cond", "text": {"layers": {"t5": [0, 24]}}})
    with pytest.raises(GuidanceConfigError, match="guidance.method must be one of"):
        build_guidance({"method": "ergg"})
    with pytest.raises(GuidanceConfigError, match="tau1 <= tau2"):
        build_guidance({"method": "cfg", "cads": {"tau1": 0.9, "tau2": 0.6}})
    with pytest.raises(GuidanceConfigError, match=r"guidance\.cads\.noise \(did you mean guidance\.cads\.noise_scale"):
        build_guidance({"method": "cfg", "cads": {"noise": 0.5}})
    with pytest.raises(GuidanceConfigError, match="guidance.checkpoint must name the weak model"):
        build_guidance({"method": "autoguidance"})
    with pytest.raises(GuidanceConfigError, match="kappa must be in"):
        build_guidance({"method": "erg", "image": {"kappa": 30}})
    with pytest.raises(GuidanceConfigError, match=r"guidance\.image\.update must be one of algorithm1, listing2"):
        build_guidance({"method": "erg", "image": {"update": "listing"}})
    with pytest.raises(GuidanceConfigError, match=r"steps \(K\) must be an integer"):
        build_guidance({"method": "erg", "image": {"steps": 0}})


def test_guided_channels_and_names():
    g = build_guidance({"method": "cfg", "name": "cfg_dit_quirk", "guided_channels": 3})
    assert g.name == "cfg_dit_quirk" and g.guided_channels == 3
    with pytest.raises(GuidanceConfigError, match="guided_channels"):
        build_guidance({"method": "cfg", "guided_channels": 0})
    with pytest.raises(ValueError, match="reads branches"):
        Guidance("broken", (build_guidance({"method": "none"}).branches), Linear((Term(1.0, "pos", "neg"),)))


def test_erg_kickoff_window_is_t_greater_than_kappa():
    p = build_guidance({"method": "erg", "image": {"kappa": 0.3, "tau": 0.05}}).branch("neg").perturbation
    assert p.rectifier == Temperature(0.05) and p.layers == frozenset({12, 13, 14})
    assert not p.window.contains(0.3) and p.window.contains(0.30000001) and not p.window.contains(0.0)
    always = build_guidance({"method": "erg", "image": {"kappa": -1}}).branch("neg").perturbation
    assert always.window.contains(0.0)


def test_erg_image_update_reaches_the_rectifier():
    """guidance.image.update picks Algorithm 1 (default) or the paper's Listing 2 (configs/guidance/erg*.yaml)."""
    default = build_guidance({"method": "erg", "image": {"gamma": 1.5}}).branch("neg").perturbation.rectifier
    listing = build_guidance({"method": "erg", "image": {"gamma": 1.5, "update": "listing2"}})
    assert default == Temperature(0.01, gamma=1.5) and default.update == "algorithm1"
    assert listing.branch("neg").perturbation.rectifier == Temperature(0.01, gamma=1.5, update="listing2")
