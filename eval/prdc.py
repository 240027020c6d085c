"""Precision / recall (Kynkäänniemi et al. 2019) and density / coverage (Naeem et al. 2020) with k nearest
neighbours, computed in memory-bounded blocks so that 50k x 50k feature sets fit on one GPU (or a CPU).

Definitions (REFERENCE.md; identical to the `prdc` package that EvalGIM, the paper's evaluator, calls):
  radius r_i of real i     = distance to its k-th nearest real neighbour, itself excluded
  precision                = share of fakes f with d(f, real_i) < r_i for some i
  recall                   = share of reals i with d(real_i, f) < R_f for some fake f
                             (R_f = distance of f to its k-th nearest fake, itself excluded)
  density                  = 1/(k * #fakes) * sum_f #{i : d(f, real_i) < r_i}
  coverage                 = share of reals i whose nearest fake lies at distance < r_i
                             (= some fake lies inside real i's ball)
Comparisons are strict (`<`), as in `prdc` / EvalGIM.

Exact by default. Distances come from one GEMM per block, |a|^2 + |b|^2 - 2 a.b, in `dtype` (float32: fast),
whose rounding can flip a comparison for a pair within ~1e-7 (relative) of a radius: 1-2 neighbour counts
off in 50k x 50k (the `prdc` package, comparing float32 distances, is sometimes 1 off too). `exact=True`
decides every comparison as float64 arithmetic on the given features does: a comparison is taken from the
GEMM only when it is further from the radius than a rigorous bound on the GEMM's error (`error_bound`:
(2 gamma_{D+1} + 8u)(|a|^2 + |b|^2), the GEMM run on the features moved by the reals' mean, which
shrinks the norms), and the pairs inside that band are recomputed as float64 distances of the
differences ||a - b||. Radii are found the same way (`_exact_kth`). The GEMMs are unchanged; the extra
cost is the band's float64 pairs (2e-4 to 1e-3 of all pairs on 2048-d Gaussian features):
scripts/benchmark_eval.py times both paths. `exact=False` is the plain comparison in `dtype`.

Blocking: a running k-smallest (top-k of [current best, new block]) gives the radii; one pass over
(fake block, real block) pairs accumulates the four counts. Peak memory is a few chunk_size x
chunk_size blocks, whatever the set sizes. We write this ourselves because the public implementations
build the full N x M distance matrix (sklearn `pairwise_distances`), which at 50k x 50k needs 10 GB per
matrix and three of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

__all__ = ["CANDIDATES", "PRDC", "compute_prdc", "error_bound", "kth_neighbour_distances"]

CANDIDATES = 8  # extra nearest neighbours kept per point by the GEMM pass of the exact radii
EXACT = torch.float64
PAIR_BATCH = 4096  # pairs recomputed in float64 at a time (PAIR_BATCH x D doubles)


@dataclass
class PRDC:
    precision: float
    recall: float
    density: float
    coverage: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@contextmanager
def _ieee_matmul() -> Iterator[None]:
    """float32 matmuls in full IEEE precision (no TF32) while the error bound is relied on."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _sq_distances(a: Tensor, b: Tensor, na: Tensor | None = None, nb: Tensor | None = None) -> Tensor:
    """Squared Euclidean distances (|a|, |b|) via one GEMM, clamped at 0 (the true value is >= 0).
    na, nb: the rows' squared norms in a's dtype, when already computed."""
    na = a.square().sum(1) if na is None else na
    nb = b.square().sum(1) if nb is None else nb
    d2 = na[:, None] + nb[None, :] - 2.0 * (a @ b.T)
    return d2.clamp_min_(0)


def error_bound(dtype: torch.dtype, dim: int) -> float:
    """c such that |GEMM d2 - exact d2| <= c (|a|^2 + |b|^2) for D = `dim` features rounded to `dtype` after
    centring (a = fl(x - mu), b = fl(y - mu); exact d2 = |x - y|^2).

    With unit roundoff u and gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability of Numerical
    Algorithms, sec. 3.1), for any summation order (blocked GPU GEMMs included; not TF32, which
    `_ieee_matmul` turns off): each squared norm and the dot product are sums of D + 1 rounded terms, so
    their errors are at most gamma_{D+1} |a|^2, gamma_{D+1} |b|^2 and gamma_{D+1} |a||b| <= gamma_{D+1} S / 2
    (S = |a|^2 + |b|^2); the two additions add at most 3 u S. Centring rounds each coordinate once, which
    moves |a - b| by at most u (|a| + |b|), so d2 by at most 4 u S (+ u^2 terms): total
    (2 gamma_{D+1} + 7u) S, taken as (2 gamma_{D+1} + 8u) S."""
    u = torch.finfo(dtype).eps / 2
    n = dim + 1
    gamma = n * u / (1 - n * u)
    return 2.0 * gamma + 8.0 * u


