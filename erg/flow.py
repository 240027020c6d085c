"""Rectified-flow conventions, written once and used everywhere.

Time t in [0, 1]: t = 0 is pure noise, t = 1 is data (the paper's and SiT's convention).

    x_t = t * x + (1 - t) * eps          velocity  v = x - eps
    x0_hat  = x_t + (1 - t) * v           (the "clean" / denoised prediction)
    eps_hat = x_t - t * v

diffusers' flow-matching scheduler uses sigma = 1 - t and predicts v_diffusers = -v: convert at
the boundary with `to_diffusers_sigma` / `from_diffusers_velocity`, never inside the math.
CADS is written in diffusion time (1 = noise): use `from_diffusion_time`; EDM's noise levels sigma
(the guidance interval's): `from_edm_sigma`.

Variance-preserving (DDPM) models such as PixArt-Sigma see x_s = a x + s eps with a = sqrt(alpha_bar),
s = sqrt(1 - alpha_bar). The same noisy image in our flow is x_t = m x_s with t = m a, 1 - t = m s, i.e.

    t = a / (a + s)        alpha_bar = t^2 / (t^2 + (1 - t)^2)        m = 1 / (a + s) = sqrt(t^2 + (1 - t)^2)

(`vp_time`, `vp_alpha_bar`, `marginal_std`: m is also the std of x_t for unit-variance data). A DDIM step
(eta = 0) re-noises the same (x0_hat, eps_hat) at the next alpha_bar, exactly as our Euler step does at the
next t, so DDIM on a grid of alpha_bars is Euler on the matching grid of t (tests/test_pixart.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "eps_from_velocity",
    "flow_match_euler_times",
    "from_diffusers_velocity",
    "from_diffusion_time",
    "from_edm_sigma",
    "interpolate",
    "marginal_std",
    "sample_timesteps",
    "shift_time",
    "time_grid",
    "to_diffusers_sigma",
    "velocity_from_eps",
    "velocity_from_vp",
    "velocity_from_x0",
    "velocity_target",
    "vp_alpha_bar",
    "vp_time",
    "x0_from_velocity",
]


def _bcast(t: Tensor | float, like: Tensor) -> Tensor | float:
    """Broadcast a per-sample time of shape (B,) against a (B, ...) tensor."""
    if isinstance(t, Tensor) and t.ndim == 1:
        return t.view(-1, *([1] * (like.ndim - 1)))
    return t


def interpolate(x: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
    """x_t = t x + (1 - t) eps."""
    t = _bcast(t, x)
    return t * x + (1 - t) * eps


def velocity_target(x: Tensor, eps: Tensor) -> Tensor:
    """d x_t / d t = x - eps."""
    return x - eps


def x0_from_velocity(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    """Denoised prediction x0_hat = x_t + (1 - t) v (paper, appendix D)."""
    return x_t + (1 - _bcast(t, x_t)) * v


def eps_from_velocity(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    """Noise prediction eps_hat = x_t - t v."""
    return x_t - _bcast(t, x_t) * v


def velocity_from_x0(x_t: Tensor, x0: Tensor, t: Tensor | float) -> Tensor:
    """Inverse of `x0_from_velocity`: v = (x0 - x_t) / (1 - t). Undefined at t = 1."""
    return (x0 - x_t) / (1 - _bcast(t, x_t))


def velocity_from_eps(x_t: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
    """Inverse of `eps_from_velocity`: v = (x_t - eps) / t. Undefined at t = 0."""
    return (x_t - eps) / _bcast(t, x_t)


def to_diffusers_sigma(t: Tensor | float) -> Tensor | float:
    """diffusers' flow-matching sigma (1 = noise) for our time t."""
    return 1 - t


def from_diffusers_velocity(v_diffusers: Tensor) -> Tensor:
    """diffusers' SD3 transformer predicts eps - x; our velocity is x - eps."""
    return -v_diffusers


def from_edm_sigma(sigma: float) -> float:
    """Our time t for the noise level sigma of EDM (Karras et al., 2022; x = y + sigma n), which the
    guidance-interval paper uses: x_t / t = x + ((1 - t) / t) eps, so sigma = (1 - t) / t and
    t = 1 / (1 + sigma) (sigma = inf: t = 0, pure noise)."""
    if not sigma >= 0:
        raise ValueError(f"an EDM noise level sigma must be >= 0, got {sigma}")
    return 0.0 if math.isinf(sigma) else 1.0 / (1.0 + sigma)


def from_diffusion_time(s: float) -> float:
    """A time in diffusion convention (s = 1 noise, as in CADS) to ours."""
    return 1.0 - s


