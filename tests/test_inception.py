"""The Flax FID Inception against pytorch-fid's network, and its weight loading.

The parity test builds pytorch-fid's ``InceptionV3(use_fid_inception=True)`` (the FIDInceptionA/C/E
network of pt_inception-2015-12-05) with random weights instead of the download, loads the same weights
into the Flax model through the converter, and compares pool features and logits on images that are
upsampled and downsampled to 299. It needs torch + torchvision + pytorch-fid and is skipped without them
(``pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid==0.3.0``); everything else here needs
neither torch nor the real weights.
"""

import os

import jax
import numpy as np
import pytest

from imm_jax.evaluation import inception
from imm_jax.evaluation.inception import (
    FID_WEIGHTS_URL,
    InceptionWeightsError,
    bilinear_matrix,
    init_variables,
    load_inception,
    preprocess,
    state_dict_from_variables,
    variables_from_state_dict,
)

PARITY_ATOL = 1e-4
# One compiled network for every (2, 299, 299, 3) input below; preprocess runs eagerly (cheap), so the
# forward and parity tests share a single XLA compilation.
_NETWORK = jax.jit(inception.InceptionV3().apply)


def _apply(variables, images):
    return tuple(np.asarray(a) for a in _NETWORK(variables, preprocess(images)))


@pytest.fixture(scope="module")
def random_variables():
    return init_variables(seed=1)


def _images(rng, n, h, w, c=3):
    return rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- resize


