"""FID and Inception Score with the Flax FID Inception (imm_jax.evaluation.inception).

* :class:`InceptionExtractor`: uint8 NHWC images (an array, or an iterable of batches) -> 2048-d pool
  features and 1008 logits, in fixed-size jitted batches sharded over the local devices (a batch is
  padded to a multiple of the device count; the padding is dropped from the output).
* :class:`RunningStatistics`: mean and covariance accumulated batch by batch in float64 (50k x 2048
  features never need to be held at once); :func:`compute_statistics` for an in-memory array.
* :func:`fid_from_statistics` / :func:`fid_from_features`: the Frechet distance
  (:func:`imm_jax.evaluation.distances.frechet_distance`, float64; fewer samples than dimensions use
  an exact sample-space form of the same formula).
* :func:`inception_score`: ``exp(E_x KL(p(y|x) || p(y)))`` over ``splits`` chunks, mean and std, from the
  1008 logits as the TF graph's softmax (the usual 10 splits).
* :func:`save_statistics` / :func:`load_statistics`: reference statistics in EDM's ``.npz`` format
  (``mu`` (2048,), ``sigma`` (2048, 2048)), e.g. https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/ .

The images go through pytorch-fid's preprocessing (bilinear resize to 299 without antialiasing); EDM's
reference files were made by NVIDIA's port of the same TF graph, whose resize differs slightly, so FID
against them agrees with EDM's numbers to the usual cross-implementation precision, not bit for bit.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from imm_jax.evaluation import inception as inception_lib
from imm_jax.evaluation.distances import feature_statistics, frechet_distance

__all__ = [
    "InceptionExtractor", "RunningStatistics", "compute_statistics", "fid_from_statistics",
    "fid_from_features", "inception_score", "save_statistics", "load_statistics", "StatisticsError",
    "EDM_REFS_URL",
]

EDM_REFS_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/"


# Images per Inception batch by default. Evaluation extracts a shard at a time, in batches of
# min(BATCH_SIZE, shard size): every batch runs padded to the full size, so small shards use small ones.
BATCH_SIZE = 64


class InceptionExtractor:
    """Inception pool features and logits of uint8 images, batched and sharded over local devices.

    ``variables``: Flax variables of :class:`~imm_jax.evaluation.inception.InceptionV3` (e.g. from
    :func:`~imm_jax.evaluation.inception.load_inception`); without them, ``weights`` (a .pth/.npz path,
    or None for the default locations) is loaded, downloading only with ``allow_download``.
    ``batch_size`` is rounded up to a multiple of the device count; every batch runs at that size, so a
    given image size compiles once. ``size`` is the network input (299 for FID; smaller sizes down to
    75 only for fast tests).
    """

    def __init__(self, variables: Mapping[str, Any] | None = None, *, weights: str | None = None,
                 allow_download: bool = False, batch_size: int = BATCH_SIZE, size: int = inception_lib.INPUT_SIZE,
                 devices=None):
        if variables is None:
            variables = inception_lib.load_inception(weights, allow_download=allow_download)
        self.devices = list(devices) if devices is not None else jax.local_devices()
        n = len(self.devices)
        self.batch_size = max(n, -(-int(batch_size) // n) * n)
        self.size = int(size)
        mesh = Mesh(np.array(self.devices), ("batch",))
        self._data = NamedSharding(mesh, PartitionSpec("batch"))
        replicated = NamedSharding(mesh, PartitionSpec())
        self.variables = jax.device_put(variables, replicated)
        model = inception_lib.InceptionV3()
        size = self.size

        def apply(variables, images):
            return model.apply(variables, inception_lib.preprocess(images, size))

        self._apply = jax.jit(apply, in_shardings=(replicated, self._data),
                              out_shardings=(self._data, self._data))

    def _run_batch(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = batch.shape[0]
        if n < self.batch_size:
            pad = np.zeros((self.batch_size - n,) + batch.shape[1:], batch.dtype)
            batch = np.concatenate([batch, pad])
        pool, logits = self._apply(self.variables, jax.device_put(batch, self._data))
        return np.asarray(pool)[:n], np.asarray(logits)[:n]

    def __call__(self, images, *, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(features (N, 2048), logits (N, 1008))`` float32 for uint8 NHWC images (C = 1 or 3): one
        array, or an iterable of arrays (any batch sizes, e.g. shards read from disk)."""
        feats, logits = [], []
        for pool, lg in self.iterate(images, progress=progress):
            feats.append(pool)
            logits.append(lg)
        if not feats:
            raise ValueError("no images")
        return np.concatenate(feats), np.concatenate(logits)

    def statistics(self, images, *, progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(mu, sigma, logits)``: float64 feature statistics accumulated batch by batch (the features
        themselves are not kept: 50k x 2048 would be 400 MB) and the float32 logits for the IS."""
        stats, logits = RunningStatistics(inception_lib.FEATURE_DIM), []
        for pool, lg in self.iterate(images, progress=progress):
            stats.update(pool)
            logits.append(lg)
        mu, sigma = stats.statistics()
        return mu, sigma, np.concatenate(logits)

    def iterate(self, images, *, progress: bool = False):
        """Yields ``(features, logits)`` per batch of at most ``batch_size`` images."""
        chunks = [images] if isinstance(images, np.ndarray) or hasattr(images, "shape") else images
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(unit="img", desc="inception")
        for chunk in chunks:
            chunk = _check_images(chunk)
            for start in range(0, chunk.shape[0], self.batch_size):
                out = self._run_batch(chunk[start:start + self.batch_size])
                if bar is not None:
                    bar.update(out[0].shape[0])
                yield out
        if bar is not None:
            bar.close()


def _check_images(images) -> np.ndarray:
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0..255), got {x.dtype}: convert with "
                         "np.clip(np.round(x * 255), 0, 255).astype(np.uint8) (x in [0, 1])")
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must be batches N x H x W x C with C = 1 or 3, got shape {x.shape}")
    return x


class RunningStatistics:
    """Mean and (N-1 normalised) covariance of features added batch by batch, in float64.

    Sums are taken around the first batch's mean (a shift that keeps ``E[xx^T] - mu mu^T`` from
    cancelling); the result equals :func:`compute_statistics` of all features at once to rounding.
    """

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self.count = 0
        self._shift = self._sum = self._outer = None

    def update(self, features) -> "RunningStatistics":
        f = np.asarray(features, np.float64)
        f = f.reshape(f.shape[0], -1)
        if self._shift is None:
            if self.dim is not None and f.shape[1] != self.dim:
                raise ValueError(f"features have dimension {f.shape[1]}, expected {self.dim}")
            self.dim = f.shape[1]
            self._shift = f.mean(axis=0) if f.shape[0] else np.zeros(self.dim)
            self._sum = np.zeros(self.dim)
            self._outer = np.zeros((self.dim, self.dim))
        elif f.shape[1] != self.dim:
            raise ValueError(f"features have dimension {f.shape[1]}, expected {self.dim}")
        c = f - self._shift
        self._sum += c.sum(axis=0)
        self._outer += c.T @ c
        self.count += f.shape[0]
        return self

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f"statistics need at least 2 samples, got {self.count}")
        mean_c = self._sum / self.count
        sigma = (self._outer - self.count * np.outer(mean_c, mean_c)) / (self.count - 1)
        return self._shift + mean_c, 0.5 * (sigma + sigma.T)


def compute_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` in float64 of ``(N, D)`` features (sigma normalised by N - 1, as np.cov / EDM)."""
    return feature_statistics(features)


