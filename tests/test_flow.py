"""Flow-time conventions, paired noise and the Euler sampler on fields with known solutions."""

from __future__ import annotations

import pytest
import torch

from erg import flow
from erg.sampling import euler, sample_noise, sample_seed


def test_interpolation_endpoints_and_velocity():
    x, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert torch.equal(flow.interpolate(x, eps, torch.zeros(3)), eps)  # t = 0 is noise
    assert torch.equal(flow.interpolate(x, eps, torch.ones(3)), x)  # t = 1 is data
    t = torch.tensor([0.2, 0.5, 0.9])
    h = 1e-3
    numeric = (flow.interpolate(x, eps, t + h) - flow.interpolate(x, eps, t - h)) / (2 * h)
    torch.testing.assert_close(numeric, flow.velocity_target(x, eps), atol=1e-3, rtol=1e-3)


def test_prediction_space_conversions_recover_data_and_noise():
    x, eps = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 3, 2, 2, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.6, 0.8], dtype=torch.float64)
    x_t = flow.interpolate(x, eps, t)
    v = flow.velocity_target(x, eps)  # the exact velocity
    torch.testing.assert_close(flow.x0_from_velocity(x_t, v, t), x)
    torch.testing.assert_close(flow.eps_from_velocity(x_t, v, t), eps)
    torch.testing.assert_close(flow.velocity_from_x0(x_t, x, t), v)
    torch.testing.assert_close(flow.velocity_from_eps(x_t, eps, t), v)


def test_boundary_conventions():
    assert flow.to_diffusers_sigma(0.25) == 0.75
    v = torch.randn(3)
    assert torch.equal(flow.from_diffusers_velocity(v), -v)
    assert flow.from_diffusion_time(0.8) == pytest.approx(0.2)


def test_time_grid_and_shift():
    t = flow.time_grid(4)
    torch.testing.assert_close(t, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    shifted = flow.time_grid(4, shift=3.0)
    assert shifted[0] == 0 and shifted[-1] == 1
    # SD3 shift on sigma = 1 - t: sigma' = 3 sigma / (1 + 2 sigma); at t = 0.5, sigma' = 0.75
    assert shifted[2].item() == pytest.approx(0.25)
    assert torch.all(shifted <= t)  # shift > 1 spends more steps near the noise end
    with pytest.raises(ValueError):
        flow.time_grid(0)


def test_logit_normal_timesteps_match_their_density():
    g = torch.Generator().manual_seed(0)
    t = flow.sample_timesteps(200_000, "logit_normal", mean=0.5, std=0.8, generator=g)
    assert t.min() > 0 and t.max() < 1
    hist = torch.histc(t, bins=20, min=0, max=1) / len(t) * 20
    centers = torch.arange(20) / 20 + 1 / 40
    torch.testing.assert_close(hist, flow.logit_normal_density(centers, 0.5, 0.8), atol=0.06, rtol=0.05)
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        flow.sample_timesteps(4, "cosine")


def test_euler_is_exact_on_straight_paths():
    """For the true velocity of a single data point, x - eps is constant along the path: Euler is exact."""
    data = torch.randn(2, 1, 3, 3)
    noise = torch.randn(2, 1, 3, 3)

    def velocity(x_t, t):
        # x_t = t data + (1 - t) eps  =>  eps = (x_t - t data) / (1 - t);  v = data - eps
        tb = t.view(-1, 1, 1, 1)
        return (data - x_t) / (1 - tb)

    out = euler(velocity, noise, steps=7)
    torch.testing.assert_close(out, data, atol=1e-5, rtol=1e-5)


def test_euler_steps_and_callback():
    calls = []
    out = euler(lambda x, t: torch.ones_like(x), torch.zeros(2, 1), steps=5, on_step=lambda i, t, x: calls.append(i))
    torch.testing.assert_close(out, torch.ones(2, 1))  # integral of 1 over [0, 1]
    assert calls == [0, 1, 2, 3, 4]


def test_per_sample_noise_depends_only_on_seed_and_index():
    a = sample_noise([0, 1, 2, 3], (1, 4, 4), base_seed=7)
    b = sample_noise([2, 3], (1, 4, 4), base_seed=7)
    assert torch.equal(a[2:], b)  # batch composition does not matter
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(sample_noise([0], (1, 4, 4), base_seed=8), a[:1])
    assert sample_seed(0, 1) != sample_seed(1, 0)
    with pytest.raises(ValueError):
        sample_seed(-1, 0)
