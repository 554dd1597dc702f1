"""The FID Inception-v3 in Flax: the network pytorch-fid runs (the TF graph behind FID).

This is pytorch-fid's ``fid_inception_v3()``: torchvision's Inception3 with the blocks patched to the
TensorFlow graph ``inception-2015-12-05`` (``FIDInceptionA/C/E_1/E_2``: average pools that exclude the
padding from the count, a max pool in the last block), 1008 classes, no auxiliary head, loading the
``pt_inception-2015-12-05`` weights. Layout NHWC; every convolution and the classifier run at
``Precision.HIGHEST`` (float32 also on GPUs/TPUs, which would otherwise use TF32/bfloat16 passes).

* :func:`preprocess`: uint8 (or [0, 1] float) NHWC images of any size -> the network input, as
  pytorch-fid does it: ``x / 255``, grayscale repeated to 3 channels, ``F.interpolate(x, (299, 299),
  mode='bilinear', align_corners=False)`` (no antialiasing; torch's interpolation weights bit for
  bit), then ``2 x - 1``.
* :class:`InceptionV3`: ``(pool, logits)``: the 2048-d pool features FID uses and the 1008 logits of
  the TF graph's classifier (softmax over them for the Inception Score).
* :func:`load_inception`: the Flax variables from the pytorch-fid ``.pth`` state dict (needs torch:
  ``pip install 'imm_jax[torch]'``) or from a ``.npz`` of the same state dict (no torch needed), made by

      python -m imm_jax.evaluation.inception --convert pt_inception-2015-12-05-6726825d.pth --out inception.npz

  (``--download`` fetches the .pth first). Weights are never downloaded unless asked for
  (``allow_download=True``); a missing file is a one-line :class:`InceptionWeightsError` that says
  where to get it.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import urllib.error
import urllib.request
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imm_jax.io_utils import fail

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BN_EPS = 1e-3
ENV_WEIGHTS = "IMM_JAX_INCEPTION_WEIGHTS"  # a .pth or .npz path used when none is given

_HIGHEST = jax.lax.Precision.HIGHEST

__all__ = [
    "FID_WEIGHTS_URL", "FID_WEIGHTS_FILE", "INPUT_SIZE", "FEATURE_DIM", "NUM_CLASSES",
    "InceptionV3", "InceptionWeightsError", "preprocess", "resize_bilinear", "bilinear_matrix",
    "bilinear_taps",
    "variables_from_state_dict", "state_dict_from_variables", "read_state_dict", "save_npz",
    "load_inception", "fetch_weights", "default_weights_path", "init_variables", "main",
]


class InceptionWeightsError(FileNotFoundError):
    """The FID Inception weights are missing or unreadable (the message says where to get them)."""


# --------------------------------------------------------------------------------------------------
# Input pipeline


def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, ...]:
    """``(i0, i1, w0, w1)``: output pixel o of ``F.interpolate(mode='bilinear', align_corners=False,
    antialias=False)`` along one axis is ``w0[o] x[i0[o]] + w1[o] x[i1[o]]``.

    PyTorch's source index is ``max((dst + 0.5) * in / out - 0.5, 0)``; the output mixes the two pixels
    around it, the upper one clamped to the last pixel. Downsampling uses the same two taps (no
    antialiasing), which is what pytorch-fid does to images larger than 299. The index and weights are
    rounded as PyTorch's float32 kernels round them: ``scale = float32(in) / out``, the index as one
    fused multiply-add ``fma(scale, dst + 0.5, -0.5)`` (the product is exact in float64, so one rounding
    to float32 is the FMA), the weights in float32. This gives torch's interpolation weights bit for
    bit; exact arithmetic would differ by up to ~3e-5 for inputs of ~300 pixels.
    """
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    src = (np.float64(scale) * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(f32)
    src = np.maximum(src, f32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = np.clip(src - i0.astype(f32), f32(0.0), f32(1.0))
    return i0, i1, f32(1.0) - w1, w1


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix of ``bilinear_taps``: the same resize as a matrix product."""
    i0, i1, w0, w1 = bilinear_taps(in_size, out_size)
    m = np.zeros((out_size, in_size), np.float32)
    np.add.at(m, (np.arange(out_size), i0), w0)
    np.add.at(m, (np.arange(out_size), i1), w1)
    return m