@dataclass(frozen=True)
class _Screen:
    """What the GEMM pass works on: the features moved by one common vector (distances do not change,
    the GEMM's rounding error, proportional to the squared norms, shrinks: Inception features are
    non-negative, their mean is a large part of every norm), their squared norms in the features' dtype,
    and an upper bound on the true squared norms (float64) for the error bound."""

    x: Tensor
    norms: Tensor
    bound: Tensor

    @classmethod
    def of(cls, x: Tensor, centre: Tensor) -> _Screen:
        xc = x - centre  # rounded once per coordinate: error_bound counts it
        norms = xc.square().sum(1)
        gamma = error_bound(x.dtype, x.shape[1])  # > gamma_{D+1}: |fl(|a|^2) - |a|^2| <= gamma |a|^2
        return cls(xc, norms, norms.to(EXACT) / (1 - gamma))


def _pair_distances(a: Tensor, b: Tensor, ia: Tensor, ib: Tensor) -> Tensor:
    """float64 ||a[ia] - b[ib]|| for index pairs (the reference arithmetic): each row involved is converted
    to float64 once, the differences are taken PAIR_BATCH pairs at a time."""
    rows_a, ia = ia.unique(return_inverse=True)
    rows_b, ib = ib.unique(return_inverse=True)
    a64, b64 = a[rows_a].to(EXACT), b[rows_b].to(EXACT)
    out = torch.empty(len(ia), dtype=EXACT, device=a.device)
    for s in range(0, len(ia), PAIR_BATCH):
        diff = a64[ia[s : s + PAIR_BATCH]] - b64[ib[s : s + PAIR_BATCH]]
        out[s : s + PAIR_BATCH] = torch.linalg.vector_norm(diff, dim=1)
    return out


def _row_distances(x: Tensor, i: int, chunk_size: int) -> Tensor:
    """float64 distances of point i to every point (its own entry included)."""
    rows = torch.full((chunk_size,), i, dtype=torch.long, device=x.device)
    parts = []
    for j in range(0, len(x), chunk_size):
        cols = torch.arange(j, min(j + chunk_size, len(x)), device=x.device)
        parts.append(_pair_distances(x, x, rows[: len(cols)], cols))
    return torch.cat(parts)


def _check_k(n: int, k: int) -> None:
    if not 1 <= k < n:
        raise ValueError(f"k nearest neighbours need 1 <= k < number of points, got k={k} with {n} points")


def _plain_kth(x: Tensor, k: int, chunk_size: int) -> Tensor:
    n = len(x)
    norms = x.square().sum(1)
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    for i in range(0, n, chunk_size):
        rows = x[i : i + chunk_size]
        best = torch.full((len(rows), k), float("inf"), dtype=x.dtype, device=x.device)
        for j in range(0, n, chunk_size):
            d = _sq_distances(rows, x[j : j + chunk_size], norms[i : i + len(rows)], norms[j : j + chunk_size])
            d = d.sqrt_()  # (b_i, b_j)
            lo, hi = max(i, j), min(i + len(rows), j + d.shape[1])
            if lo < hi:  # this block holds the rows' own points: exclude them
                idx = torch.arange(lo, hi, device=x.device)
                d[idx - i, idx - j] = float("inf")
            best = torch.cat([best, d], dim=1).topk(k, dim=1, largest=False).values
        out[i : i + len(rows)] = best[:, k - 1]
    return out


def _exact_kth(x: Tensor, k: int, chunk_size: int, extra: int = CANDIDATES) -> tuple[Tensor, int]:
    """float64 k-th neighbour distances and how many rows had to be recomputed whole.

    The GEMM pass (on the centred features) keeps the m = k + extra nearest per row, v_1 <= ... <= v_m
    (squared). With the row's error bound e = c (|x_i|^2 + max |x|^2) the exact k-th squared distance lies
    in [v_k - e, v_k + e], so only the candidates with |v - v_k| <= 2e (the band) can be the k-th; the s
    candidates below the band are nearer than all of them. The k-th is then the (k - s)-th float64
    distance of the band: usually one pair to recompute per point. That holds when every point outside
    the candidates (GEMM d2 >= v_m) is above the band, v_m > v_k + 2e; otherwise the row is recomputed in
    float64 against every point."""
    return _exact_kth_screened(x, _Screen.of(x, x.mean(0)), k, chunk_size, extra)


