"""The baselines' rectifiers (PAG identity, SEG smoothed energy, SAG capture) and the Gaussian blur,
each against a hand-written reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from erg.attention import (
    AttentionMaps,
    AttentionPlan,
    Capture,
    Identity,
    Rule,
    Site,
    SmoothedEnergy,
    Temperature,
    attention,
)
from erg.blur import gaussian_blur_2d, gaussian_kernel_size


def manual_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(1)
    shape = (4, 2, 12, 8)  # (batch, heads, tokens, head_dim): a 3x4 image grid
    return tuple(torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))


def joint_qkv():
    """Joint attention: 4 text tokens, then a 3x4 grid of image tokens."""
    g = torch.Generator().manual_seed(2)
    return tuple(torch.randn((3, 2, 16, 8), generator=g, dtype=torch.float64) for _ in range(3))


# --- Gaussian blur -------------------------------------------------------------------------------
# SEG's reference (SusungHong/SEG-SDXL pipeline_seg.py, and diffusers' copy): ceil(6 sigma) + 1 - ceil(6 sigma) % 2.
# It differs from "ceil(6 sigma) + 1 made odd" whenever ceil(6 sigma) is odd (0.1, 0.5, 0.8, 1.5, 2.5 below).
@pytest.mark.parametrize(
    ("sigma", "size"), [(1.0, 7), (0.5, 3), (1.2, 9), (2.0, 13), (0.1, 1), (0.8, 5), (1.5, 9), (2.5, 15), (3.0, 19)]
)
def test_kernel_size_is_segs(sigma, size):
    assert gaussian_kernel_size(sigma) == size
    assert size == math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2


def seg_reference_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """SEG's blur as its reference code defines it: kernel size from sigma, clipped to the (square) grid side
    with min(k, side - (side % 2 - 1)), a 2D kernel = outer product of the normalised 1D Gaussian sampled on
    linspace(-(k-1)/2, (k-1)/2, k), reflect padding of k // 2 on every side, one grouped conv2d."""
    c = math.ceil(6 * sigma)
    k = c + 1 - c % 2
    side = img.shape[-1]
    k = min(k, side - (side % 2 - 1))
    x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    w = w / w.sum()
    kernel = torch.outer(w, w).to(img.dtype).expand(img.shape[1], 1, k, k)
    padded = torch.nn.functional.pad(img, [k // 2] * 4, mode="reflect")
    return torch.nn.functional.conv2d(padded, kernel, groups=img.shape[1])


@pytest.mark.parametrize("side", [4, 5, 8, 16])
@pytest.mark.parametrize("sigma", [0.1, 0.5, 0.8, 1.0, 1.5, 2.5, 4.0])
def test_blur_equals_segs_reference_blur(sigma, side):
    """Our separable blur on a square token grid == SEG's 2D blur, including the clipping to small grids."""
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(side), dtype=torch.float64)
    torch.testing.assert_close(gaussian_blur_2d(x, sigma), seg_reference_blur(x, sigma), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.7, 1.0, 1.6])
