"""FID, Inception Score and reference statistics (imm_jax.evaluation.fid).

The Frechet distance is checked against the float64 scipy.linalg.sqrtm formula of pytorch-fid / EDM;
the extractor runs the Flax Inception with random weights (init_variables): FID of a set against
itself is ~0 whatever the batching or device count, and FID grows with added Gaussian noise.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from imm_jax.evaluation import fid
from imm_jax.evaluation.distances import feature_statistics, frechet_distance
from imm_jax.evaluation.inception import init_variables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scipy_fid(mu1, s1, mu2, s2):
    """pytorch-fid's calculate_frechet_distance / EDM's formula, float64, scipy.linalg.sqrtm."""
    linalg = pytest.importorskip("scipy.linalg")
    covmean = linalg.sqrtm(s1.dot(s2))  # (scipy >= 1.18 dropped the disp= of older releases)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ------------------------------------------------------------------------------------ Frechet distance


@pytest.mark.parametrize("n,dim", [(500, 64), (40, 64)])  # full-rank and singular covariances
def test_frechet_distance_matches_scipy_sqrtm(n, dim):
    rng = np.random.default_rng(n)
    a = rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim)) * 0.3 + 1.0
    b = np.abs(rng.standard_normal((n, dim))) @ rng.standard_normal((dim, dim)) * 0.2
    s_a, s_b = feature_statistics(a), feature_statistics(b)
    ours = fid.fid_from_statistics(*s_a, *s_b)
    ref = _scipy_fid(*s_a, *s_b)
    assert ours == pytest.approx(ref, rel=1e-9 if n > dim else 1e-6)
    # Singular covariances: frechet_distance's eigh (and scipy) lose ~1e-8 relative on the zero
    # eigenvalues; fid_from_features' sample-space form is exact there (checked with mpmath, 40 digits:
    # 405.04386019678934 vs eigh 405.0438586, sqrtm 405.0438569 for n=40).
    assert fid.fid_from_features(a, b) == pytest.approx(ours, rel=1e-10 if n > dim else 1e-7)


@pytest.mark.parametrize("n1,n2", [(12, 12), (5, 30), (2, 3)])
def test_fid_from_features_sample_space_form_equals_frechet_distance(n1, n2):
    # Fewer samples than dimensions: the sample-space form must give frechet_distance's number.
    rng = np.random.default_rng(n1)
    a = rng.standard_normal((n1, 200)) + 0.5
    b = rng.standard_normal((n2, 200)) * rng.uniform(0.5, 2, 200)
    expected = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert fid.fid_from_features(a, b) == pytest.approx(expected, rel=1e-7)
    assert abs(fid.fid_from_features(a, a)) < 1e-12 * np.trace(np.cov(a, rowvar=False))


def test_frechet_distance_closed_form_commuting_covariances():
    # Diagonal covariances commute: FID = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
    rng = np.random.default_rng(0)
    va, vb = rng.uniform(0.1, 3, 50), rng.uniform(0.1, 3, 50)
    mu1, mu2 = rng.standard_normal(50), rng.standard_normal(50)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
    assert frechet_distance(mu1, np.diag(va), mu2, np.diag(vb)) == pytest.approx(expected, rel=1e-12)


def test_running_statistics_equal_batch_statistics():
    rng = np.random.default_rng(0)
    feats = (rng.standard_normal((103, 16)) * rng.uniform(0.1, 2, 16) + 50.0).astype(np.float32)
    acc = fid.RunningStatistics()
    for start, stop in [(0, 1), (1, 40), (40, 41), (41, 103)]:
        acc.update(feats[start:stop])
    mu, sigma = acc.statistics()
    mu_ref, sigma_ref = fid.compute_statistics(feats)
    assert acc.count == 103 and mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-13)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(sigma, sigma.T)
    with pytest.raises(ValueError, match="dimension"):
        acc.update(np.zeros((2, 15)))
    with pytest.raises(ValueError, match="at least 2"):
        fid.RunningStatistics().update(np.zeros((1, 3))).statistics()


# ------------------------------------------------------------------------------------ Inception Score


def test_inception_score_closed_forms():
    # Identical predictions: p(y|x) = p(y), KL = 0, IS = 1.
    mean, std = fid.inception_score(np.random.default_rng(0).standard_normal((1, 1008)).repeat(50, 0), 5)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    # Confident predictions spread evenly over K classes within each split: IS = K.
    labels = np.arange(100) % 10
    logits = np.full((100, 1008), -1e3)
    logits[np.arange(100), labels] = 0.0
    mean, std = fid.inception_score(logits, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    # Against the plain formula (softmax in float64) for random logits.
    z = np.random.default_rng(1).standard_normal((40, 1008)) * 3
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    scores = [np.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0))), 1))) for q in np.split(p, 4)]
    assert fid.inception_score(z, splits=4) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-10)
    with pytest.raises(ValueError, match="splits"):
        fid.inception_score(z[:3], splits=10)


# ------------------------------------------------------------------------------------ reference files


def test_statistics_npz_round_trip_and_edm_format(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = fid.compute_statistics(rng.standard_normal((30, 8)))
    path = fid.save_statistics(str(tmp_path / "sub" / "ref.npz"), mu, sigma, count=np.int64(30))
    with np.load(path) as f:  # EDM's layout: plain mu / sigma arrays
        assert {"mu", "sigma"} <= set(f.files) and f["sigma"].shape == (8, 8)
    mu2, sigma2 = fid.load_statistics(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    assert fid.fid_from_statistics(mu2, sigma2, mu, sigma) == pytest.approx(0.0, abs=1e-12)
    # A file as EDM's fid-refs write it (np.savez(mu=, sigma=), any float dtype) reads as float64.
    edm = tmp_path / "edm.npz"
    np.savez(edm, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    mu3, sigma3 = fid.load_statistics(str(edm))
    assert mu3.dtype == np.float64 and np.allclose(sigma3, sigma, rtol=1e-6)


def test_statistics_errors_are_one_line(tmp_path):
    with pytest.raises(fid.StatisticsError) as info:
        fid.load_statistics(str(tmp_path / "missing.npz"))
    assert "\n" not in str(info.value) and fid.EDM_REFS_URL in str(info.value)
    assert "imm_jax.evaluate ref" in str(info.value)
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(3))
    with pytest.raises(fid.StatisticsError, match="no sigma"):
        fid.load_statistics(str(bad))
    np.savez(bad, mu=np.zeros(3), sigma=np.zeros((3, 2)))
    with pytest.raises(fid.StatisticsError, match=r"\(D, D\)"):
        fid.load_statistics(str(bad))


# ------------------------------------------------------------------------------------ extractor


def _blobs(rng, n, size=32):
    """Smooth colour images (Gaussian blobs on a gradient), so added pixel noise is a real change."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3))
    for i in range(n):
        img = np.stack([xx, yy, 1 - xx], -1) * rng.uniform(0.2, 0.6, 3)
        for _ in range(3):
            cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            img += blob[..., None] * rng.uniform(0, 0.6, 3)
        out[i] = img
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def extractor():
    # Random weights suffice for the relations tested here; input 75x75 (the network's smallest) instead
    # of 299 keeps the test fast on a CPU (the 299 path is tested in test_inception.py).
    return fid.InceptionExtractor(init_variables(seed=0), batch_size=8, size=75)