def test_bilinear_matrix_matches_pytorch_formula_by_hand():
    # Upsampling 2 -> 4 (align_corners=False): source indices -0.25 (clamped to 0), 0.25, 0.75, 1.25.
    np.testing.assert_allclose(bilinear_matrix(2, 4), [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    # Downsampling 4 -> 2 has no antialiasing: the two middle taps of each pair, 0.5 each.
    np.testing.assert_allclose(bilinear_matrix(4, 2), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    # 6 -> 4: sources 0.25, 1.75, 3.25, 4.75.
    np.testing.assert_allclose(bilinear_matrix(6, 4)[1], [0, 0.25, 0.75, 0, 0, 0])
    np.testing.assert_array_equal(bilinear_matrix(7, 7), np.eye(7))
    for n in (1, 3, 32, 300, 512):
        np.testing.assert_allclose(bilinear_matrix(n, 299).sum(axis=1), 1.0, rtol=1e-6)


def test_resize_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    for n in (1, 8, 32, 37, 299, 311, 320, 512, 1000):
        # Interpolating the identity along one axis gives torch's matrix: equal bit for bit.
        eye = torch.eye(n).reshape(1, 1, n, n)
        matrix = F.interpolate(eye, size=(299, n), mode="bilinear", align_corners=False)[0, 0].numpy()
        np.testing.assert_array_equal(bilinear_matrix(n, 299), matrix, err_msg=f"size {n}")
    rng = np.random.default_rng(0)
    for h, w in [(8, 13), (311, 300)]:
        x = rng.random((2, h, w, 3), dtype=np.float32)
        ours = np.asarray(inception.resize_bilinear(x, 299))
        ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                            align_corners=False).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_preprocess_range_grayscale_and_errors():
    rng = np.random.default_rng(0)
    rgb = _images(rng, 2, 9, 7)
    x = np.asarray(preprocess(rgb, 11))
    assert x.shape == (2, 11, 11, 3) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    np.testing.assert_allclose(np.asarray(preprocess(np.full((1, 5, 5, 3), 255, np.uint8), 7)), 1.0)
    np.testing.assert_allclose(np.asarray(preprocess(np.zeros((1, 5, 5, 3), np.uint8), 7)), -1.0)
    # uint8 and [0, 1] floats are the same input; grayscale (NHW or NHW1) is repeated to 3 channels.
    np.testing.assert_allclose(np.asarray(preprocess(rgb.astype(np.float32) / 255.0, 11)), x, atol=1e-6)
    gray = rgb[..., 0]
    rep = np.asarray(preprocess(np.repeat(gray[..., None], 3, axis=-1), 11))
    np.testing.assert_array_equal(np.asarray(preprocess(gray, 11)), rep)
    np.testing.assert_array_equal(np.asarray(preprocess(gray[..., None], 11)), rep)
    with pytest.raises(ValueError, match="NHWC"):
        preprocess(np.zeros((1, 5, 5, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((1, 5, 5, 3), np.int32))


# ---------------------------------------------------------------------------------------------- weights


def test_state_dict_round_trip_and_strictness(random_variables):
    sd = state_dict_from_variables(random_variables)
    assert len(sd) == 472 and sd["fc.weight"].shape == (1008, 2048)
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert sd["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert sd["Mixed_6e.branch7x7_2.conv.weight"].shape == (192, 192, 1, 7)
    n_params = sum(v.size for k, v in sd.items() if not k.endswith(("running_mean", "running_var")))
    assert n_params == 23_850_960  # fid_inception_v3().parameters(), counted with torch
    back = variables_from_state_dict({**sd, "Conv2d_1a_3x3.bn.num_batches_tracked": np.array(0)})
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, random_variables)

    missing = dict(sd)
    del missing["Mixed_5b.branch_pool.bn.running_var"]
    with pytest.raises(KeyError, match="Mixed_5b.branch_pool.bn.running_var"):
        variables_from_state_dict(missing)
    with pytest.raises(KeyError, match="AuxLogits"):
        variables_from_state_dict({**sd, "AuxLogits.fc.weight": np.zeros((1008, 768))})
    wrong = {**sd, "fc.bias": np.zeros(1000, np.float32)}
    with pytest.raises(ValueError, match="fc.bias"):
        variables_from_state_dict(wrong)


def test_npz_weights_load_without_torch(tmp_path, random_variables):
    path = inception.save_npz(state_dict_from_variables(random_variables), str(tmp_path / "inc.npz"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, load_inception(path), random_variables)
    # The CLI validates and copies a state dict (here already .npz; a .pth needs torch, tested below).
    out = tmp_path / "copy.npz"
    assert inception.main(["--convert", path, "--out", str(out)]) == 0
    jax.tree_util.tree_map(np.testing.assert_array_equal, load_inception(str(out)), random_variables)


def test_missing_weights_one_line_error_and_no_download(tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to download without allow_download")

    monkeypatch.setattr(inception.urllib.request, "urlopen", no_network)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(inception.ENV_WEIGHTS, raising=False)
    for path in (None, str(tmp_path / "nope.pth"), str(tmp_path / "nope.npz")):
        with pytest.raises(InceptionWeightsError) as info:
            load_inception(path)
        message = str(info.value)
        assert "\n" not in message and FID_WEIGHTS_URL in message and "--inception" in message
    with pytest.raises(SystemExit) as e:
        inception.main(["--convert", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o.npz")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and FID_WEIGHTS_URL in err and not os.path.exists(tmp_path / "o.npz")


def test_download_only_when_allowed_and_offline_error(tmp_path, monkeypatch, random_variables):
    import urllib.error

    calls = []

    def offline(url, timeout=None):
        calls.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(inception.urllib.request, "urlopen", offline)
    target = tmp_path / "w" / inception.FID_WEIGHTS_FILE
    with pytest.raises(InceptionWeightsError) as info:
        load_inception(str(target), allow_download=True)
    assert calls == [FID_WEIGHTS_URL]
    message = str(info.value)
    assert "\n" not in message and str(target) in message and FID_WEIGHTS_URL in message
    assert not os.path.exists(str(target) + ".part")


# ---------------------------------------------------------------------------------------------- network


def test_forward_shapes_and_batch_independence(random_variables):
    """The FID path (resize to 299) without torch: shapes, finiteness, images independent of each other."""
    images = _images(np.random.default_rng(0), 2, 20, 24)
    pool, logits = _apply(random_variables, images)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    assert np.all(np.isfinite(pool)) and np.all(pool >= 0) and pool.std() > 0.1  # means of ReLU outputs
    pool_rev, logits_rev = _apply(random_variables, images[::-1])
    np.testing.assert_allclose(pool_rev[::-1], pool, atol=1e-5)
    np.testing.assert_allclose(logits_rev[::-1], logits, atol=1e-5)


# ---------------------------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def pytorch_fid_nets(random_variables):
    """pytorch-fid's InceptionV3 (pool features, its own resize + normalisation) and the underlying
    fid_inception_v3() Inception3 (with the 1008-way fc), built with our random weights."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    pfi = pytest.importorskip("pytorch_fid.inception")
    sd = {k: torch.from_numpy(v) for k, v in state_dict_from_variables(random_variables).items()}
    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *args, **kwargs: dict(sd)  # instead of the download
    try:
        torch.manual_seed(0)
        features_net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                                       normalize_input=True, use_fid_inception=True).eval()
        full_net = pfi.fid_inception_v3().eval()
    finally:
        pfi.load_state_dict_from_url = original
    return torch, features_net, full_net


def test_parity_with_pytorch_fid(pytorch_fid_nets, random_variables):
    torch, features_net, full_net = pytorch_fid_nets
    rng = np.random.default_rng(0)
    # Upsampled (non-square, RGB) and downsampled (grayscale: ours repeats the channel, pytorch-fid's
    # loader does it with PIL's .convert('RGB')).
    batches = [_images(rng, 2, 37, 45), _images(rng, 2, 320, 310, 1)]
    worst = {"pool": 0.0, "logits": 0.0}
    for images in batches:
        pool, logits = _apply(random_variables, images)
        with torch.no_grad():
            rgb = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images
            x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255.0  # ToTensor
            ref_pool = features_net(x)[0].flatten(1)
            ref_logits = full_net.fc(ref_pool).numpy()
            if images.shape[-1] == 3:
                # torchvision's own Inception3.forward (with the FID blocks) on pytorch-fid's
                # preprocessed input gives the same logits as fc(pool features).
                pre = 2 * torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear",
                                                          align_corners=False) - 1
                np.testing.assert_allclose(full_net(pre).numpy(), ref_logits, atol=1e-5)
        ref_pool = ref_pool.numpy()
        assert np.abs(ref_pool).max() > 0.1 and np.abs(ref_logits).max() > 0.1  # not a trivial match
        worst["pool"] = max(worst["pool"], float(np.abs(pool - ref_pool).max()))
        worst["logits"] = max(worst["logits"], float(np.abs(logits - ref_logits).max()))
        print(f"{images.shape}: max |pool| {np.abs(ref_pool).max():.3f}, max |logits| "
              f"{np.abs(ref_logits).max():.3f}")
    print(f"max |flax - pytorch-fid|: pool {worst['pool']:.2e}, logits {worst['logits']:.2e}")
    assert worst["pool"] < PARITY_ATOL and worst["logits"] < PARITY_ATOL, worst


def test_pth_convert_cli(tmp_path, pytorch_fid_nets, random_variables):
    torch, _, full_net = pytorch_fid_nets
    pth = tmp_path / "pt_inception.pth"
    torch.save(full_net.state_dict(), pth)  # a real torch state dict (with num_batches_tracked)
    jax.tree_util.tree_map(np.testing.assert_array_equal, load_inception(str(pth)), random_variables)
    out = tmp_path / "inception.npz"
    assert inception.main(["--convert", str(pth), "--out", str(out)]) == 0
    jax.tree_util.tree_map(np.testing.assert_array_equal, load_inception(str(out)), random_variables)