def _exact_kth_screened(x: Tensor, screen: _Screen, k: int, chunk_size: int, extra: int) -> tuple[Tensor, int]:
    n, dim = x.shape
    m = min(n - 1, k + extra)
    c = error_bound(x.dtype, dim)
    xc, norms, exact_norms = screen.x, screen.norms, screen.bound
    top_norm = exact_norms.max()
    out = torch.empty(n, dtype=EXACT, device=x.device)
    fallback = 0
    for i in range(0, n, chunk_size):
        rows = xc[i : i + chunk_size]
        r = len(rows)
        best_v = torch.full((r, m), float("inf"), dtype=x.dtype, device=x.device)
        best_i = torch.zeros((r, m), dtype=torch.long, device=x.device)
        for j in range(0, n, chunk_size):
            d2 = _sq_distances(rows, xc[j : j + chunk_size], norms[i : i + r], norms[j : j + chunk_size])
            lo, hi = max(i, j), min(i + r, j + d2.shape[1])
            if lo < hi:
                idx = torch.arange(lo, hi, device=x.device)
                d2[idx - i, idx - j] = float("inf")
            values, pick = torch.cat([best_v, d2], dim=1).topk(m, dim=1, largest=False)
            kept = best_i.gather(1, pick.clamp(max=m - 1))  # picks < m are earlier candidates
            best_i = torch.where(pick < m, kept, pick - m + j)
            best_v = values
        own = torch.arange(i, i + r, device=x.device)
        v = best_v.to(EXACT)  # ascending
        vk, e = v[:, k - 1 : k], (c * (exact_norms[own] + top_norm))[:, None]
        below = (v < vk - 2 * e).sum(1)
        band_rows, band_cols = ((v - vk).abs() <= 2 * e).nonzero(as_tuple=True)
        exact = torch.full_like(v, float("inf"))
        exact[band_rows, band_cols] = _pair_distances(x, x, own[band_rows], best_i[band_rows, band_cols])
        out[i : i + r] = exact.sort(dim=1).values.gather(1, (k - 1 - below)[:, None]).squeeze(1)
        if m < n - 1:
            unproven = (v[:, -1:] <= vk + 2 * e).squeeze(1).nonzero().flatten()
            for row in unproven.tolist():
                d = _row_distances(x, i + row, chunk_size)
                d[i + row] = float("inf")
                out[i + row] = d.kthvalue(k).values
            fallback += len(unproven)
    return out, fallback


@torch.no_grad()
def kth_neighbour_distances(x: Tensor, k: int, chunk_size: int = 8192, exact: bool = True) -> Tensor:
    """(N,) distance of every row of x to its k-th nearest other row (itself excluded): float64 and exact
    with `exact=True`, else in x's dtype from the GEMM."""
    _check_k(len(x), k)
    if not exact:
        return _plain_kth(x, k, chunk_size)
    with _ieee_matmul():
        return _exact_kth(x, k, chunk_size)[0]


