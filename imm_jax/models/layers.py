"""Building blocks shared by the networks: initialisers, sinusoidal embeddings, norms, convs, resampling.

Everything here mirrors a PyTorch operation of the reference code (EDM's ``networks.py`` and the DiT
``models.py`` as adapted by IMM) so that the networks compute the same function; layouts are NHWC.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


# --------------------------------------------------------------------------------------------------
# Initialisers (PyTorch's fan conventions).
#
# Random values are drawn as a flat vector and reshaped: with jax_threefry_partitionable (the default)
# XLA:CPU needs ~5 s to compile one 4-D draw against ~0.3 s for a 1-D one, which made initialising a
# small UNet take a minute.


def _flat_uniform(key, shape, dtype, limit):
  size = int(np.prod(shape))
  return jax.random.uniform(key, (size,), dtype, -limit, limit).reshape(shape)


def _torch_fans(shape) -> tuple[int, int]:
  """(fan_in, fan_out) of a Dense (in, out) or HWIO conv kernel, counted as torch does."""
  receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
  return int(shape[-2]) * receptive, int(shape[-1]) * receptive


def xavier_uniform(gain: float = 1.0):
  """U(-a, a) with a = gain * sqrt(6 / (fan_in + fan_out)); for an HWIO kernel the fans include kh*kw,
  as in EDM's ``weight_init`` and torch.nn.init.xavier_uniform_ on a conv weight."""

  def init(key, shape, dtype=jnp.float32):
    fan_in, fan_out = _torch_fans(shape)
    return _flat_uniform(key, shape, dtype, gain * math.sqrt(6.0 / (fan_in + fan_out)))

  return init


def xavier_uniform_flat():
  """xavier_uniform_ on a conv kernel viewed as a Linear (out, in*kh*kw), as DiT's patch embedding:
  fan_in = in*kh*kw, fan_out = out (not out*kh*kw)."""

  def init(key, shape, dtype=jnp.float32):
    fan_in, fan_out = int(np.prod(shape[:-1])), int(shape[-1])
    return _flat_uniform(key, shape, dtype, math.sqrt(6.0 / (fan_in + fan_out)))

  return init


def normal(stddev: float):
  """N(0, stddev^2), drawn flat."""

  def init(key, shape, dtype=jnp.float32):
    return stddev * jax.random.normal(key, (int(np.prod(shape)),), dtype).reshape(shape)

  return init


# --------------------------------------------------------------------------------------------------
# Sinusoidal embeddings with float64-grade arguments.

_DIGIT_BASE = 64
_DIGITS = 4  # exact rotation tables for |label| < 64^4 = 2^24 (every float32 integer)