def test_blur_matches_scipy_gaussian_filter(sigma):
    """scipy's filter with mode='mirror' is torch's reflect padding; same radius, same sampled kernel."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 11, 13, generator=g, dtype=torch.float64)
    radius = gaussian_kernel_size(sigma) // 2
    ours = gaussian_blur_2d(x, sigma).numpy()
    ref = np.stack(
        [[gaussian_filter(x[n, c].numpy(), sigma, mode="mirror", radius=radius) for c in range(3)] for n in range(2)]
    )
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_blur_of_a_delta_is_the_normalised_kernel_and_constants_stay():
    x = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
    x[0, 0, 4, 4] = 1.0
    out = gaussian_blur_2d(x, 1.0)[0, 0]
    offsets = torch.arange(-3, 4, dtype=torch.float64)
    w = torch.exp(-(offsets**2) / 2)
    w = w / w.sum()
    torch.testing.assert_close(out[1:8, 1:8], torch.outer(w, w))
    assert out.sum().item() == pytest.approx(1.0)
    const = torch.full((1, 2, 5, 6), 3.5, dtype=torch.float64)
    torch.testing.assert_close(gaussian_blur_2d(const, 5.0), const)  # kernel clipped to the grid


# --- PAG: identity -------------------------------------------------------------------------------
def test_identity_returns_v(qkv):
    q, k, v = qkv
    out = attention(q, k, v, Site(layer=0, grid=(3, 4)), AttentionPlan.single(Identity(), [0]))
    assert torch.equal(out, v)


def test_identity_in_joint_attention_touches_image_queries_only():
    q, k, v = joint_qkv()
    site = Site(layer=0, image=slice(4, 16), grid=(3, 4))
    out = attention(q, k, v, site, AttentionPlan.single(Identity(), [0]))
    assert torch.equal(out[:, :, 4:], v[:, :, 4:])
    torch.testing.assert_close(out[:, :, :4], manual_attention(q, k, v)[:, :, :4])


def test_identity_without_one_key_per_query_is_an_error(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="one key per query"):
        attention(q, k[:, :, :5], v[:, :, :5], Site(layer=0), AttentionPlan.single(Identity(), [0]))


# --- SEG: smoothed energy ------------------------------------------------------------------------
def test_seg_infinite_sigma_is_attention_with_the_mean_query(qkv):
    q, k, v = qkv
    out = attention(q, k, v, Site(layer=0, grid=(3, 4)), AttentionPlan.single(SmoothedEnergy(math.inf), [0]))
    q_mean = q.mean(dim=2, keepdim=True).expand_as(q)
    torch.testing.assert_close(out, manual_attention(q_mean, k, v))
    # every image token then has the same output
    torch.testing.assert_close(out, out[:, :, :1].expand_as(out))
    # 1e4 is SEG's "infinite" threshold
    assert SmoothedEnergy(1e4).is_infinite and not SmoothedEnergy(9999.0).is_infinite


def test_seg_finite_sigma_blurs_queries_on_the_grid(qkv):
    q, k, v = qkv
    sigma = 0.8
    out = attention(q, k, v, Site(layer=0, grid=(3, 4)), AttentionPlan.single(SmoothedEnergy(sigma), [0]))
    # reference: blur every (sample, head, channel) plane of the queries with scipy
    radius = gaussian_kernel_size(sigma) // 2  # 2 (kernel 5) on a 3x4 grid: clipped to 1 along H, 2 along W
    q_np = q.numpy().reshape(4, 2, 3, 4, 8)
    blurred = np.empty_like(q_np)
    for n in range(4):
        for h in range(2):
            for c in range(8):
                plane = q_np[n, h, :, :, c]
                plane = gaussian_filter(plane, sigma, mode="mirror", radius=[min(radius, 1), min(radius, 2)])
                blurred[n, h, :, :, c] = plane
    q_ref = torch.from_numpy(blurred.reshape(4, 2, 12, 8))
    torch.testing.assert_close(out, manual_attention(q_ref, k, v))


def test_seg_in_joint_attention_touches_image_queries_only():
    q, k, v = joint_qkv()
    site = Site(layer=0, image=slice(4, 16), grid=(3, 4))
    out = attention(q, k, v, site, AttentionPlan.single(SmoothedEnergy(math.inf), [0]))
    plain = manual_attention(q, k, v)
    torch.testing.assert_close(out[:, :, :4], plain[:, :, :4])
    q_img = q[:, :, 4:].mean(dim=2, keepdim=True).expand(-1, -1, 12, -1)
    torch.testing.assert_close(out[:, :, 4:], manual_attention(q_img, k, v))


def test_seg_needs_a_matching_grid(qkv):
    q, k, v = qkv
    plan = AttentionPlan.single(SmoothedEnergy(1.0), [0])
    with pytest.raises(ValueError, match="grid=None"):
        attention(q, k, v, Site(layer=0), plan)
    with pytest.raises(ValueError, match="12 image tokens but its grid is 4x4"):
        attention(q, k, v, Site(layer=0, grid=(4, 4)), plan)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        SmoothedEnergy(0.0)


# --- SAG / analyses: capture ---------------------------------------------------------------------
def test_capture_records_head_averaged_probabilities_of_its_rows(qkv):
    q, k, v = qkv
    sink = AttentionMaps()
    plan = AttentionPlan.single(Capture(sink), [2], rows=slice(1, 3))
    out = attention(q, k, v, Site(layer=2, grid=(3, 4)), plan)
    torch.testing.assert_close(out, manual_attention(q, k, v))  # the plain output
    probs = torch.softmax(q[1:3] @ k[1:3].transpose(-1, -2) / math.sqrt(8), dim=-1).mean(dim=1)
    assert sink.maps[2].shape == (2, 12, 12) and sink.maps[2].dtype == torch.float32
    torch.testing.assert_close(sink.maps[2], probs.float())
    torch.testing.assert_close(sink.maps[2].sum(-1), torch.ones(2, 12))
    with pytest.raises(KeyError, match="no attention map recorded for layer 3"):
        sink.image_to_image(3)


def test_capture_in_joint_attention_keeps_image_queries_and_image_keys_renormalised():
    q, k, v = joint_qkv()
    sink = AttentionMaps()
    site = Site(layer=0, image=slice(4, 16), grid=(3, 4))
    attention(q, k, v, site, AttentionPlan.single(Capture(sink), [0]))
    # SAG's map: each head's image-query rows restricted to the image keys (softmax over them), head-averaged
    q_img, k_img = q[:, :, 4:].float(), k[:, :, 4:].float()
    expected = torch.softmax(q_img @ k_img.transpose(-1, -2) / math.sqrt(8), dim=-1).mean(dim=1)
    assert sink.image_to_image(0).shape == (3, 12, 12)
    torch.testing.assert_close(sink.image_to_image(0), expected)


# --- seam rules for every rectifier --------------------------------------------------------------
RECTIFIERS = [
    Temperature(0.05),
    Temperature(0.05, gamma=1.5),
    Identity(),
    SmoothedEnergy(1.0),
    SmoothedEnergy(math.inf),
]


@pytest.mark.parametrize("rect", RECTIFIERS, ids=repr)
def test_rows_and_layers_outside_the_plan_are_untouched(qkv, rect):
    q, k, v = (x.float() for x in qkv)
    site = Site(layer=3, grid=(3, 4))
    plain = attention(q, k, v, site)
    plan = AttentionPlan.single(rect, layers=[3], rows=slice(2, 4))
    out = attention(q, k, v, site, plan)
    assert torch.equal(out[:2], plain[:2])
    assert not torch.allclose(out[2:], plain[2:])
    other = Site(layer=4, grid=(3, 4))
    assert torch.equal(attention(q, k, v, other, plan), attention(q, k, v, other))


@pytest.mark.parametrize("rect", RECTIFIERS, ids=repr)
def test_rectified_rows_equal_the_rectifier_alone(qkv, rect):
    """A rule on rows 2..4 of a batch gives those rows what the rectifier gives them on their own."""
    q, k, v = qkv
    site = Site(layer=0, grid=(3, 4))
    out = attention(q, k, v, site, AttentionPlan.single(rect, [0], rows=slice(2, 4)))
    alone = attention(q[2:], k[2:], v[2:], site, AttentionPlan.single(rect, [0]))
    torch.testing.assert_close(out[2:], alone)


def test_different_rectifiers_on_different_rows_of_one_layer(qkv):
    q, k, v = qkv
    site = Site(layer=0, grid=(3, 4))
    plan = AttentionPlan(
        (
            Rule(Identity(), frozenset([0]), slice(0, 1)),
            Rule(Temperature(0.1), frozenset([0]), slice(1, 2)),
            Rule(SmoothedEnergy(math.inf), frozenset([0]), slice(2, 3)),
        )
    )
    out = attention(q, k, v, site, plan)
    torch.testing.assert_close(out[0], v[0])
    torch.testing.assert_close(out[1], manual_attention(q[1] * 0.1, k[1], v[1]))
    torch.testing.assert_close(out[2], manual_attention(q[2].mean(1, keepdim=True).expand_as(q[2]), k[2], v[2]))
    torch.testing.assert_close(out[3], manual_attention(q[3], k[3], v[3]))
