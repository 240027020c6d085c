"""The attention seam against hand-written references (tests the math, not the code against itself)."""

from __future__ import annotations

import math

import pytest
import torch

from erg.attention import AttentionPlan, Rule, Site, Temperature, attention


def manual_attention(q, k, v, tau: float = 1.0):
    """softmax(tau * q k^T / sqrt(d)) v written out."""
    logits = tau * (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(logits, dim=-1) @ v


def algorithm_1(q, k, v, tau, alpha, gamma, steps):
    """The paper's Algorithm 1 as a plain loop: Q <- Q - gamma (Q - alpha softmax(tau beta Q K^T) V)."""
    Q = q.clone()
    for _ in range(steps):
        Q = Q - gamma * (Q - alpha * manual_attention(Q, k, v, tau))
    return Q


def listing_2(q, k, v, image, tau, alpha, gamma, steps):
    """The paper's Listing 2 (appendix C), transcribed: `energy_based_attention` multiplies the image
    queries by tau_i, then `multistep_attention(q, k, v, step_size=gamma, steps=K, gamma=alpha)` runs on the
    concatenated queries: q_new <- q_new - step_size (q_new - gamma_listing * sdpa(q_new, k, v))."""
    q = q.clone()
    q[:, :, image] = q[:, :, image] * tau
    q_new = q.clone()
    for _ in range(steps):
        att = manual_attention(q_new, k, v)
        q_new = q_new - gamma * (q_new - alpha * att)
    return q_new


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    shape = (4, 2, 9, 8)  # (batch, heads, tokens, head_dim), a 3x3 token grid
    return tuple(torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))


def test_empty_plan_is_plain_sdpa(qkv):
    q, k, v = qkv
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    site = Site(layer=0)
    assert torch.equal(attention(q, k, v, site), plain)
    assert torch.equal(attention(q, k, v, site, AttentionPlan()), plain)
    empty_layers = AttentionPlan.single(Temperature(0.1), layers=[])
    assert not empty_layers
    assert torch.equal(attention(q, k, v, site, empty_layers), plain)


def test_temperature_on_logits_matches_manual_softmax(qkv):
    q, k, v = qkv
    plan = AttentionPlan.single(Temperature(tau=0.1), layers=[0])
    out = attention(q, k, v, Site(layer=0), plan)
    torch.testing.assert_close(out, manual_attention(q, k, v, tau=0.1))


@pytest.mark.parametrize(("alpha", "gamma", "steps"), [(1.0, 1.5, 1), (0.7, 0.5, 1), (1.0, 0.1, 10), (1.3, 1.0, 3)])
def test_energy_steps_match_algorithm_1(qkv, alpha, gamma, steps):
    q, k, v = qkv
    rect = Temperature(tau=0.3, alpha=alpha, gamma=gamma, steps=steps)
    assert rect.query_scale() is None  # not a pure logit scale: the general path runs
    out = attention(q, k, v, Site(layer=2), AttentionPlan.single(rect, layers=[2]))
    torch.testing.assert_close(out, algorithm_1(q, k, v, 0.3, alpha, gamma, steps))


@pytest.mark.parametrize(("alpha", "gamma", "steps"), [(1.0, 1.5, 1), (0.7, 0.5, 1), (1.0, 0.1, 10), (1.3, 1.0, 3)])
def test_listing_2_update_matches_the_papers_listing(qkv, alpha, gamma, steps):
    q, k, v = qkv
    rect = Temperature(tau=0.3, alpha=alpha, gamma=gamma, steps=steps, update="listing2")
    out = attention(q, k, v, Site(layer=2), AttentionPlan.single(rect, layers=[2]))
    torch.testing.assert_close(out, listing_2(q, k, v, slice(None), 0.3, alpha, gamma, steps))
    # joint attention [image ; text]: Listing 2 scales the image queries only, and steps every query
    site = Site(layer=0, image=slice(0, 6), text=slice(6, 9), grid=(2, 3))
    out = attention(q, k, v, site, AttentionPlan.single(rect, layers=[0]))
    torch.testing.assert_close(out, listing_2(q, k, v, slice(0, 6), 0.3, alpha, gamma, steps))


