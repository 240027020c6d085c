"""The seam on a video's (frames, height, width) token grid (Wan): SEG's 3D blur and SAG's 3D mask, against
independent formulas. The Wan family itself is tested in tests/test_wan.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from erg.attention import AttentionMaps, Site, SmoothedEnergy
from erg.blur import gaussian_blur_2d, gaussian_blur_3d, gaussian_blur_frames, gaussian_kernel_1d
from erg.guidance.base import Step
from erg.guidance.sag import SAGDegrade


def test_the_3d_blur_of_a_point_is_the_outer_product_of_the_1d_kernels():
    x = torch.zeros(1, 1, 9, 11, 13, dtype=torch.float64)
    x[0, 0, 4, 5, 6] = 1.0
    k = gaussian_kernel_1d(7, 1.0, torch.float64)  # ceil(6) + 1 = 7 taps, far from every border
    expected = torch.zeros_like(x)
    expected[0, 0, 1:8, 2:9, 3:10] = k[:, None, None] * k[None, :, None] * k[None, None, :]
    torch.testing.assert_close(gaussian_blur_3d(x, 1.0), expected, rtol=0, atol=1e-15)


def test_the_3d_blur_of_a_video_constant_in_time_is_the_2d_blur_of_its_frame():
    frame = torch.randn(2, 3, 6, 7)
    video = frame[:, :, None].expand(2, 3, 5, 6, 7).contiguous()
    blurred = gaussian_blur_3d(video, 1.5)  # the time kernel sums to 1 and reflect padding keeps the constant
    for f in range(5):
        torch.testing.assert_close(blurred[:, :, f], gaussian_blur_2d(frame, 1.5), atol=1e-6, rtol=1e-6)
    per_frame = gaussian_blur_frames(torch.randn(2, 3, 4, 6, 7), 1.0)
    assert per_frame.shape == (2, 3, 4, 6, 7)
    video = torch.randn(2, 3, 4, 6, 7)
    for f in range(4):  # frame by frame: exactly the image blur of each frame
        assert torch.equal(gaussian_blur_frames(video, 1.0)[:, :, f], gaussian_blur_2d(video[:, :, f], 1.0))


def test_seg_on_a_video_grid_blurs_the_queries_in_3d_and_its_infinite_limit_is_the_mean():
    rows, heads, d, grid = 2, 2, 4, (3, 4, 5)
    n = math.prod(grid)
    q, k, v = torch.randn(rows, heads, n, d), torch.randn(rows, heads, n, d), torch.randn(rows, heads, n, d)
    site = Site(layer=0, grid=grid)
    layout = q.permute(0, 1, 3, 2).reshape(rows, heads * d, *grid)  # tokens (f, h, w) row-major
    blurred = gaussian_blur_3d(layout, 1.0).reshape(rows, heads, d, n).permute(0, 1, 3, 2)
    expected = F.scaled_dot_product_attention(blurred.contiguous(), k, v)
    torch.testing.assert_close(SmoothedEnergy(1.0)(q, k, v, site), expected)
    mean = F.scaled_dot_product_attention(q.mean(2, keepdim=True).expand_as(q).contiguous(), k, v)
    torch.testing.assert_close(SmoothedEnergy(float("inf"))(q, k, v, site), mean)
    with pytest.raises(ValueError, match="60 image tokens but its grid is 3x4x4"):
        SmoothedEnergy(1.0)(q, k, v, Site(layer=0, grid=(3, 4, 4)))
    with pytest.raises(ValueError, match="image grids \\(h, w\\) and video grids"):
        SmoothedEnergy(1.0)(q, k, v, Site(layer=0, grid=(60,)))


def test_sag_on_a_video_masks_the_3d_grid_and_blurs_x0_frame_by_frame():
    B, C, grid = 2, 3, (2, 3, 4)  # latents (B, C, 2, 6, 8): tokens are 1 x 2 x 2 patches
    n = math.prod(grid)
    probs = torch.rand(B, 1, n, n).softmax(-1)
    maps = AttentionMaps()
    maps.record(Site(layer=5, grid=grid), probs)
    x = torch.randn(B, C, 2, 6, 8)
    step = Step(0, 0.5, torch.full((B,), 0.5), x, preds={"pos": torch.randn_like(x)}, maps={"pos": maps})
    sag = SAGDegrade("pos", (5,), blur_sigma=1.0, blur_kernel=9)
    token_mask = (probs[:, 0].sum(1) > 1.0).view(B, 1, *grid).float()
    expected = token_mask.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)  # nearest upsampling in space
    assert torch.equal(sag.mask(step), expected)
    x0, eps = step.x0("pos"), step.eps("pos")
    blurred = torch.stack([gaussian_blur_2d(x0[:, :, f], 1.0, 9) for f in range(2)], dim=2)
    degraded = blurred * expected + x0 * (1 - expected)
    torch.testing.assert_close(sag(step), 0.5 * degraded + 0.5 * eps)
    image = Step(0, 0.5, torch.full((B,), 0.5), torch.randn(B, C, 6, 8), preds={"pos": torch.randn(B, C, 6, 8)},
                 maps={"pos": maps})  # fmt: skip
    with pytest.raises(ValueError, match="SAG needs the token grid"):
        sag.mask(image)