def precise_cos_sin(labels, freqs: np.ndarray):
  """cos(labels * freqs) and sin(labels * freqs), shape (N, F), float32, accurate as if computed in float64.

  The reference evaluates these embeddings in float64 from float32 noise labels up to ~1000; plain
  float32 would be off by up to ~1000 * 2^-24 ~ 6e-5 per entry. The label is split as n + r with
  n = floor(|label|) and r in [0, 1): cos/sin of r*f is accurate in float32, and the rotation by n*f is
  composed from float64-precomputed tables of the base-64 digits of n (|label| < 2^24; larger labels
  are clipped). Table look-ups are one-hot matmuls at HIGHEST precision (exact, and far cheaper to
  compile on CPU than gathers).
  """
  freqs = np.asarray(freqs, np.float64)
  labels = jnp.asarray(labels, jnp.float32)
  sign = jnp.where(labels < 0, jnp.float32(-1.0), jnp.float32(1.0))[:, None]  # float32 under x64 too
  mag = jnp.abs(labels)
  n = jnp.floor(mag)
  r = (mag - n)[:, None]
  f32 = jnp.asarray(freqs.astype(np.float32))
  cos_acc, sin_acc = jnp.cos(r * f32), jnp.sin(r * f32)

  n_int = jnp.minimum(n, float(_DIGIT_BASE**_DIGITS - 1)).astype(jnp.int32)
  num_f = freqs.shape[0]
  for k in range(_DIGITS):
    digit = (n_int // (_DIGIT_BASE**k)) % _DIGIT_BASE
    angles = float(_DIGIT_BASE**k) * np.arange(_DIGIT_BASE, dtype=np.float64)[:, None] * freqs[None, :]
    table = jnp.asarray(np.concatenate([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32))
    cs = jnp.dot(jax.nn.one_hot(digit, _DIGIT_BASE, dtype=jnp.float32), table,
                 precision=jax.lax.Precision.HIGHEST)
    c, s = cs[:, :num_f], cs[:, num_f:]
    cos_acc, sin_acc = cos_acc * c - sin_acc * s, sin_acc * c + cos_acc * s
  return cos_acc, sign * sin_acc


def dit_timestep_frequencies(dim: int, max_period: float = 10000.0) -> np.ndarray:
  """DiT / GLIDE: f_i = exp(-ln(max_period) i / (dim/2)), i = 0..dim/2-1 (float64)."""
  half = dim // 2
  return np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / half)


def edm_positional_frequencies(num_channels: int, max_positions: float = 10000.0,
                               endpoint: bool = True) -> np.ndarray:
  """EDM PositionalEmbedding: f_i = (1/max_positions)^(i / (C/2 - endpoint)) (float64)."""
  half = num_channels // 2
  return (1.0 / max_positions) ** (np.arange(half, dtype=np.float64) / (half - (1 if endpoint else 0)))


# --------------------------------------------------------------------------------------------------
# Rematerialisation of the networks' blocks (config.model.remat).

# "block": only each block's inputs are kept for the backward pass and the whole block is recomputed
# there (jax.checkpoint_policies.nothing_saveable); the two policies keep the outputs of matrix
# products (all of them, or only those without batch dimensions, i.e. the Dense/conv layers but not
# the attention matrices) and recompute the cheap elementwise work (norms, activations, softmax).
REMAT_OPTIONS = ("none", "block", "dots_saveable", "dots_with_no_batch_dims_saveable")


def remat_block(block_cls, remat: str, static_argnums: tuple[int, ...] = ()):
  """``block_cls`` rematerialised as ``config.model.remat`` asks, or unchanged for "none".

  Trades compute for activation memory: "block" costs about one more forward pass of the blocks per
  training step and keeps one activation per block instead of every intermediate. ``nn.remat`` is a
  lifted transform that keeps the module's name, so the parameter tree (and every checkpoint) is the
  same with or without it. ``static_argnums`` counts ``self`` as 0 (flax's convention), e.g. a Python
  ``train`` flag.
  """
  if remat not in REMAT_OPTIONS:
    raise ValueError(f"unknown config.model.remat {remat!r}: choose one of {REMAT_OPTIONS}")
  if remat == "none":
    return block_cls
  policy = None if remat == "block" else getattr(jax.checkpoint_policies, remat)
  return nn.remat(block_cls, policy=policy, static_argnums=static_argnums)


# --------------------------------------------------------------------------------------------------
# The platform the networks are traced for.

_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("target_platform", default=None)


@contextlib.contextmanager
def target_platform(platform: str):
  """Networks built and traced inside are checked for, and computed as suits, ``platform`` ('gpu', 'tpu',
  'cpu') instead of JAX's default backend: for compiling ahead of time for another platform
  (``imm_jax.aot --target``)."""
  token = _TARGET_PLATFORM.set(platform)
  try:
    yield
  finally:
    _TARGET_PLATFORM.reset(token)


def traced_platform() -> str:
  """The platform of :func:`target_platform`, else JAX's default backend."""
  return _TARGET_PLATFORM.get() or jax.default_backend()


# --------------------------------------------------------------------------------------------------
# Weight products whose kernel gradients are summed in float32.
#
# With bf16 compute, autodiff computes a kernel's gradient with a bf16 GEMM (or convolution): the sum
# over the batch is accumulated in float32 inside it but written in bf16, and with the batch sharded
# over devices the SPMD partitioner adds the devices' partial gradients where they appear, in bf16 (an
# all-reduce that rounds at every hop; XLA does so on GPU and TPU). Through _weight_product the kernel's
# tangent is a float32 product of the bf16 input and the float32 tangent (its JVP rule below), so its
# transpose, in the backward pass, computes the kernel's gradient from the bf16 operands with float32
# accumulation and output: the devices' partial gradients are summed in float32 (as PyTorch DDP sums
# them) and nothing rounds them to bf16 on their way to the float32 parameter. Values, the input's
# gradient and forward-mode derivatives (jax.jvp in parameter space: moment-matching distillation's
# teacher) are the plain product's; in float32 nothing changes. Biases (0.1-0.7% of the parameters) are
# left to autodiff's bf16 sums: summing them in float32 as well made XLA:GPU write every cotangent out
# once more in float32 (5% of the DiT-XL/2 step at the H100 roofline, docs/benchmarks.md).

# The kernel-gradient GEMM rounds its operands to the compute dtype and accumulates in float32 (a dot
# algorithm): the kernel's tangent, and in the backward pass the output's cotangent (converted by the
# transpose), reach it in float32, and XLA:GPU would otherwise run a float32 (TF32) GEMM.
_FLOAT32_ACCUMULATION = {jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
                         jnp.dtype(jnp.float16): jax.lax.DotAlgorithmPreset.F16_F16_F32}


def _dense_op(x, kernel, preferred_element_type=None):
  precision = _FLOAT32_ACCUMULATION.get(jnp.dtype(x.dtype)) if preferred_element_type else None
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _weight_product(op: Callable, float32_kernel_gradient: bool, x, kernel):
  """op(x, kernel) in x's dtype; ``op(x, kernel, preferred_element_type)`` is bilinear."""
  return op(x, kernel.astype(x.dtype))


def _weight_product_jvp(op, float32_kernel_gradient, primals, tangents):
  x, kernel = primals
  dx, dkernel = tangents
  y = _weight_product(op, float32_kernel_gradient, x, kernel)
  terms = []
  if not isinstance(dx, jax.custom_derivatives.SymbolicZero):
    terms.append(op(dx, kernel.astype(x.dtype)))
  if not isinstance(dkernel, jax.custom_derivatives.SymbolicZero):
    # float32 in and out: nothing rounds the gradient between its sum and the float32 parameter (a
    # bf16 rounding there, XLA:TPU moves before the cross-device sum).
    terms.append(op(x, dkernel, jnp.float32) if float32_kernel_gradient else op(x, dkernel.astype(x.dtype)))
  dy = functools.reduce(jnp.add, (t.astype(y.dtype) for t in terms)) if terms else jnp.zeros_like(y)
  return y, dy


_weight_product.defjvp(_weight_product_jvp, symbolic_zeros=True)


def dense(x, kernel):
  """``x @ kernel`` over x's last axis in x's dtype (the float32 kernel cast to it), the kernel's
  gradient summed in float32 (see above)."""
  return _weight_product(_dense_op, True, x, kernel)


class Dense(nn.Module):
  """nn.Dense's layer (params ``kernel`` (in, out) and, with ``use_bias``, ``bias``; float32) computed in
  ``dtype`` through :func:`dense`."""

  features: int
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Dtype = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    y = dense(x.astype(self.dtype), kernel)
    if not self.use_bias:
      return y
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return y + bias.astype(self.dtype)


def augment_embedding(augment_dim: int, features: int, augment_labels, n: int, kernel_init, name: str):
  """The bias-free linear map of the (N, augment_dim) augmentation labels (imm_jax.augment) that SongUNet
  and DiT add to their conditioning embedding, in float32. None (the samplers) means zeros, i.e. an
  un-augmented image, so the result is then 0; the layer is still applied so that its parameters exist
  whether or not labels are given."""
  if augment_labels is None:
    augment_labels = jnp.zeros((n, augment_dim), jnp.float32)
  if augment_labels.shape != (n, augment_dim):
    raise ValueError(f"augmentation labels of shape {augment_labels.shape} for a network with "
                     f"augment_dim={augment_dim} (config.model.augment_dim) and batch {n}")
  return Dense(features, kernel_init=kernel_init, use_bias=False, name=name)(
      jnp.asarray(augment_labels, jnp.float32))


# --------------------------------------------------------------------------------------------------
# Activations.


@jax.checkpoint
def gelu_tanh(x):
  """GELU with the tanh approximation (torch's ``approximate="tanh"``, DiT's MLP) whose backward pass
  keeps only the input.

  Values and derivatives are jax.nn.gelu's. Left to autodiff, the backward pass keeps intermediates of
  the forward (the tanh term), so a training step writes and re-reads a second activation of the MLP's
  width and, on GPU, cannot use the fc1 GEMM's GELU epilogue. Rematerialised (``jax.checkpoint``, whose
  optimisation barrier stops XLA from merging the recomputation back into the forward pass), the
  backward recomputes the elementwise GELU from the input, and compiled for an H100 with cuBLAS GEMMs
  the fc1 GEMM writes its output and the GELU in one kernel (docs/benchmarks.md). Forward-mode (jax.jvp,
  moment-matching distillation's teacher) is unaffected.
  """
  return jax.nn.gelu(x, approximate=True)


# --------------------------------------------------------------------------------------------------
# Normalisation (statistics in float32, biased variance as torch).


def layer_norm(x, eps: float = 1e-6):
  """LayerNorm over the last axis without affine parameters, in float32."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  xc = x - mean
  var = jnp.mean(xc * xc, axis=-1, keepdims=True)
  return xc * jax.lax.rsqrt(var + eps)


class GroupNorm(nn.Module):
  """EDM GroupNorm: groups = min(num_groups, C // min_channels_per_group), affine, stats in float32.

  Params: ``scale`` (torch ``weight``) and ``bias``. Returns float32.
  """

  num_groups: int = 32
  min_channels_per_group: int = 4
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    groups = min(self.num_groups, c // self.min_channels_per_group)
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    x = x.astype(jnp.float32)
    xg = x.reshape(x.shape[:-1] + (groups, c // groups))
    axes = tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,)
    mean = jnp.mean(xg, axis=axes, keepdims=True)
    xc = xg - mean
    var = jnp.mean(xc * xc, axis=axes, keepdims=True)
    y = (xc * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    return y * scale + bias


# --------------------------------------------------------------------------------------------------
# EDM's Conv2d with optional up/down resampling (NHWC).


def resample_filter_2d(resample_filter: Sequence[float]) -> np.ndarray:
  """outer(f, f) / sum(f)^2 as float32 (the reference ``resample_filter`` buffer, without its 1x1 dims)."""
  f = np.asarray(resample_filter, np.float32)
  return (np.outer(f, f) / np.square(f.sum())).astype(np.float32)


def _depthwise(x, f2d: np.ndarray, *, stride: int, padding, lhs_dilation: int = 1):
  c = x.shape[-1]
  k = jnp.asarray(np.tile(f2d[:, :, None, None], (1, 1, 1, c)), x.dtype)  # HWIO, I = 1 (grouped)
  return jax.lax.conv_general_dilated(
      x, k, window_strides=(stride, stride), padding=padding, lhs_dilation=(lhs_dilation,) * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


def downsample(x, f2d: np.ndarray):
  """conv2d(x, f tiled per channel, groups=C, stride=2, padding=(k-1)//2)."""
  p = (f2d.shape[0] - 1) // 2
  return _depthwise(x, f2d, stride=2, padding=((p, p), (p, p)))


def upsample(x, f2d: np.ndarray):
  """conv_transpose2d(x, 4 f tiled per channel, groups=C, stride=2, padding=(k-1)//2)."""
  k = f2d.shape[0]
  p = k - 1 - (k - 1) // 2
  return _depthwise(x, (4.0 * f2d)[::-1, ::-1], stride=1, padding=((p, p), (p, p)), lhs_dilation=2)


def _conv_op(padding: int):
  def op(x, kernel, preferred_element_type=None):
    # The kernel's tangent (float32) meets a bf16 x: convolutions take one dtype, and the TPU's default
    # precision multiplies float32 operands in one bf16 pass.
    x = x.astype(kernel.dtype) if preferred_element_type else x
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=preferred_element_type)
  return op


def conv2d(x, kernel, padding: int):
  """Stride-1 convolution of NHWC ``x`` with the HWIO float32 ``kernel``, in x's dtype, the kernel's
  gradient summed in float32 as by :func:`dense` (1x1 kernels are a :func:`dense`), except on GPUs for
  larger kernels: cuDNN computes a weight gradient from bf16 operands only in bf16, and for a float32
  output XLA would run the convolution in float32."""
  if kernel.shape[:2] == (1, 1) and padding == 0:
    return dense(x, kernel.reshape(kernel.shape[2:]))
  return _weight_product(_conv_op(padding), traced_platform() != "gpu", x, kernel)


class Conv2d(nn.Module):
  """EDM Conv2d: optional depthwise up/down resampling by ``resample_filter``, then a k x k conv with
  'same' padding k // 2 (kernel == 0: resampling only). ``fused_resample`` is the NCSN++ variant
  (down: conv with padding k//2 + (f-1)//2, then the stride-2 filter).

  Params: ``kernel`` (HWIO; torch (out, in, kh, kw)) and ``bias``.
  """

  features: int
  kernel_size: int
  use_bias: bool = True
  up: bool = False
  down: bool = False
  resample_filter: Sequence[float] = (1, 1)
  fused_resample: bool = False
  kernel_init: Any = xavier_uniform()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.up and self.down:
      raise ValueError("Conv2d: up and down are exclusive")
    cin = x.shape[-1]
    ks = self.kernel_size
    w = self.param("kernel", self.kernel_init, (ks, ks, cin, self.features), jnp.float32) if ks else None
    b = (self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
         if ks and self.use_bias else None)
    f2d = resample_filter_2d(self.resample_filter) if (self.up or self.down) else None
    x = x.astype(self.dtype)
    w_pad = ks // 2
    if self.fused_resample and self.up and w is not None:
      raise ValueError("Conv2d: fused up-resampling is not used by SongUNet and is not implemented")
    if self.fused_resample and self.down and w is not None:
      f_pad = (f2d.shape[0] - 1) // 2
      x = conv2d(x, w, w_pad + f_pad)
      x = _depthwise(x, f2d, stride=2, padding=((0, 0), (0, 0)))
    else:
      if self.up:
        x = upsample(x, f2d)
      if self.down:
        x = downsample(x, f2d)
      if w is not None:
        x = conv2d(x, w, w_pad)
    if b is not None:
      x = x + b.astype(self.dtype)
    return x
