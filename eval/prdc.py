"""Precision / recall (Kynkäänniemi et al. 2019) and density / coverage (Naeem et al. 2020) with k nearest
neighbours, computed in memory-bounded blocks so that 50k x 50k feature sets fit on one GPU (or a CPU).

Definitions (REFERENCE.md; identical to the `prdc` package that EvalGIM, the paper's evaluator, calls):
  radius r_i of real i     = distance to its k-th nearest real neighbour, itself excluded
  precision                = share of fakes f with d(f, real_i) < r_i for some i
  recall                   = share of reals i with d(real_i, f) < R_f for some fake f
                             (R_f = distance of f to its k-th nearest fake, itself excluded)
  density                  = 1/(k * #fakes) * sum_f #{i : d(f, real_i) < r_i}
  coverage                 = share of reals i whose nearest fake lies at distance < r_i
Comparisons are strict (`<`), as in `prdc` / EvalGIM.

Blocking: a running k-smallest (top-k of [current best, new block]) gives the radii exactly; one pass
over (fake block, real block) pairs accumulates the four counts. Peak memory is a few
chunk_size x chunk_size distance blocks, whatever the set sizes. We write this ourselves because the
public implementations build the full N x M distance matrix (sklearn `pairwise_distances`), which at
50k x 50k needs 10 GB per matrix and three of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

__all__ = ["PRDC", "compute_prdc", "kth_neighbour_distances"]


@dataclass
class PRDC:
    precision: float
    recall: float
    density: float
    coverage: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _distances(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances (|a|, |b|) via one GEMM; clamped at 0 before the root."""
    d2 = a.square().sum(1, keepdim=True) + b.square().sum(1)[None, :] - 2.0 * (a @ b.T)
    return d2.clamp_min_(0).sqrt_()


def kth_neighbour_distances(x: Tensor, k: int, chunk_size: int = 8192) -> Tensor:
    """(N,) distance of every row of x to its k-th nearest other row (itself excluded)."""
    n = len(x)
    if not 1 <= k < n:
        raise ValueError(f"k nearest neighbours need 1 <= k < number of points, got k={k} with {n} points")
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    for i in range(0, n, chunk_size):
        rows = x[i : i + chunk_size]
        best = torch.full((len(rows), k), float("inf"), dtype=x.dtype, device=x.device)
        for j in range(0, n, chunk_size):
            d = _distances(rows, x[j : j + chunk_size])  # (b_i, b_j)
            lo, hi = max(i, j), min(i + len(rows), j + d.shape[1])
            if lo < hi:  # this block holds the rows' own points: exclude them
                idx = torch.arange(lo, hi, device=x.device)
                d[idx - i, idx - j] = float("inf")
            best = torch.cat([best, d], dim=1).topk(k, dim=1, largest=False).values
        out[i : i + len(rows)] = best[:, k - 1]
    return out


@torch.no_grad()
def compute_prdc(
    real: Tensor,
    fake: Tensor,
    k: int = 3,
    chunk_size: int = 8192,
    real_radii: Tensor | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> PRDC:
    """PRDC of fake (M, D) features against real (N, D) features. `real_radii` (N,) may come from a cache
    (it depends on the real set and k only)."""
    device = torch.device(device) if device is not None else real.device
    real, fake = real.to(device, dtype), fake.to(device, dtype)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"features must be (N, D) and (M, D) with the same D, got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    if real_radii is None:
        real_radii = kth_neighbour_distances(real, k, chunk_size)
    else:
        real_radii = real_radii.to(device, dtype)
        if real_radii.shape != (len(real),):
            raise ValueError(f"real_radii must have shape ({len(real)},), got {tuple(real_radii.shape)}")
    fake_radii = kth_neighbour_distances(fake, k, chunk_size)

    n_real, n_fake = len(real), len(fake)
    inside_count = torch.zeros(n_fake, dtype=torch.int64, device=device)  # real balls containing each fake
    real_recalled = torch.zeros(n_real, dtype=torch.bool, device=device)  # real inside some fake ball
    nearest_fake = torch.full((n_real,), float("inf"), dtype=dtype, device=device)
    for i in range(0, n_fake, chunk_size):
        f, f_radii = fake[i : i + chunk_size], fake_radii[i : i + chunk_size]
        for j in range(0, n_real, chunk_size):
            d = _distances(f, real[j : j + chunk_size])  # (b_fake, b_real)
            inside_count[i : i + len(f)] += (d < real_radii[None, j : j + d.shape[1]]).sum(1)
            real_recalled[j : j + d.shape[1]] |= (d < f_radii[:, None]).any(0)
            nearest_fake[j : j + d.shape[1]] = torch.minimum(nearest_fake[j : j + d.shape[1]], d.min(0).values)

    return PRDC(
        precision=(inside_count > 0).double().mean().item(),
        recall=real_recalled.double().mean().item(),
        density=inside_count.double().sum().item() / (k * n_fake),
        coverage=(nearest_fake < real_radii).double().mean().item(),
    )
