"""DiT with adaLN-Zero conditioning on (t, s, class), as in the IMM release (reference_networks.md "DiT").

Parameter names follow the reference state dict (``model.`` prefix dropped, ``.`` -> ``/``, list
index -> ``_i``): ``x_embedder`` (the patch conv), ``t_embedder/mlp_0``, ``t_embedder/mlp_2``,
``s_embedder/...``, ``y_embedder/embedding_table``, ``blocks_{i}/attn/qkv``, ``blocks_{i}/attn/proj``,
``blocks_{i}/mlp/fc1``, ``blocks_{i}/mlp/fc2``, ``blocks_{i}/adaLN_modulation`` (torch
``adaLN_modulation.1``), ``final_layer/adaLN_modulation``, ``final_layer/linear``. ``pos_embed`` is the fixed sin-cos
constant, not a parameter; an optional ``buffers/pos_embed`` variable (1, T, hidden) replaces it (only
for reference state dicts whose pos_embed is not that table).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imm_jax.models.layers import (Dense, augment_embedding, dense, dit_timestep_frequencies, gelu_tanh,
                                   layer_norm, normal, precise_cos_sin, remat_block, traced_platform,
                                   xavier_uniform, xavier_uniform_flat)

Dtype = Any

# (patch, hidden, depth, heads) of the DiT paper; mlp_ratio 4 for all.
_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
DIT_PRESETS = {
    f"{name}/{patch}": dict(patch_size=patch, hidden_size=h, depth=d, num_heads=n)
    for name, (h, d, n) in _SIZES.items() for patch in (2, 4, 8)
}

FREQUENCY_EMBEDDING_SIZE = 256

# jax.nn.dot_product_attention's implementations: None and "xla" are XLA's (logits and softmax in
# float32 whatever the compute dtype); "cudnn" is cuDNN's fused flash attention (NVIDIA GPUs, bf16/fp16).
ATTENTION_IMPLS = (None, "xla", "cudnn")


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
  """MAE's fixed 2-D sin-cos table (T, D) in float64: the first D/2 channels encode the token's column,
  the last D/2 its row; each half is [sin(p w_i), cos(p w_i)], w_i = 10000^(-i / (D/4))."""
  if embed_dim % 4:
    raise ValueError(f"DiT hidden_size must be divisible by 4 for the 2-D sin-cos table, got {embed_dim}")
  grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float64),
                               np.arange(grid_size, dtype=np.float64))  # w varies fastest

  def one_d(pos):
    omega = np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([one_d(grid_w), one_d(grid_h)], axis=1)


def modulate(x, shift, scale):
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


class TimestepEmbedder(nn.Module):
  """[cos, sin] frequency embedding (256, float64-grade) -> ``mlp_0`` -> SiLU -> ``mlp_2``."""

  hidden_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, labels):
    freqs = dit_timestep_frequencies(FREQUENCY_EMBEDDING_SIZE)
    cos, sin = precise_cos_sin(labels, freqs)
    emb = jnp.concatenate([cos, sin], axis=-1)
    init = normal(0.02)
    h = Dense(self.hidden_size, kernel_init=init, dtype=self.dtype, name="mlp_0")(emb)
    h = nn.silu(h)
    h = Dense(self.hidden_size, kernel_init=init, dtype=self.dtype, name="mlp_2")(h)
    return h.astype(jnp.float32)


class LabelEmbedder(nn.Module):
  """Class table; row ``num_classes`` is the null (unconditional) class."""

  num_rows: int
  hidden_size: int

  @nn.compact
  def __call__(self, labels):
    table = self.param("embedding_table", normal(0.02),
                       (self.num_rows, self.hidden_size), jnp.float32)
    return jnp.take(table, labels, axis=0)


def check_attention_impl(impl: str | None, dtype) -> None:
  """Fails at trace time, in one line, where cuDNN attention cannot run: jax's own errors come from
  deep inside the lowering ("cuDNN is not detected", "Q must be fp16/bf16")."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"unknown config.model.attention_impl {impl!r}: choose one of {ATTENTION_IMPLS}")
  if impl != "cudnn":
    return
  platform = traced_platform()
  if platform != "gpu":
    raise ValueError(f"config.model.attention_impl='cudnn' needs an NVIDIA GPU, but JAX runs on "
                     f"{platform}: leave it unset (None) or use 'xla'")
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"config.model.attention_impl='cudnn' needs bf16/fp16 compute, got "
                     f"{jnp.dtype(dtype).name}: set config.model.dtype=bfloat16")