def _inside(d2: Tensor, radii: Tensor, slack: Tensor, exact_pair: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """d < radius for every pair of a block, exactly. d2: the GEMM's squared distances; radii (float64) and
    slack (float64: the GEMM's error bound, plus the rounding of radius^2 -/+ slack to d2's dtype)
    broadcast against it as a row or a column. A pair is decided by the GEMM when d2 is more than the
    slack from radius^2, else by its float64 distance, `exact_pair(rows, cols)` (block indices)."""
    r2 = radii.square()
    lo, hi = (r2 - slack).to(d2.dtype), (r2 + slack).to(d2.dtype)
    inside = d2 < lo
    rows, cols = (~inside & (d2 <= hi)).nonzero(as_tuple=True)
    if len(rows):
        inside[rows, cols] = exact_pair(rows, cols) < radii.expand(d2.shape)[rows, cols]
    return inside


@torch.no_grad()
def compute_prdc(
    real: Tensor,
    fake: Tensor,
    k: int = 3,
    chunk_size: int = 8192,
    real_radii: Tensor | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    exact: bool = True,
) -> PRDC:
    """PRDC of fake (M, D) features against real (N, D) features. `real_radii` (N,) may come from a cache
    (it depends on the real set, k and `exact` only). dtype: the GEMMs' precision; exact: decide every
    comparison as float64 arithmetic does (module docstring), whatever `dtype`."""
    device = torch.device(device) if device is not None else real.device
    real, fake = real.to(device, dtype), fake.to(device, dtype)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"features must be (N, D) and (M, D) with the same D, got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    _check_k(len(real), k)
    _check_k(len(fake), k)
    radius_dtype = EXACT if exact else dtype
    if exact:  # GEMMs on features moved by the reals' mean; float64 pairs on the features as given
        centre = real.mean(0)
        screen_real, screen_fake = _Screen.of(real, centre), _Screen.of(fake, centre)
    else:
        screen_real = _Screen(real, real.square().sum(1), real.new_empty(0))
        screen_fake = _Screen(fake, fake.square().sum(1), fake.new_empty(0))
    with _ieee_matmul():
        if real_radii is None:
            real_radii = (
                _exact_kth_screened(real, screen_real, k, chunk_size, CANDIDATES)[0]
                if exact
                else kth_neighbour_distances(real, k, chunk_size, exact=False)
            )
        else:
            real_radii = real_radii.to(device, radius_dtype)
            if real_radii.shape != (len(real),):
                raise ValueError(f"real_radii must have shape ({len(real)},), got {tuple(real_radii.shape)}")
        fake_radii = (
            _exact_kth_screened(fake, screen_fake, k, chunk_size, CANDIDATES)[0]
            if exact
            else kth_neighbour_distances(fake, k, chunk_size, exact=False)
        )

    n_real, n_fake = len(real), len(fake)
    inside_count = torch.zeros(n_fake, dtype=torch.int64, device=device)  # real balls containing each fake
    covered = torch.zeros(n_real, dtype=torch.bool, device=device)  # some fake inside the real's ball
    recalled = torch.zeros(n_real, dtype=torch.bool, device=device)  # real inside some fake ball
    gemm_real, gemm_fake = screen_real.x, screen_fake.x
    real_sq, fake_sq = screen_real.norms, screen_fake.norms
    if exact:
        c = error_bound(dtype, real.shape[1])
        u = torch.finfo(dtype).eps  # 2 unit roundoffs: the rounding of radius^2 -/+ slack to dtype
        real_norms, fake_norms = screen_real.bound, screen_fake.bound
    with _ieee_matmul():
        for i in range(0, n_fake, chunk_size):
            f, f_radii = gemm_fake[i : i + chunk_size], fake_radii[i : i + chunk_size]
            for j in range(0, n_real, chunk_size):
                r_part = gemm_real[j : j + chunk_size]
                radii = real_radii[j : j + len(r_part)]
                d2 = _sq_distances(f, r_part, fake_sq[i : i + len(f)], real_sq[j : j + len(r_part)])
                if not exact:
                    d = d2.sqrt_()  # (b_fake, b_real)
                    in_real, in_fake = d < radii[None, :], d < f_radii[:, None]
                else:
                    # The GEMM's error for pair (f, r) is <= c (|f|^2 + |r|^2); with the largest |f|^2 of
                    # the block (resp. |r|^2) the bound is a row (resp. column) vector.
                    top_f, top_r = fake_norms[i : i + len(f)].max(), real_norms[j : j + len(r_part)].max()
                    slack_real = c * (top_f + real_norms[j : j + len(r_part)]) + 2 * u * radii.square()
                    slack_fake = c * (fake_norms[i : i + len(f)] + top_r) + 2 * u * f_radii.square()

                    def exact_pair(rows: Tensor, cols: Tensor, i: int = i, j: int = j) -> Tensor:
                        return _pair_distances(fake, real, rows + i, cols + j)

                    in_real = _inside(d2, radii[None, :], slack_real[None, :], exact_pair)
                    in_fake = _inside(d2, f_radii[:, None], slack_fake[:, None], exact_pair)
                inside_count[i : i + len(f)] += in_real.sum(1)
                covered[j : j + len(r_part)] |= in_real.any(0)
                recalled[j : j + len(r_part)] |= in_fake.any(0)

    return PRDC(
        precision=(inside_count > 0).double().mean().item(),
        recall=recalled.double().mean().item(),
        density=inside_count.double().sum().item() / (k * n_fake),
        coverage=covered.double().mean().item(),
    )
