"""Paired noise and the plain Euler sampler.

Per-sample seeds (as in EDM2): sample i's initial noise depends only on (base_seed, i), whatever
the batch size, device, world size or guidance method, so methods are compared on the same noises.
The noise is drawn on the CPU, so a CPU and a GPU run start from identical tensors.

`euler` integrates dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data). The guidance sampler builds
its velocity function from a guidance method; training's sample grids use plain (or CFG) velocities.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from erg.flow import time_grid

__all__ = ["euler", "sample_noise", "sample_seed"]

VelocityFn = Callable[[Tensor, Tensor], Tensor]


def sample_seed(base_seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample `index` of a run seeded with `base_seed`."""
    if base_seed < 0 or index < 0:
        raise ValueError(f"seeds and sample indices must be >= 0, got ({base_seed}, {index})")
    return int(np.random.SeedSequence([base_seed, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def sample_noise(
    indices: Sequence[int] | Tensor,
    shape: Sequence[int],
    base_seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Initial noise for the given sample indices: (len(indices), *shape), row i from seed (base_seed, i)."""
    if isinstance(indices, Tensor):
        indices = indices.tolist()
    rows = [
        torch.randn(tuple(shape), generator=torch.Generator().manual_seed(sample_seed(base_seed, int(i))))
        for i in indices
    ]
    return torch.stack(rows).to(device=device, dtype=dtype)


@torch.no_grad()
def euler(
    velocity: VelocityFn,
    noise: Tensor,
    steps: int = 50,
    shift: float = 1.0,
    on_step: Callable[[int, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """Euler integration of the flow ODE from t = 0 to t = 1: x <- x + (t_{i+1} - t_i) v(x, t_i).

    `on_step(i, t, x)` is called after each step (analyses, progress bars).
    """
    ts = time_grid(steps, shift, device=noise.device)
    x = noise
    for i in range(steps):
        t = ts[i].expand(x.shape[0])
        x = x + (ts[i + 1] - ts[i]) * velocity(x, t)
        if on_step is not None:
            on_step(i, ts[i + 1], x)
    return x
