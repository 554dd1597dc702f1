"""Distances checked against closed forms for Gaussians and against brute-force definitions."""

import math
from statistics import NormalDist

import numpy as np
import pytest

from imm_jax.evaluation import distances
from imm_jax.evaluation.distances import (
    energy_distance,
    feature_statistics,
    frechet_distance,
    median_bandwidth,
    mmd_rbf,
    sliced_wasserstein,
)


def _phi_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _energy_closed_form_1d(m: float) -> float:
    # X ~ N(0,1), Y ~ N(m,1): X - Y ~ N(-m, 2), X - X' ~ N(0, 2).
    # E|N(mu, s^2)| = s sqrt(2/pi) exp(-mu^2 / (2 s^2)) + mu (2 Phi(mu / s) - 1); with s = sqrt(2):
    e_xy = 2.0 / math.sqrt(math.pi) * math.exp(-m * m / 4.0) + m * (2.0 * _phi_cdf(m / math.sqrt(2.0)) - 1.0)
    e_xx = 2.0 / math.sqrt(math.pi)
    return 2.0 * e_xy - 2.0 * e_xx


def _mmd_closed_form_1d(m: float, bw: float) -> float:
    # E exp(-Z^2 / (2 bw^2)) for Z ~ N(mu, s^2) = bw / sqrt(bw^2 + s^2) exp(-mu^2 / (2 (bw^2 + s^2))); s^2 = 2.
    c = bw / math.sqrt(bw * bw + 2.0)
    return 2.0 * c * (1.0 - math.exp(-m * m / (2.0 * (bw * bw + 2.0))))


def _normal_quantile_grid(n: int, mean: float = 0.0) -> np.ndarray:
    """n points at the (i + 1/2)/n quantiles of N(mean, 1): a deterministic stand-in for a sample whose
    pairwise averages converge like quadrature, so closed forms can be checked tightly without
    Monte-Carlo noise (a random sample of 3000 scatters by ~0.05)."""
    nd = NormalDist(mean, 1.0)
    return np.array([nd.inv_cdf((i + 0.5) / n) for i in range(n)])[:, None]


def _pairwise(a, b):
    return np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)


# -- energy distance ---------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [0.5, 1.0, 2.0])
def test_energy_distance_matches_gaussian_closed_form(m):
    x = _normal_quantile_grid(2000)
    y = _normal_quantile_grid(1500, mean=m)
    assert energy_distance(x, y) == pytest.approx(_energy_closed_form_1d(m), abs=5e-3)


def test_energy_distance_same_distribution_is_near_zero_and_unbiased():
    rng = np.random.default_rng(1)
    vals = [energy_distance(rng.standard_normal((300, 4)), rng.standard_normal((300, 4))) for _ in range(20)]
    assert all(abs(v) < 0.05 for v in vals)
    # Unbiased: the average over repeats sits at 0 well within its standard error
    # (the biased V-statistic would sit at about +E|X-X'|/n * 2 = +0.018 here).
    assert abs(np.mean(vals)) < 3 * np.std(vals) / math.sqrt(len(vals)) + 1e-3
    assert min(vals) < 0 < max(vals) or abs(np.mean(vals)) < 5e-3


def test_energy_distance_grows_with_mean_shift():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 8))
    base = rng.standard_normal((500, 8))
    values = [energy_distance(x, base + s) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_energy_distance_matches_brute_force_with_many_blocks(monkeypatch):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((37, 2, 3))  # flattened to 6-D
    y = rng.standard_normal((23, 6)) * 1.5
    n, m = len(x), len(y)
    xf = x.reshape(n, -1)
    expected = (
        2 * _pairwise(xf, y).mean()
        - _pairwise(xf, xf).sum() / (n * (n - 1))
        - _pairwise(y, y).sum() / (m * (m - 1))
    )
    monkeypatch.setattr(distances, "_BLOCK_BYTES", 8 * 5 * 40)  # 5-row blocks
    assert energy_distance(x, y) == pytest.approx(expected, rel=1e-10)


def test_energy_distance_rejects_mismatched_dims():
    with pytest.raises(ValueError):
        energy_distance(np.zeros((4, 2)), np.zeros((4, 3)))


# -- MMD ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m, bw", [(1.0, 1.0), (2.0, 0.5)])
def test_mmd_matches_gaussian_closed_form(m, bw):
    x = _normal_quantile_grid(2000)
    y = _normal_quantile_grid(1500, mean=m)
    assert mmd_rbf(x, y, bandwidth=bw) == pytest.approx(_mmd_closed_form_1d(m, bw), abs=2e-3)


def test_mmd_matches_brute_force_and_median_heuristic():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((30, 3))
    y = rng.standard_normal((20, 3)) + 0.5
    pooled = np.concatenate([x, y])
    d = _pairwise(pooled, pooled)
    bw = np.median(d[np.triu_indices(len(pooled), 1)])
    assert median_bandwidth(x, y) == pytest.approx(bw, rel=1e-10)

    def k(a, b):
        return np.exp(-_pairwise(a, b) ** 2 / (2 * bw**2))

    kxx, kyy = k(x, x), k(y, y)
    expected = (
        (kxx.sum() - 30) / (30 * 29) + (kyy.sum() - 20) / (20 * 19) - 2 * k(x, y).mean()
    )
    assert mmd_rbf(x, y) == pytest.approx(expected, rel=1e-10)


def test_mmd_same_distribution_near_zero_and_grows_with_shift():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((400, 16))
    y = rng.standard_normal((400, 16))
    assert abs(mmd_rbf(x, y, bandwidth=4.0)) < 5e-3
    values = [mmd_rbf(x, y + s, bandwidth=4.0) for s in (0.0, 0.2, 0.5, 1.0)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_median_bandwidth_subsample_is_deterministic():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1500, 2))
    a = median_bandwidth(x, x + 1.0)
    assert a == median_bandwidth(x, x + 1.0)
    assert a == pytest.approx(median_bandwidth(x, x + 1.0, max_points=3000), rel=0.05)