@pytest.fixture(scope="module")
def base_images():
    return _blobs(np.random.default_rng(0), 8)


def test_fid_self_is_zero_and_batching_does_not_matter(extractor, base_images):
    feats, logits = extractor(base_images)
    assert feats.shape == (8, 2048) and logits.shape == (8, 1008) and feats.dtype == np.float32
    # The same images in uneven chunks (padded last batches) give the same features.
    feats2, logits2 = extractor([base_images[:3], base_images[3:4], base_images[4:]])
    np.testing.assert_allclose(feats2, feats, atol=1e-5)
    np.testing.assert_allclose(logits2, logits, atol=1e-5)
    assert abs(fid.fid_from_features(feats, feats)) < 1e-5
    assert abs(fid.fid_from_features(feats, feats2)) < 1e-4
    mean, _ = fid.inception_score(logits, splits=2)
    assert mean >= 1.0
    # Streaming statistics give compute_statistics of the features.
    mu, sigma, logits3 = extractor.statistics([base_images[:5], base_images[5:]])
    mu_ref, sigma_ref = fid.compute_statistics(feats)
    np.testing.assert_allclose(mu, mu_ref, atol=1e-6)
    np.testing.assert_allclose(sigma, sigma_ref, atol=1e-6)
    np.testing.assert_allclose(logits3, logits, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        extractor(base_images.astype(np.float32))
    with pytest.raises(ValueError, match="N x H x W x C"):
        extractor(base_images[0])  # one HWC image, not a batch


def test_fid_grows_with_added_noise(extractor, base_images):
    ref = extractor(base_images)[0]
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(base_images.shape)
    scores = []
    for sigma in (4.0, 16.0, 48.0):  # pixel units (0..255)
        noisy = np.clip(np.round(base_images + sigma * noise), 0, 255).astype(np.uint8)
        scores.append(fid.fid_from_features(extractor(noisy)[0], ref))
    print("FID vs noise sigma 4, 16, 48:", scores)
    assert 0 < scores[0] < scores[1] < scores[2], scores


def test_extractor_on_two_devices_matches_one(tmp_path):
    """Sharded over 2 (host) devices, with a batch size rounded up to a multiple of 2 and padded."""
    script = textwrap.dedent("""
        import json, sys
        import numpy as np, jax
        from imm_jax.evaluation import fid
        from imm_jax.evaluation.inception import init_variables
        images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
        variables = init_variables(seed=0)
        out = {"devices": len(jax.devices())}
        for n in (1, 2):
            ex = fid.InceptionExtractor(variables, batch_size=3, size=75, devices=jax.devices()[:n])
            out[n] = {"batch": ex.batch_size, "feats": ex(images)[0].tolist()}
        json.dump(out, open(sys.argv[1], "w"))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, env=env, cwd=REPO, timeout=300)
    res = json.loads(out.read_text())
    assert res["devices"] == 2 and res["1"]["batch"] == 3 and res["2"]["batch"] == 4
    np.testing.assert_allclose(res["2"]["feats"], res["1"]["feats"], atol=1e-5)
