"""Sample-quality figures that need no downloaded network, computed in numpy float64.

FID needs Inception weights, which cannot be fetched on the training machines. These distances work
directly on flattened samples (pixels of 8x8 digits, 2-D toy points) or on any features, and have
closed forms for Gaussians, so their tests check exact values rather than "looks plausible".

* ``energy_distance`` and ``mmd_rbf`` are unbiased (U-statistics): two independent samples of the same
  distribution give ~0 (possibly slightly negative), so "is it zero?" is a meaningful question.
* ``sliced_wasserstein`` is in the data's units, which reads well for 2-D toy data.
* ``frechet_distance`` + ``feature_statistics`` are the FID formula, for whatever features one has.

Pairwise terms are accumulated over row blocks, so 5000 x 5000 samples of dimension 256 need tens of
MB, not the 200 MB a full distance matrix would take (nor 25 GB for a broadcast difference tensor).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "energy_distance",
    "mmd_rbf",
    "sliced_wasserstein",
    "frechet_distance",
    "feature_statistics",
    "median_bandwidth",
]

_BLOCK_BYTES = 32 * 2**20  # memory for one block of the pairwise matrix
_MEDIAN_SUBSAMPLE = 1000


def _flatten(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 0:
        raise ValueError(f"{name} must have a leading sample axis")
    x = x.reshape(x.shape[0], -1)
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples, got {x.shape[0]}")
    return x


def _flatten_pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = _flatten(x, "x"), _flatten(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y differ in dimension: {x.shape[1]} vs {y.shape[1]}")
    return x, y


def _block_sum(a: np.ndarray, b: np.ndarray, fn, exclude_diagonal: bool) -> float:
    """Sum of ``fn(squared distance)`` over all pairs (a_i, b_j), built block by block.

    With ``exclude_diagonal`` (a is b) the i == j terms are zeroed after ``fn`` rather than subtracted
    afterwards, so rounding in the expansion |a|^2 + |b|^2 - 2ab (d2 ~ 1e-15, sqrt ~ 3e-8) cannot leak
    into the sum.
    """
    a_sq = np.einsum("ij,ij->i", a, a)
    b_sq = np.einsum("ij,ij->i", b, b)
    rows = max(1, _BLOCK_BYTES // (8 * max(1, b.shape[0])))
    total = 0.0
    for start in range(0, a.shape[0], rows):
        stop = min(a.shape[0], start + rows)
        d2 = a_sq[start:stop, None] + b_sq[None, :] - 2.0 * (a[start:stop] @ b.T)
        np.maximum(d2, 0.0, out=d2)
        values = fn(d2)
        if exclude_diagonal:
            idx = np.arange(start, stop)
            values[idx - start, idx] = 0.0
        total += float(values.sum())
    return total


def energy_distance(x, y) -> float:
    """Squared energy distance ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` (Euclidean norm), unbiased.

    The within-set means skip i == j (U-statistics). With the plug-in (V-statistic) version a sample
    compared with a fresh sample of the same distribution is biased upwards by O(1/n); here it is
    zero in expectation. Zero iff the distributions are equal; it grows with any difference.
    """
    x, y = _flatten_pair(x, y)
    n, m = x.shape[0], y.shape[0]
    xy = _block_sum(x, y, np.sqrt, exclude_diagonal=False) / (n * m)
    xx = _block_sum(x, x, np.sqrt, exclude_diagonal=True) / (n * (n - 1))
    yy = _block_sum(y, y, np.sqrt, exclude_diagonal=True) / (m * (m - 1))
    return float(2.0 * xy - xx - yy)


def median_bandwidth(x, y=None, *, max_points: int = _MEDIAN_SUBSAMPLE, seed: int = 0) -> float:
    """Median pairwise Euclidean distance of the pooled samples (the "median heuristic").

    Computed on a fixed random subsample of at most ``max_points`` points (seeded, so the same data
    always gives the same bandwidth) because the exact median would need all O(n^2) distances.
    """
    pooled = _flatten(x, "x") if y is None else np.concatenate(_flatten_pair(x, y))
    if pooled.shape[0] > max_points:
        idx = np.random.default_rng(seed).choice(pooled.shape[0], max_points, replace=False)
        pooled = pooled[idx]
    sq = np.einsum("ij,ij->i", pooled, pooled)
    d2 = sq[:, None] + sq[None, :] - 2.0 * pooled @ pooled.T
    iu = np.triu_indices(pooled.shape[0], k=1)
    return float(np.sqrt(np.median(np.maximum(d2[iu], 0.0))))


def mmd_rbf(x, y, bandwidth: float | None = None) -> float:
    """Unbiased squared MMD with the Gaussian kernel ``k(a, b) = exp(-|a - b|^2 / (2 bandwidth^2))``.

    ``bandwidth=None`` uses ``median_bandwidth`` of the pooled samples. Pass a fixed bandwidth when
    comparing numbers across checkpoints: the median heuristic moves with the samples themselves.
    """
    x, y = _flatten_pair(x, y)
    if bandwidth is None:
        bandwidth = median_bandwidth(x, y)
    bandwidth = float(bandwidth)
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth} (identical points?)")
    gamma = 1.0 / (2.0 * bandwidth**2)

    def kernel(d2):
        return np.exp(-gamma * d2)

    n, m = x.shape[0], y.shape[0]
    kxx = _block_sum(x, x, kernel, exclude_diagonal=True) / (n * (n - 1))
    kyy = _block_sum(y, y, kernel, exclude_diagonal=True) / (m * (m - 1))
    kxy = _block_sum(x, y, kernel, exclude_diagonal=False) / (n * m)
    return float(kxx + kyy - 2.0 * kxy)


def _wasserstein1_sorted(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Exact W1 between empirical 1-D distributions, rows of already sorted ``xs`` (P, n), ``ys`` (P, m).

    W1 = integral over u in (0, 1) of |F^-1(u) - G^-1(u)|; both quantile functions are step functions
    that only jump at multiples of 1/n or 1/m, so the integral is an exact finite sum.
    """
    n, m = xs.shape[1], ys.shape[1]
    if n == m:
        return np.mean(np.abs(xs - ys), axis=1)
    u = np.union1d(np.arange(1, n + 1) / n, np.arange(1, m + 1) / m)
    u = np.concatenate([[0.0], u[u <= 1.0]])
    u[-1] = 1.0
    widths = np.diff(u)
    mid = 0.5 * (u[1:] + u[:-1])
    ix = np.minimum((mid * n).astype(np.int64), n - 1)
    iy = np.minimum((mid * m).astype(np.int64), m - 1)
    return np.abs(xs[:, ix] - ys[:, iy]) @ widths


def sliced_wasserstein(x, y, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-1: the 1-D W1 between projections on random unit directions, averaged.

    Directions are uniform on the sphere and fixed by ``seed``, so repeated evaluations of a training
    run see the same slices. In 1-D both directions (+1, -1) give the exact W1, so a shift by ``s``
    gives ``|s|``. Sample counts may differ.
    """
    x, y = _flatten_pair(x, y)
    d = x.shape[1]
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((d, int(num_projections)))
    dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
    xs = np.sort((x @ dirs).T, axis=1)
    ys = np.sort((y @ dirs).T, axis=1)
    return float(np.mean(_wasserstein1_sorted(xs, ys)))


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (N-1 normalised) covariance of ``(N, ...)`` features, flattened, in float64."""
    f = _flatten(features, "features")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix via eigh; rounding-negative eigenvalues -> 0."""
    w, v = np.linalg.eigh(0.5 * (a + a.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (the FID formula), in float64.

    ``|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^{1/2})``. Method (no scipy): s1 s2 is similar
    to the symmetric PSD matrix ``r s2 r`` with ``r = s1^{1/2}``, so ``tr((s1 s2)^{1/2})`` is the sum of
    square roots of the eigenvalues of ``r s2 r``, both from ``np.linalg.eigh``. Eigenvalues that
    rounding makes slightly negative (singular covariances: fewer samples than dimensions) are
    clipped to 0 instead of producing NaN or complex parts as ``scipy.linalg.sqrtm`` of the
    non-symmetric product can. The result can be negative by rounding (~1e-12 relative) for
    identical inputs; it is not clamped.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape}, {mu2.shape}; sigma {s1.shape}, {s2.shape}")
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    w = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_covmean = float(np.sqrt(np.clip(w, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