class QKV(nn.Module):
  """timm's ``qkv`` Linear (``kernel`` (C, 3C), ``bias`` (3C), output layout [3][heads][head_dim]) as
  three products on the kernel's column blocks, returning (q, k, v).

  The parameters and values of one Dense whose output is sliced in three, without the slicing: fused
  attention takes q, k and v as dense arrays, so on a GPU the slices are a copy of the whole output,
  which the three GEMMs write directly (docs/benchmarks.md)."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.features
    kernel = self.param("kernel", xavier_uniform(), (x.shape[-1], 3 * c), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (3 * c,), jnp.float32)
    x, bias = x.astype(self.dtype), bias.astype(self.dtype)
    return tuple(dense(x, kernel[:, i * c:(i + 1) * c]) + bias[i * c:(i + 1) * c] for i in range(3))


class Attention(nn.Module):
  """timm Attention: ``qkv`` (bias) with output layout [3][heads][head_dim], softmax(q k^T / sqrt(d)) v,
  ``proj``."""

  num_heads: int
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x):
    check_attention_impl(self.attention_impl, self.dtype)
    b, n, c = x.shape
    hd = c // self.num_heads
    q, k, v = (y.reshape(b, n, self.num_heads, hd) for y in QKV(c, dtype=self.dtype, name="qkv")(x))
    a = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
    a = a.reshape(b, n, c)
    return Dense(c, kernel_init=xavier_uniform(), dtype=self.dtype, name="proj")(a)


class Mlp(nn.Module):
  hidden_features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    h = Dense(self.hidden_features, kernel_init=xavier_uniform(), dtype=self.dtype, name="fc1")(x)
    h = gelu_tanh(h)
    return Dense(c, kernel_init=xavier_uniform(), dtype=self.dtype, name="fc2")(h)


class DiTBlock(nn.Module):
  """adaLN-Zero block: x += gate_msa attn(mod(norm1 x)); x += gate_mlp mlp(mod(norm2 x))."""

  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x, c):
    mod = Dense(6 * self.hidden_size, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                name="adaLN_modulation")(nn.silu(c))
    mod = mod.astype(jnp.float32)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    h = modulate(layer_norm(x), shift_msa, scale_msa)
    h = Attention(self.num_heads, dtype=self.dtype, attention_impl=self.attention_impl,
                  name="attn")(h.astype(self.dtype))
    x = x + gate_msa[:, None, :] * h.astype(jnp.float32)
    h = modulate(layer_norm(x), shift_mlp, scale_mlp)
    h = Mlp(int(self.hidden_size * self.mlp_ratio), dtype=self.dtype, name="mlp")(h.astype(self.dtype))
    return x + gate_mlp[:, None, :] * h.astype(jnp.float32)


class FinalLayer(nn.Module):
  hidden_size: int
  out_features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    mod = Dense(2 * self.hidden_size, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                name="adaLN_modulation")(nn.silu(c)).astype(jnp.float32)
    shift, scale = jnp.split(mod, 2, axis=-1)
    h = modulate(layer_norm(x), shift, scale)
    return Dense(self.out_features, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                 name="linear")(h.astype(self.dtype))


class PatchEmbed(nn.Module):
  """The reference's patch conv (p x p, stride p; params ``kernel`` (p, p, C, hidden) HWIO and ``bias``)
  as the product it is: each token is its p x p x C patch times the flattened kernel (layers.dense, so
  the kernel's gradient is summed in float32 on every platform). Returns (N, tokens, hidden)."""

  hidden_size: int
  patch_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, hgt, wid, ch = x.shape
    p = self.patch_size
    kernel = self.param("kernel", xavier_uniform_flat(), (p, p, ch, self.hidden_size), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.hidden_size,), jnp.float32)
    patches = x.astype(self.dtype).reshape(n, hgt // p, p, wid // p, p, ch).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, (hgt // p) * (wid // p), p * p * ch)
    return dense(patches, kernel.reshape(p * p * ch, self.hidden_size)) + bias.astype(self.dtype)


class DiT(nn.Module):
  """Diffusion transformer G(x, c_t, c_s, y) on NHWC inputs (IMM's DiT; out_channels = in_channels).

  ``labels``: int (N,) with ``num_classes`` meaning null, or None (every row null). The table has
  num_classes + 1 rows, + 1 unused row when ``extra_null_row`` (the reference adds it when trained with
  its internal label dropout; kept only so such checkpoints load). ``augment_labels``: (N, augment_dim)
  augmentation parameters (imm_jax.augment; None = zeros = no augmentation), mapped without bias
  (``augment_embedder``) and added to the conditioning vector; ``augment_dim`` 0 has no such input.

  ``remat`` (layers.REMAT_OPTIONS) and ``attention_impl`` (ATTENTION_IMPLS) change how the blocks are
  computed, not their parameters or (beyond rounding) their outputs.
  """

  input_size: int
  in_channels: int
  patch_size: int = 2
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 0
  s_embed: bool = True
  extra_null_row: bool = False
  augment_dim: int = 0
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  remat: str = "none"

  @nn.compact
  def __call__(self, x, c_t, c_s, labels=None, train: bool = False, augment_labels=None):
    del train  # no dropout in DiT
    n, hgt, wid, ch = x.shape
    p = self.patch_size
    if hgt != self.input_size or wid != self.input_size or ch != self.in_channels:
      raise ValueError(f"DiT built for {self.input_size}x{self.input_size}x{self.in_channels} inputs, "
                       f"got {x.shape[1:]}")
    if hgt % p:
      raise ValueError(f"DiT input_size {hgt} is not divisible by patch_size {p} (config.model.patch_size)")
    gh = hgt // p

    tokens = PatchEmbed(self.hidden_size, p, dtype=self.dtype, name="x_embedder")(x).astype(jnp.float32)
    if self.has_variable("buffers", "pos_embed"):
      # A reference pos_embed that is not the sin-cos table (see convert.reference.variables_from_state_dict).
      pos = jnp.asarray(self.get_variable("buffers", "pos_embed"), jnp.float32).reshape(gh * gh, -1)
    else:
      pos = jnp.asarray(get_2d_sincos_pos_embed(self.hidden_size, gh).astype(np.float32))
    tokens = tokens + pos[None]

    c_t = jnp.broadcast_to(jnp.asarray(c_t, jnp.float32).reshape(-1), (n,))
    c = TimestepEmbedder(self.hidden_size, dtype=self.dtype, name="t_embedder")(c_t)
    if self.s_embed and c_s is not None:
      c_s = jnp.broadcast_to(jnp.asarray(c_s, jnp.float32).reshape(-1), (n,))
      c = c + TimestepEmbedder(self.hidden_size, dtype=self.dtype, name="s_embedder")(c_s)
    if labels is None:
      labels = jnp.full((n,), self.num_classes, jnp.int32)
    num_rows = self.num_classes + 1 + int(self.extra_null_row)
    c = c + LabelEmbedder(num_rows, self.hidden_size, name="y_embedder")(labels)
    if self.augment_dim:
      c = c + augment_embedding(self.augment_dim, self.hidden_size, augment_labels, n, normal(0.02),
                                "augment_embedder")

    h = tokens
    block_cls = remat_block(DiTBlock, self.remat)
    for i in range(self.depth):
      h = block_cls(self.hidden_size, self.num_heads, self.mlp_ratio, dtype=self.dtype,
                    attention_impl=self.attention_impl, name=f"blocks_{i}")(h, c)
    h = FinalLayer(self.hidden_size, p * p * self.in_channels, dtype=self.dtype,
                   name="final_layer")(h, c)
    # Unpatchify: per token the outputs are (p_row, p_col, channel).
    h = h.astype(jnp.float32).reshape(n, gh, gh, p, p, self.in_channels)
    h = h.transpose(0, 1, 3, 2, 4, 5).reshape(n, hgt, wid, self.in_channels)
    return h