# -- sliced Wasserstein ------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [-2.5, 0.0, 0.7])
def test_sliced_wasserstein_1d_shift_is_exact(shift):
    x = np.random.default_rng(8).standard_normal((500, 1))
    assert sliced_wasserstein(x, x + shift, num_projections=16) == pytest.approx(abs(shift), abs=1e-12)


def test_sliced_wasserstein_2d_shift_matches_expected_projection():
    # Projecting a shift v on a uniform direction gives |<theta, v>|, whose mean in 2-D is 2|v|/pi.
    x = np.random.default_rng(9).standard_normal((200, 2))
    v = np.array([3.0, -4.0])
    got = sliced_wasserstein(x, x + v, num_projections=4096)
    assert got == pytest.approx(2 * 5.0 / math.pi, rel=0.02)


def test_sliced_wasserstein_unequal_sizes_exact():
    # Quantiles: x -> 0 on (0, 1/2], 1 on (1/2, 1]; y -> 0, 1, 2 on thirds. |diff| integrates to 1/6 + 1/3.
    x = np.array([[0.0], [1.0]])
    y = np.array([[2.0], [0.0], [1.0]])
    assert sliced_wasserstein(x, y, num_projections=4) == pytest.approx(0.5, abs=1e-12)


def test_sliced_wasserstein_unequal_sizes_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(10)
    x = rng.standard_normal((70, 1))
    y = rng.exponential(size=(45, 1))
    assert sliced_wasserstein(x, y, num_projections=2) == pytest.approx(
        stats.wasserstein_distance(x[:, 0], y[:, 0]), rel=1e-10
    )


def test_sliced_wasserstein_seeded_and_grows():
    rng = np.random.default_rng(11)
    x, y = rng.standard_normal((300, 2)), rng.standard_normal((300, 2))
    assert sliced_wasserstein(x, y, seed=3) == sliced_wasserstein(x, y, seed=3)
    values = [sliced_wasserstein(x, y * s) for s in (1.0, 1.5, 2.0, 3.0)]
    assert all(a < b for a, b in zip(values, values[1:]))


# -- Frechet -----------------------------------------------------------------------------------------


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(12)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    s1, s2 = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_commuting_covariances():
    rng = np.random.default_rng(13)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    d1, d2 = rng.uniform(0.1, 2.0, 5), rng.uniform(0.1, 2.0, 5)
    s1, s2 = q @ np.diag(d1) @ q.T, q @ np.diag(d2) @ q.T
    mu = np.zeros(5)
    expected = np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_general_matches_eigenvalues_of_product_and_is_symmetric():
    rng = np.random.default_rng(14)
    a, b = rng.standard_normal((8, 8)), rng.standard_normal((8, 8))
    s1, s2 = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    # s1 s2 has real non-negative eigenvalues; tr sqrt(s1 s2) = sum of their square roots.
    tr_sqrt = np.sum(np.sqrt(np.linalg.eigvals(s1 @ s2).real))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(expected, rel=1e-9)
    assert got == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)


def test_frechet_1d_and_singular_covariances():
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2.
    assert frechet_distance([1.0], [[4.0]], [-1.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # Fewer samples than dimensions: rank-deficient covariances, must stay finite and ~0 for itself.
    feats = np.random.default_rng(15).standard_normal((5, 20))
    mu, sigma = feature_statistics(feats)
    same = frechet_distance(mu, sigma, mu, sigma)
    assert np.isfinite(same) and abs(same) < 1e-6
    other = frechet_distance(mu, sigma, mu + 1.0, 2.0 * sigma)
    assert np.isfinite(other) and other > 20.0 - 1e-6


def test_feature_statistics():
    rng = np.random.default_rng(16)
    feats = rng.standard_normal((100, 2, 2)).astype(np.float32)
    mu, sigma = feature_statistics(feats)
    flat = feats.reshape(100, -1).astype(np.float64)
    assert mu.dtype == np.float64 and sigma.shape == (4, 4)
    np.testing.assert_allclose(mu, flat.mean(0))
    np.testing.assert_allclose(sigma, np.cov(flat, rowvar=False))
    mu1, sigma1 = feature_statistics(np.arange(10.0))  # (N,) -> 1-D features
    assert mu1.shape == (1,) and sigma1.shape == (1, 1)