def resize_bilinear(x: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """Bilinear resize of NHWC ``x`` to ``size``, equal to PyTorch's ``align_corners=False`` formula.

    Rows, then columns, each output its two source pixels (constant indices) times their weights
    (``bilinear_taps``); an identity when the size already matches. Not matrix products: XLA:GPU,
    compiling without a GPU (no autotuning), finds no Triton tiling for float32 GEMMs of these shapes
    at HIGHEST precision.
    """
    oh, ow = (size, size) if isinstance(size, int) else size
    _, h, w, _ = x.shape
    if (h, w) == (oh, ow):
        return x
    for axis, n_in, n_out in ((1, h, oh), (2, w, ow)):
        i0, i1, w0, w1 = bilinear_taps(n_in, n_out)
        shape = [1] * 4
        shape[axis] = n_out
        x = jnp.take(x, i0, axis=axis) * w0.reshape(shape) + jnp.take(x, i1, axis=axis) * w1.reshape(shape)
    return x


def preprocess(images, size: int | tuple[int, int] = INPUT_SIZE) -> jax.Array:
    """uint8 NHWC images (0..255), or floats already in [0, 1], of any size -> float32 (N, size, size, 3)
    in [-1, 1], as pytorch-fid prepares them (``ToTensor``, bilinear resize, ``2 x - 1``).

    A grayscale batch (NHW or NHW1) has its channel repeated to 3.
    """
    x = jnp.asarray(images)
    if x.ndim == 3:
        x = x[..., None]  # grayscale NHW
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must be NHWC with 1 or 3 channels, got shape {tuple(x.shape)}")
    if x.dtype == jnp.uint8:
        x = x.astype(jnp.float32) / 255.0
    elif jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    else:
        raise ValueError(f"images must be uint8 (0..255) or float in [0, 1], got {x.dtype}")
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    x = resize_bilinear(x, size)
    return 2.0 * x - 1.0


# --------------------------------------------------------------------------------------------------
# Network (module names = torchvision / pytorch-fid state-dict names)


def _pads(padding) -> tuple[tuple[int, int], tuple[int, int]]:
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return ((ph, ph), (pw, pw))


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU, as torchvision's."""

    features: int
    kernel_size: tuple[int, int] = (1, 1)
    strides: int = 1
    padding: int | tuple[int, int] = 0

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, self.kernel_size, strides=(self.strides, self.strides),
                    padding=_pads(self.padding), use_bias=False, precision=_HIGHEST, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_same(x):
    # TF's average pool, as FIDInception*: padded zeros are not counted (count_include_pad=False).
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class FIDInceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, name="branch1x1")(x)
        b5 = BasicConv2d(48, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):  # torchvision's, unpatched (Mixed_6a)
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = BasicConv2d(64, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, name="branch1x1")(x)
        b7 = BasicConv2d(c7, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):  # torchvision's, unpatched (Mixed_7a)
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """``FIDInceptionE_1`` (average pool, Mixed_7b) or ``FIDInceptionE_2`` (max pool, Mixed_7c)."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, name="branch1x1")(x)
        b3 = BasicConv2d(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.max_pool:
            # FIDInceptionE_2: the TF graph max-pools here (padding with -inf, as F.max_pool2d).
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3_same(x)
        bp = BasicConv2d(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3 on preprocessed NHWC input (see :func:`preprocess`).

    Returns ``(pool, logits)``: ``pool`` (N, 2048), the global average of Mixed_7c (pytorch-fid's
    ``InceptionV3()`` output, block 3, squeezed), and ``logits`` (N, 1008), ``fc(pool)`` (the TF graph's
    ``softmax/logits``). The network is fully convolutional: inputs smaller than 299 work down to 75x75
    (used by fast tests only; FID is defined at 299).
    """

    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x):
        x = BasicConv2d(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv2d(80, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = FIDInceptionA(32, name="Mixed_5b")(x)
        x = FIDInceptionA(64, name="Mixed_5c")(x)
        x = FIDInceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = FIDInceptionC(128, name="Mixed_6b")(x)
        x = FIDInceptionC(160, name="Mixed_6c")(x)
        x = FIDInceptionC(160, name="Mixed_6d")(x)
        x = FIDInceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = FIDInceptionE(max_pool=False, name="Mixed_7b")(x)
        x = FIDInceptionE(max_pool=True, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(self.num_classes, precision=_HIGHEST, name="fc")(pool)
        return pool, logits


@functools.lru_cache(maxsize=None)
def _param_shapes():
    """The variable tree's shapes (abstract init: no compute)."""
    model = InceptionV3()
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 75, 75, 3), jnp.float32))


