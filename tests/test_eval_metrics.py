"""FID and precision/recall/density/coverage against closed forms, hand-built point sets and an
independent full-matrix implementation; chunked == unchunked; streamed statistics == one-shot."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eval.fid import GaussianStats, RunningStats, frechet_distance
from eval.prdc import _exact_kth, _sq_distances, compute_prdc, error_bound, kth_neighbour_distances


# --- FID -------------------------------------------------------------------------------------------
def test_fid_of_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 16))
    s = GaussianStats.from_features(x)
    assert abs(frechet_distance(s.mu, s.sigma, s.mu, s.sigma)) < 1e-8


def test_fid_matches_the_closed_form_for_two_gaussians():
    # Diagonal covariances: sqrt(S1 S2) = diag(sqrt(a_i b_i)), so
    # FID = |mu1 - mu2|^2 + sum_i (a_i + b_i - 2 sqrt(a_i b_i)) = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_fid_with_full_covariances_matches_an_eigen_decomposition():
    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = m1 @ m1.T + np.eye(6), m2 @ m2.T + np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    # Independent: Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2), a symmetric PSD matrix -> eigenvalues.
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("dim", [1, 5, 64])
def test_fid_eigh_method_equals_sqrtm(dim):
    rng = np.random.default_rng(dim)
    a, b = rng.normal(size=(dim, 3 * dim)), rng.normal(size=(dim, 3 * dim))
    s1, s2 = a @ a.T / dim, b @ b.T / dim
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    ref = frechet_distance(mu1, s1, mu2, s2, method="sqrtm")
    assert frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(ref, rel=1e-9)
    with pytest.raises(ValueError, match="sqrtm or eigh"):
        frechet_distance(mu1, s1, mu2, s2, method="svd")


def test_fid_of_sampled_gaussians_approaches_the_closed_form():
    rng = np.random.default_rng(2)
    x = rng.normal(0.0, 1.0, size=(200_000, 2))
    y = rng.normal(0.5, 2.0, size=(200_000, 2))
    sx, sy = GaussianStats.from_features(x), GaussianStats.from_features(y)
    expected = 2 * 0.5**2 + 2 * (1.0 - 2.0) ** 2  # per dim: (mu diff)^2 + (sigma1 - sigma2)^2
    assert frechet_distance(sx.mu, sx.sigma, sy.mu, sy.sigma) == pytest.approx(expected, abs=0.05)


def test_fid_of_singular_covariances_is_finite_and_real():
    x = np.random.default_rng(3).normal(size=(5, 10))  # 5 points in 10-d: rank-deficient covariance
    s = GaussianStats.from_features(x)
    value = frechet_distance(s.mu, s.sigma, s.mu + 1.0, s.sigma)
    assert np.isfinite(value) and isinstance(value, float)
    assert value == pytest.approx(10.0, abs=1e-3)  # the mean shift; the trace terms cancel


def test_running_stats_equal_numpy_on_streamed_batches():
    rng = np.random.default_rng(4)
    x = rng.normal(1000.0, 0.01, size=(301, 7))  # a large mean vs a small spread: no cancellation loss
    running = RunningStats()
    for start in range(0, len(x), 64):
        running.update(torch.from_numpy(x[start : start + 64]))
    s = running.compute()
    np.testing.assert_allclose(s.mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.sigma, np.cov(x, rowvar=False), rtol=1e-7, atol=1e-12)
    assert s.n == 301


# --- PRDC ------------------------------------------------------------------------------------------
def prdc_reference(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """Full-matrix numpy implementation of the definitions (independent of eval.prdc)."""
    d_rr = np.linalg.norm(real[:, None] - real[None], axis=-1)
    d_ff = np.linalg.norm(fake[:, None] - fake[None], axis=-1)
    d_rf = np.linalg.norm(real[:, None] - fake[None], axis=-1)  # (N, M)
    r_real = np.sort(d_rr, axis=1)[:, k]  # column 0 is the point itself
    r_fake = np.sort(d_ff, axis=1)[:, k]
    inside = d_rf < r_real[:, None]
    return {
        "precision": inside.any(0).mean(),
        "recall": (d_rf < r_fake[None, :]).any(1).mean(),
        "density": inside.sum(0).mean() / k,
        "coverage": (d_rf.min(1) < r_real).mean(),
    }


def test_prdc_on_hand_built_points():
    # Reals on a line at 0, 1, 2, 3, 10 (k = 1): radii = 1, 1, 1, 1, 7 (10's nearest real is 3).
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    # Fakes: 0.5 (inside the balls of 0 and 1), 20 (outside all), 9 (inside 10's ball only), 2.2 (balls of 2 and 3;
    # |2.2 - 1| = 1.2 and |10 - 2.2| = 7.8 are outside the balls of 1 and 10).
    fake = torch.tensor([[0.5], [20.0], [9.0], [2.2]])
    out = compute_prdc(real, fake, k=1, dtype=torch.float64)
    # precision: 0.5, 9, 2.2 are inside some real ball -> 3/4.
    assert out.precision == pytest.approx(3 / 4)
    # density (k = 1): 0.5 in 2 balls, 20 in 0, 9 in 1, 2.2 in 2 -> 5/4.
    assert out.density == pytest.approx(5 / 4)
    # coverage: nearest fake of 0 is 0.5 (< 1 yes), 1: 0.5 (yes), 2: 2.2 (yes), 3: 2.2 (0.8 < 1 yes), 10: 9 (1 < 7 yes).
    assert out.coverage == pytest.approx(1.0)
    # recall: fake radii (k = 1) 0.5: 1.7 (to 2.2), 20: 11 (to 9), 9: 6.8 (to 2.2), 2.2: 1.7 (to 0.5); reals 0..3
    # are within 1.7 of 0.5 or 2.2, and 10 is within 6.8 of 9 -> all 5 reals recalled.
    assert out.recall == pytest.approx(1.0)
    assert out.as_dict() == pytest.approx(prdc_reference(real.numpy(), fake.numpy(), 1))


def test_prdc_identical_sets_and_far_away_sets():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    same = compute_prdc(x, x.clone(), k=3)
    # Every fake equals a real (distance 0 < its radius): precision = recall = coverage = 1, and density = 1
    # in expectation only; the reference implementation gives the exact value.
    assert (same.precision, same.recall, same.coverage) == (1.0, 1.0, 1.0)
    assert same.density == pytest.approx(prdc_reference(x.numpy(), x.numpy(), 3)["density"])
    far = compute_prdc(x, x + 1000.0, k=3)
    assert far.as_dict() == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prdc_matches_the_full_matrix_reference(k):
    g = torch.Generator().manual_seed(k)
    real = torch.randn(120, 8, generator=g, dtype=torch.float64)
    fake = 1.2 * torch.randn(90, 8, generator=g, dtype=torch.float64) + 0.3
    ours = compute_prdc(real, fake, k=k, dtype=torch.float64).as_dict()
    assert ours == pytest.approx(prdc_reference(real.numpy(), fake.numpy(), k), abs=1e-12)


@pytest.mark.parametrize("chunk", [5, 32, 64])
def test_prdc_chunked_equals_unchunked(chunk):
    g = torch.Generator().manual_seed(5)
    real = torch.randn(150, 16, generator=g)
    fake = torch.randn(110, 16, generator=g) * 1.1
    whole = compute_prdc(real, fake, k=3, chunk_size=100_000)
    assert compute_prdc(real, fake, k=3, chunk_size=chunk) == whole
    torch.testing.assert_close(
        kth_neighbour_distances(real, 3, chunk_size=chunk), kth_neighbour_distances(real, 3, 100_000)
    )


def test_prdc_cached_radii_give_the_same_result_and_bad_input_is_refused():
    g = torch.Generator().manual_seed(6)
    real, fake = torch.randn(60, 5, generator=g), torch.randn(40, 5, generator=g)
    radii = kth_neighbour_distances(real, 3)
    assert compute_prdc(real, fake, k=3, real_radii=radii) == compute_prdc(real, fake, k=3)
    with pytest.raises(ValueError, match="1 <= k < number of points"):
        compute_prdc(real[:3], fake, k=3)
    with pytest.raises(ValueError, match="same D"):
        compute_prdc(real, fake[:, :4], k=3)
    with pytest.raises(ValueError, match="real_radii must have shape"):
        compute_prdc(real, fake, k=3, real_radii=radii[:10])


def test_radii_exclude_the_point_itself_but_count_duplicates():
    x = torch.tensor([[0.0], [0.0], [5.0], [7.0]])
    # k = 1: the duplicate at 0 is the nearest other point of each zero (distance 0); 5 -> 2, 7 -> 2.
    assert kth_neighbour_distances(x, 1, chunk_size=2).tolist() == [0.0, 0.0, 2.0, 2.0]


# --- exact PRDC: float32 GEMMs, decisions of float64 arithmetic ----------------------------------------
def near_the_radii(n_real=240, n_fake=240, dim=64, offset=30.0, k=3, seed=0):
    """Fakes on the spheres of the real balls (|f - real_i| = r_i (1 + ~3e-7)), all moved far from the origin:
    the float32 GEMM (error ~ 1e-7 of the squared norms) cannot tell inside from outside for most of them."""
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(n_real, dim, generator=g, dtype=torch.float64)
    radii = kth_neighbour_distances(real, k)
    owner = torch.randint(0, n_real, (n_fake,), generator=g)
    direction = torch.randn(n_fake, dim, generator=g, dtype=torch.float64)
    direction = direction / direction.norm(dim=1, keepdim=True)
    fake = real[owner] + direction * radii[owner, None] * (1 + 3e-7 * torch.randn(n_fake, 1, generator=g))
    return (real + offset).float(), (fake + offset).float()


@pytest.mark.parametrize("k", [1, 3])
def test_exact_prdc_is_float64_arithmetic_where_float32_is_not(k):
    real, fake = near_the_radii(k=k)
    reference = prdc_reference(real.double().numpy(), fake.double().numpy(), k)  # float64, full matrices
    exact = compute_prdc(real, fake, k=k).as_dict()
    assert exact == {m: float(v) for m, v in reference.items()}  # every count, not approximately
    assert compute_prdc(real, fake, k=k, dtype=torch.float64).as_dict() == exact
    for chunk in (7, 64):
        assert compute_prdc(real, fake, k=k, chunk_size=chunk).as_dict() == exact
    # the case is one float32 cannot decide: many (fake, real) pairs lie within the float32 GEMM's error bound
    # of the real's radius (whether the GEMM rounds a count the wrong way here depends on the BLAS: see
    # test_plain_float32_prdc_miscounts_where_its_rounding_is_fixed for a case where it surely does)
    r64, f64 = real.double(), fake.double()
    d2 = (f64[:, None, :] - r64[None, :, :]).square().sum(-1)
    margin = (d2 - kth_neighbour_distances(r64, k).square()[None, :]).abs()
    bound = error_bound(torch.float32, real.shape[1]) * (f64.square().sum(1)[:, None] + r64.square().sum(1)[None, :])
    assert (margin < bound).sum() >= 100


def test_plain_float32_prdc_miscounts_where_its_rounding_is_fixed():
    """One feature: every float32 GEMM entry is one rounded product and the distance a fixed sequence of
    IEEE operations, so the plain path's rounding is the same on any BLAS. Near 1000, squared norms (~1e6) are
    rounded to 1/16, far more than these fakes' distances to the balls' spheres (~1e-3): plain float32
    miscounts, the exact path gives the float64 counts."""
    real = torch.tensor([[1000.0], [1001.0], [1003.0], [1006.0]])
    fake = torch.tensor([[1001.001], [1003.001], [1000.999]])  # just inside the balls of 1003, 1006, 1000
    reference = prdc_reference(real.double().numpy(), fake.double().numpy(), 1)
    exact = compute_prdc(real, fake, k=1).as_dict()
    assert exact == {m: float(v) for m, v in reference.items()} == {
        "precision": 1.0, "recall": 0.5, "density": 2.0, "coverage": 1.0,
    }  # fmt: skip
    assert compute_prdc(real, fake, k=1, exact=False).as_dict() != exact


def test_exact_radii_are_the_float64_ones():
    real, _ = near_the_radii()
    d = np.linalg.norm(real.double().numpy()[:, None] - real.double().numpy()[None], axis=-1)
    expected = np.sort(d, axis=1)[:, 3]  # column 0 is the point itself
    radii = kth_neighbour_distances(real, 3)
    assert radii.dtype == torch.float64
    np.testing.assert_allclose(radii.numpy(), expected, rtol=1e-14)
    assert kth_neighbour_distances(real, 3, exact=False).dtype == torch.float32


def test_exact_radii_recompute_rows_whose_candidates_prove_nothing():
    # a regular simplex: every distance is sqrt(2) (up to float32), so no set of candidates can be shown
    # to hold the 3 nearest and every row is recomputed in float64
    x = torch.eye(20) * 1.0 + 5.0
    radii, fallback = _exact_kth(x, 3, chunk_size=8, extra=2)
    assert fallback == 20
    torch.testing.assert_close(radii, torch.full((20,), 2**0.5, dtype=torch.float64), rtol=1e-15, atol=0)
    dup = torch.tensor([[0.0], [0.0], [5.0], [7.0], [7.0]])  # duplicates at distance 0 count as neighbours
    assert _exact_kth(dup, 1, chunk_size=2)[0].tolist() == [0.0, 0.0, 2.0, 0.0, 0.0]


def test_the_gemm_error_bound_holds():
    g = torch.Generator().manual_seed(8)
    a = torch.randn(300, 512, generator=g) * 3 + 40.0
    b = torch.randn(200, 512, generator=g) * 3 + 40.0
    gemm = _sq_distances(a, b).double()
    exact = (a.double()[:, None] - b.double()[None]).square().sum(-1)
    scale = a.double().square().sum(1)[:, None] + b.double().square().sum(1)[None]
    worst = ((gemm - exact).abs() / scale).max().item()
    assert 0 < worst <= error_bound(torch.float32, 512)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prdc_on_gpu_equals_cpu_in_float64():
    g = torch.Generator().manual_seed(7)
    real, fake = torch.randn(3000, 64, generator=g), torch.randn(2500, 64, generator=g) * 1.1
    cpu = compute_prdc(real, fake, k=3, chunk_size=1024, dtype=torch.float64)
    gpu = compute_prdc(real, fake, k=3, chunk_size=1024, dtype=torch.float64, device="cuda")
    assert gpu.as_dict() == pytest.approx(cpu.as_dict(), abs=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_exact_prdc_on_gpu_equals_float64_on_cpu():
    real, fake = near_the_radii(n_real=2000, n_fake=1500, dim=256)
    cpu = compute_prdc(real, fake, k=3, chunk_size=512, dtype=torch.float64, exact=False)
    gpu = compute_prdc(real, fake, k=3, chunk_size=512, device="cuda")
    assert gpu.as_dict() == cpu.as_dict()