def test_algorithm_1_and_listing_2_differ_by_the_scaled_residual_when_gamma_is_not_1(qkv):
    """Table 7's text-to-image setting (tau 0.01, gamma 1.5, K 1): Algorithm 1 keeps the residual Q, Listing 2
    the residual tau Q, the attended term is the same, so the difference is (1 - gamma)(1 - tau) Q exactly."""
    q, k, v = qkv
    site = Site(layer=0)
    alg1 = Temperature(0.01, gamma=1.5)(q, k, v, site)
    lst2 = Temperature(0.01, gamma=1.5, update="listing2")(q, k, v, site)
    torch.testing.assert_close(alg1 - lst2, (1 - 1.5) * (1 - 0.01) * q)
    assert (alg1 - lst2).abs().max() > 0.5
    # gamma = alpha = K = 1: both are the same logit temperature (and the same fused call)
    same = [Temperature(0.01, update=u) for u in ("algorithm1", "listing2")]
    assert same[0].query_scale() == same[1].query_scale() == 0.01
    torch.testing.assert_close(same[0](q, k, v, site), same[1](q, k, v, site))
    with pytest.raises(ValueError, match="update must be one of"):
        Temperature(0.01, update="listing3")


def test_one_step_gamma_one_alpha_one_is_the_logit_scale(qkv):
    q, k, v = qkv
    general = Temperature(tau=0.2, alpha=1.0, gamma=1.0, steps=1)
    out_general = general(q, k, v, Site(layer=0))
    torch.testing.assert_close(out_general, manual_attention(q, k, v, tau=0.2))


def test_tau_one_is_bit_exact(qkv):
    q, k, v = (x.float() for x in qkv)
    plain = attention(q, k, v, Site(layer=1))
    plan = AttentionPlan.single(Temperature(tau=1.0), layers=[0, 1, 2], rows=slice(2, 4))
    assert torch.equal(attention(q, k, v, Site(layer=1), plan), plain)


def test_rows_and_layers_outside_the_plan_are_untouched(qkv):
    q, k, v = (x.float() for x in qkv)
    plain = attention(q, k, v, Site(layer=3))
    for rect in (Temperature(0.05), Temperature(0.05, gamma=1.5)):  # fast path and general path
        plan = AttentionPlan.single(rect, layers=[3], rows=slice(2, 4))
        out = attention(q, k, v, Site(layer=3), plan)
        assert torch.equal(out[:2], plain[:2])
        assert not torch.allclose(out[2:], plain[2:])
        # another layer: the plan does not apply at all
        assert torch.equal(attention(q, k, v, Site(layer=4), plan), attention(q, k, v, Site(layer=4)))


def test_image_segment_only(qkv):
    """In joint attention only image-token queries are rectified; text queries keep plain attention."""
    q, k, v = qkv
    site = Site(layer=0, image=slice(0, 6))
    for rect in (Temperature(0.1), Temperature(0.1, gamma=1.5)):
        out = attention(q, k, v, site, AttentionPlan.single(rect, layers=[0]))
        plain = manual_attention(q, k, v)
        torch.testing.assert_close(out[:, :, 6:], plain[:, :, 6:])
        expected_img = algorithm_1(q[:, :, :6], k, v, 0.1, 1.0, rect.gamma, 1)
        torch.testing.assert_close(out[:, :, :6], expected_img)


def test_two_rules_in_one_layer_on_different_rows(qkv):
    q, k, v = qkv
    plan = AttentionPlan(
        (
            Rule(Temperature(0.1), frozenset([0]), slice(0, 2)),
            Rule(Temperature(3.0), frozenset([0]), slice(2, 4)),
        )
    )
    out = attention(q, k, v, Site(layer=0), plan)
    torch.testing.assert_close(out[:2], manual_attention(q[:2], k[:2], v[:2], 0.1))
    torch.testing.assert_close(out[2:], manual_attention(q[2:], k[2:], v[2:], 3.0))