def init_variables(seed: int = 0) -> dict:
    """Random variables of the right structure (numpy float32): conv/fc weights with variance-preserving
    scale, BatchNorm statistics and affine parameters near realistic values. For tests and smoke runs;
    FID with these is *not* comparable to anything."""
    rng = np.random.default_rng(seed)

    def draw(path, spec):
        name, shape = path[-1].key, tuple(spec.shape)
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        if name == "scale":
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        if name == "var":
            return rng.uniform(0.5, 2.0, shape).astype(np.float32)
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)  # bias, mean

    return jax.tree_util.tree_map_with_path(draw, _param_shapes())


# --------------------------------------------------------------------------------------------------
# Weights: state dict <-> Flax variables


def _flat(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _flat(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _torch_key(collection: str, path: tuple[str, ...]) -> str:
    *mods, leaf = path
    if mods[-1] == "fc":
        return ".".join(mods + ["weight" if leaf == "kernel" else "bias"])
    name = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
            ("batch_stats", "mean"): "running_mean",
            ("batch_stats", "var"): "running_var"}[(collection, leaf)]
    return ".".join(mods + [name])


def variables_from_state_dict(state_dict: Mapping[str, Any]) -> dict:
    """Flax variables ``{'params', 'batch_stats'}`` (numpy float32) from the pytorch-fid Inception state
    dict (``fid_inception_v3().state_dict()`` keys, e.g. ``Mixed_5b.branch1x1.conv.weight``; values torch
    tensors or arrays). Strict: a missing or unexpected key, or a wrong shape, is an error naming it
    (``num_batches_tracked`` is ignored)."""
    sd = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    shapes = _param_shapes()
    out: dict = {}
    used = set()
    for collection in ("params", "batch_stats"):
        for path, spec in _flat(shapes[collection]):
            key = _torch_key(collection, path)
            if key not in sd:
                raise KeyError(f"Inception state dict: missing key {key!r} "
                               "(is this pt_inception-2015-12-05?)")
            value = sd[key]
            if hasattr(value, "detach"):  # torch tensor
                value = value.detach().cpu().float().numpy()
            value = np.asarray(value, dtype=np.float32)
            if value.ndim == 4:  # conv OIHW -> HWIO
                value = value.transpose(2, 3, 1, 0)
            elif value.ndim == 2:  # linear (out, in) -> (in, out)
                value = value.T
            if value.shape != tuple(spec.shape):
                raise ValueError(f"Inception state dict: {key} has shape {value.shape} (as Flax), "
                                 f"expected {tuple(spec.shape)}")
            node = out.setdefault(collection, {})
            for p in path[:-1]:
                node = node.setdefault(p, {})
            node[path[-1]] = np.ascontiguousarray(value)
            used.add(key)
    extra = sorted(set(sd) - used)
    if extra:
        raise KeyError(f"Inception state dict: {len(extra)} unexpected keys, e.g. {extra[0]!r} "
                       "(the FID Inception has no AuxLogits; is this pt_inception-2015-12-05?)")
    return out


def state_dict_from_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse of :func:`variables_from_state_dict` (PyTorch layouts, float32 numpy)."""
    sd = {}
    for collection in ("params", "batch_stats"):
        for path, value in _flat(variables[collection]):
            value = np.asarray(value, dtype=np.float32)
            if value.ndim == 4:
                value = value.transpose(3, 2, 0, 1)
            elif value.ndim == 2:
                value = value.T
            sd[_torch_key(collection, path)] = np.ascontiguousarray(value)
    return sd


def _missing_message(path: str | None) -> str:
    where = f"{path} not found; " if path else "no Inception weights given; "
    return (f"{where}download {FID_WEIGHTS_URL} and pass its path (--inception PATH, or "
            f"load_inception(path) / ${ENV_WEIGHTS}; a .npz made by python -m imm_jax.evaluation.inception "
            f"--convert FILE.pth --out FILE.npz needs no torch), or allow the download (--download)")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The Inception state dict from a pytorch-fid ``.pth`` (needs torch) or a converted ``.npz``."""
    if not os.path.exists(path):
        raise InceptionWeightsError(_missing_message(path))
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    try:
        import torch
    except ImportError:
        raise InceptionWeightsError(
            f"reading {path} (a PyTorch file) needs torch: pip install 'imm_jax[torch]', or convert it "
            f"once where torch is installed: python -m imm_jax.evaluation.inception --convert {path} "
            "--out inception.npz, and pass the .npz") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file: say which
        raise InceptionWeightsError(f"could not read {path} as a PyTorch state dict ({e}); "
                                    f"download it again from {FID_WEIGHTS_URL}") from None
    if not isinstance(sd, Mapping):
        raise InceptionWeightsError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return {k: v.detach().cpu().float().numpy() for k, v in sd.items()
            if not k.endswith("num_batches_tracked")}


def save_npz(state_dict: Mapping[str, Any], out: str) -> str:
    """Write a state dict as ``.npz`` (one float32 array per key), atomically."""
    arrays = {k: np.asarray(v.detach().cpu().float().numpy() if hasattr(v, "detach") else v, np.float32)
              for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, out)
    return out


def default_weights_path() -> str:
    """Where :func:`fetch_weights` puts the .pth: ``$XDG_CACHE_HOME`` or ``~/.cache``, ``imm_jax/``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "imm_jax", FID_WEIGHTS_FILE)


def fetch_weights(path: str | None = None, *, timeout: float = 60.0, progress: bool = True) -> str:
    """Download the pytorch-fid weights to ``path`` (default :func:`default_weights_path`) unless there."""
    path = path or default_weights_path()
    if os.path.exists(path):
        return path
    part = path + ".part"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with urllib.request.urlopen(FID_WEIGHTS_URL, timeout=timeout) as response, open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0)
            from tqdm import tqdm

            with tqdm(total=total or None, unit="B", unit_scale=True, desc=FID_WEIGHTS_FILE,
                      disable=not progress, file=sys.stderr) as bar:
                while chunk := response.read(1 << 22):
                    f.write(chunk)
                    bar.update(len(chunk))
        os.replace(part, path)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        if os.path.exists(part):
            os.remove(part)
        reason = getattr(e, "reason", None) or e
        raise InceptionWeightsError(f"could not download the Inception weights ({reason}): download "
                                    f"{FID_WEIGHTS_URL} to {path} and rerun") from None
    return path


def load_inception(path: str | None = None, *, allow_download: bool = False) -> dict:
    """Flax variables of the FID Inception from ``path`` (.pth or .npz).

    Without ``path``: ``$IMM_JAX_INCEPTION_WEIGHTS``, else the cache (:func:`default_weights_path`, or
    the same name with .npz) if present, else -- only with ``allow_download`` -- downloaded there.
    Otherwise a one-line :class:`InceptionWeightsError` saying where to download the file.
    """
    if path is None:
        path = os.environ.get(ENV_WEIGHTS) or None
    if path is None:
        cached = default_weights_path()
        npz = os.path.splitext(cached)[0] + ".npz"
        if os.path.exists(npz):
            path = npz
        elif os.path.exists(cached) or allow_download:
            path = fetch_weights(cached)
        else:
            raise InceptionWeightsError(_missing_message(None))
    elif not os.path.exists(path):
        if not allow_download or path.endswith(".npz"):
            raise InceptionWeightsError(_missing_message(path))
        path = fetch_weights(path)
    return variables_from_state_dict(read_state_dict(path))


# --------------------------------------------------------------------------------------------------
# CLI


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m imm_jax.evaluation.inception",
        description="Convert the pytorch-fid Inception weights (.pth, needs torch) to a .npz that "
                    f"imm_jax reads without torch. Weights: {FID_WEIGHTS_URL}")
    p.add_argument("--convert", metavar="PTH", help="the pt_inception-2015-12-05-*.pth file")
    p.add_argument("--out", metavar="NPZ", help="the .npz to write")
    p.add_argument("--download", action="store_true",
                   help="download the .pth first (to --convert PTH, default the cache) if it is missing")
    args = p.parse_args(argv)
    if not args.out:
        p.error("--out NPZ is required")
    try:
        src = args.convert
        if args.download:
            src = fetch_weights(src)
        elif not src:
            p.error("give --convert PTH (or --download)")
        state_dict = read_state_dict(src)
        variables_from_state_dict(state_dict)  # validate before writing
        save_npz(state_dict, args.out)
    except (InceptionWeightsError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        fail(msg)
    print(f"wrote {args.out} ({len(np.load(args.out).files)} arrays) from {src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