def fid_from_statistics(mu1, sigma1, mu2, sigma2) -> float:
    """FID between two sets of statistics (float64 Frechet distance)."""
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def fid_from_features(features1, features2) -> float:
    """FID between two feature sets (``(N, 2048)`` pool features), float64.

    With at least as many samples as dimensions this is :func:`fid_from_statistics` of the two sets'
    statistics. With fewer (small test sets: covariances of rank < D), the same number is computed
    exactly in sample space, much faster than the D x D eigendecompositions: with centred features
    ``A`` (n1, D), ``B`` (n2, D), the non-zero eigenvalues of ``s1 s2`` are those of
    ``A B^T B A^T / ((n1-1)(n2-1))``, so ``tr (s1 s2)^{1/2}`` is the sum of the singular values of
    ``A B^T`` over ``sqrt((n1-1)(n2-1))``.
    """
    f1 = np.asarray(features1, np.float64)
    f2 = np.asarray(features2, np.float64)
    f1, f2 = f1.reshape(f1.shape[0], -1), f2.reshape(f2.shape[0], -1)
    n1, n2, dim = f1.shape[0], f2.shape[0], f1.shape[1]
    if f2.shape[1] != dim or min(n1, n2) < 2:
        raise ValueError(f"need (N, D) feature sets with N >= 2 and equal D, got {f1.shape} and {f2.shape}")
    if max(n1, n2) >= dim:
        return frechet_distance(*compute_statistics(f1), *compute_statistics(f2))
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    a, b = f1 - mu1, f2 - mu2
    tr1 = float(np.einsum("ij,ij->", a, a)) / (n1 - 1)
    tr2 = float(np.einsum("ij,ij->", b, b)) / (n2 - 1)
    tr_covmean = float(np.linalg.svd(a @ b.T, compute_uv=False).sum()) / np.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return float(diff @ diff + tr1 + tr2 - 2.0 * tr_covmean)


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``(mean, std)`` over ``splits`` contiguous chunks, from ``(N, 1008)`` logits.

    Per chunk: ``exp(mean_x KL(p(y|x) || mean_x p(y|x)))`` with ``p = softmax(logits)`` (float64), as
    the original TF code, EDM and torch-fidelity compute it (they too take all 1008 outputs).
    """
    z = np.asarray(logits, np.float64)
    if z.ndim != 2 or z.shape[0] < splits or splits < 1:
        raise ValueError(f"need (N, classes) logits with N >= splits={splits}, got shape {z.shape}")
    logp = z - z.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    p = np.exp(logp)
    scores = []
    for idx in np.array_split(np.arange(z.shape[0]), splits):
        # log p(y) = log mean_x p(y|x), as a log-sum-exp: no log(0) for classes no image predicts.
        lp = logp[idx]
        top = lp.max(axis=0)
        log_py = top + np.log(np.exp(lp - top).mean(axis=0))
        kl = (p[idx] * (lp - log_py)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


class StatisticsError(FileNotFoundError):
    """Reference statistics missing or malformed (the message says how to get them)."""


def save_statistics(path: str, mu, sigma, **extra) -> str:
    """Write ``mu``, ``sigma`` (float64) in EDM's reference ``.npz`` format, atomically; ``extra`` arrays
    (e.g. ``count``) are stored beside them and ignored by readers that only take mu and sigma."""
    mu = np.asarray(mu, np.float64)
    sigma = np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
        raise ValueError(f"mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, mu=mu, sigma=sigma, **{k: np.asarray(v) for k, v in extra.items()})
    os.replace(tmp, path)
    return path


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` float64 from an EDM-format ``.npz`` (keys ``mu``, ``sigma``)."""
    if not os.path.exists(path):
        raise StatisticsError(
            f"reference statistics {path} not found: compute them with python -m imm_jax.evaluate ref "
            f"--data ... --out {path}, or download EDM's (e.g. {EDM_REFS_URL}cifar10-32x32.npz)")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("mu", "sigma") if k not in f.files]
            if missing:
                raise StatisticsError(f"{path} has no {' / '.join(missing)} (keys: {sorted(f.files)}); "
                                      "reference statistics need mu and sigma, as EDM's fid-refs .npz")
            mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
    except (OSError, ValueError) as e:
        raise StatisticsError(f"could not read {path} as .npz reference statistics ({e})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
        raise StatisticsError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
    return mu, sigma