def test_bad_plans_are_errors():
    with pytest.raises(ValueError, match="tau must be > 0"):
        Temperature(0.0)
    with pytest.raises(ValueError, match="tau must be > 0"):
        Temperature(-1.0)
    with pytest.raises(ValueError, match="integer >= 1"):
        Temperature(0.1, steps=0)
    with pytest.raises(ValueError, match="contiguous slice"):
        Rule(Temperature(0.1), frozenset([0]), rows=slice(0, 4, 2))
    plan = AttentionPlan.single(Temperature(0.1), layers=range(26, 30))
    with pytest.raises(ValueError, match=r"layers \[28, 29\] but the model has 28"):
        plan.validate(num_layers=28)
    with pytest.raises(ValueError, match="outside a batch"):
        AttentionPlan.single(Temperature(0.1), layers=[0], rows=slice(0, 9)).validate(4, batch_size=4)
    overlap = AttentionPlan.single(Temperature(0.1), [0], slice(0, 3)) + AttentionPlan.single(
        Temperature(2.0), [0], slice(2, 4)
    )
    with pytest.raises(ValueError, match="same batch rows"):
        overlap.validate(4, batch_size=4)


def test_text_segment_rectifies_text_queries_only(qkv):
    """Joint attention [image ; text]: a text-segment rectifier leaves the image queries' outputs as
    plain attention, and an image one the text outputs; both paths (fused, Algorithm 1)."""
    q, k, v = qkv
    site = Site(layer=0, image=slice(0, 6), text=slice(6, 9), grid=(2, 3))
    plain = manual_attention(q, k, v)
    for gamma in (1.0, 1.5):
        out = attention(q, k, v, site, AttentionPlan.single(Temperature(0.1, gamma=gamma, segment="text"), [0]))
        torch.testing.assert_close(out[:, :, :6], plain[:, :, :6])
        torch.testing.assert_close(out[:, :, 6:], algorithm_1(q[:, :, 6:], k, v, 0.1, 1.0, gamma, 1))


def test_image_and_text_rules_on_different_rows_in_one_fused_call(qkv):
    q, k, v = qkv
    site = Site(layer=0, image=slice(0, 6), text=slice(6, 9))
    plan = AttentionPlan.single(Temperature(0.1), [0], rows=slice(0, 2)) + AttentionPlan.single(
        Temperature(0.2, segment="text"), [0], rows=slice(2, 4)
    )
    out = attention(q, k, v, site, plan)
    plain = manual_attention(q, k, v)
    torch.testing.assert_close(out[:2, :, :6], manual_attention(q[:2, :, :6], k[:2], v[:2], 0.1))
    torch.testing.assert_close(out[:2, :, 6:], plain[:2, :, 6:])
    torch.testing.assert_close(out[2:, :, :6], plain[2:, :, :6])
    torch.testing.assert_close(out[2:, :, 6:], manual_attention(q[2:, :, 6:], k[2:], v[2:], 0.2))


def test_a_missing_or_unknown_segment_is_an_error(qkv):
    q, k, v = qkv
    text_plan = AttentionPlan.single(Temperature(0.1, segment="text"), [0])
    for rect in (Temperature(0.1, segment="text"), Temperature(0.1, gamma=1.5, segment="text")):
        with pytest.raises(ValueError, match="has no text tokens"):
            attention(q, k, v, Site(layer=0), AttentionPlan.single(rect, [0]))  # DiT: image tokens only
    assert text_plan  # the plan itself is fine; the layer lacks the segment
    with pytest.raises(ValueError, match="segment must be 'image' or 'text'"):
        Temperature(0.1, segment="audio")
    with pytest.raises(ValueError, match="unknown token segment"):
        Site(layer=0).segment("audio")