def vp_time(alpha_bar: Tensor | float) -> Tensor | float:
    """Our t for a variance-preserving model's alpha_bar: t = a / (a + s), a = sqrt(alpha_bar), s = sqrt(1 - a^2)."""
    a, s = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    return a / (a + s)


def vp_alpha_bar(t: Tensor | float) -> Tensor | float:
    """Inverse of `vp_time`: alpha_bar = t^2 / (t^2 + (1 - t)^2) (0 at t = 0, 1 at t = 1)."""
    return t**2 / (t**2 + (1 - t) ** 2)


def marginal_std(t: Tensor | float) -> Tensor | float:
    """sqrt(t^2 + (1 - t)^2): the std of x_t for unit-variance data, and the factor m with x_t = m x_s between
    our flow state and a variance-preserving model's state at the same noise level (1 at t = 0 and t = 1)."""
    return (t**2 + (1 - t) ** 2) ** 0.5


def velocity_from_vp(x_t: Tensor, output: Tensor, t: Tensor | float, prediction: str) -> Tensor:
    """Our velocity from a variance-preserving model's output at our (x_t, t).

    prediction (diffusers' `prediction_type`): "epsilon" (the noise), "v_prediction" (v_vp = a eps - s x0,
    Salimans & Ho 2022) or "sample" (x0). The model saw x_s = x_t / m (`marginal_std`).
    """
    if prediction == "epsilon":
        return velocity_from_eps(x_t, output, t)
    if prediction == "sample":
        return velocity_from_x0(x_t, output, t)
    if prediction == "v_prediction":
        t = _bcast(t, x_t)
        m = marginal_std(t)
        a, s = t / m, (1 - t) / m
        x_s = x_t / m
        return (a - s) * x_s - (a + s) * output  # x0 - eps with x0 = a x_s - s v_vp, eps = s x_s + a v_vp
    raise ValueError(f"unknown prediction type {prediction!r}: use epsilon, v_prediction or sample")


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3's resolution shift, applied to sigma = 1 - t: sigma' = shift sigma / (1 + (shift - 1) sigma).

    shift > 1 spends more of the schedule near the noise end. shift = 1 is the identity.
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    sigma = 1 - t
    return 1 - shift * sigma / (1 + (shift - 1) * sigma)


def time_grid(
    steps: int, shift: float = 1.0, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The `steps + 1` times of an Euler integration from t = 0 (noise) to t = 1 (data).

    Uniform times are i / steps computed in float64 (correctly rounded, so t = 0.3 of a 10-step grid
    equals the number 0.3 and time windows such as ERG's t > kappa switch where one expects).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.arange(steps + 1, device=device, dtype=torch.float64) / steps
    if shift != 1.0:
        t = shift_time(t, shift)
    return t.to(dtype)


def flow_match_euler_times(
    steps: int,
    shift: float = 3.0,
    num_train_timesteps: int = 1000,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The `steps + 1` times of diffusers' `FlowMatchEulerDiscreteScheduler` (static shift), in our time.

    Stable Diffusion 3's pipelines sample on this grid (SD3-medium: shift 3.0, 28 steps): sigmas
    linear in [sigma_max, sigma_min] of the scheduler's 1000 shifted training sigmas (1 and
    shift(1/1000)), shifted once more, then a final sigma of 0. Our t = 1 - sigma. Unlike
    `time_grid(steps, shift)` (sigmas linear in [1, 0] before the shift), the last step starts at
    sigma = shift(sigma_min), not shift(1 / steps).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")

    def shifted(sigma: Tensor) -> Tensor:
        return shift * sigma / (1 + (shift - 1) * sigma)

    # The scheduler keeps its training sigmas in float32; its sigma_min is that float32 value.
    train = shifted(torch.arange(num_train_timesteps, 0, -1, dtype=torch.float32) / num_train_timesteps)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    sigmas = shifted(torch.linspace(sigma_max, sigma_min, steps, dtype=torch.float64))
    sigmas = torch.cat([sigmas.to(torch.float32).double(), torch.zeros(1, dtype=torch.float64)])
    return (1 - sigmas).to(device=device, dtype=dtype)


def sample_timesteps(
    n: int,
    kind: str = "uniform",
    *,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Training times t in (0, 1): `uniform`, or `logit_normal` (SD3: t = sigmoid(N(mean, std)))."""
    if kind == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if kind == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    raise ValueError(f"unknown timestep sampling {kind!r}: use 'uniform' or 'logit_normal'")


def logit_normal_density(t: Tensor, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """Density of the logit-normal distribution on (0, 1), for tests and plots."""
    logit = torch.log(t) - torch.log1p(-t)
    return torch.exp(-((logit - mean) ** 2) / (2 * std**2)) / (std * math.sqrt(2 * math.pi) * t * (1 - t))
