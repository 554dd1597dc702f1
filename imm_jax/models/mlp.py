"""A small residual MLP G(x, c_t, c_s, y) for vector (e.g. 2-D toy) data.

Parameter names: ``t_embedder/{mlp_0,mlp_2}``, ``s_embedder/{mlp_0,mlp_2}``, ``y_embedder/embedding_table``,
``in_proj``, ``blocks_{i}/{norm,fc1,emb,fc2}``, ``out_norm``, ``out_proj`` (zero-initialised, so G = 0 at init).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from imm_jax.models.dit import LabelEmbedder
from imm_jax.models.layers import Dense, dit_timestep_frequencies, precise_cos_sin, remat_block, xavier_uniform

Dtype = Any


class _NoiseEmbedder(nn.Module):
  hidden: int
  frequency_size: int = 64
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, labels):
    cos, sin = precise_cos_sin(labels, dit_timestep_frequencies(self.frequency_size))
    h = jnp.concatenate([cos, sin], axis=-1)
    h = Dense(self.hidden, kernel_init=xavier_uniform(), dtype=self.dtype, name="mlp_0")(h)
    return Dense(self.hidden, kernel_init=xavier_uniform(), dtype=self.dtype,
                 name="mlp_2")(nn.silu(h)).astype(jnp.float32)


class _ResBlock(nn.Module):
  """h + fc2(SiLU(fc1(LN h) + emb(c)))."""

  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, emb):
    dense = lambda name: Dense(self.hidden, kernel_init=xavier_uniform(), dtype=self.dtype, name=name)
    y = nn.LayerNorm(use_fast_variance=False, dtype=jnp.float32, name="norm")(h)
    y = dense("fc1")(y) + dense("emb")(emb)
    return h + dense("fc2")(nn.silu(y)).astype(jnp.float32)


class MLP(nn.Module):
  """Residual MLP on (N, D) inputs; returns (N, D). ``labels``: int (N,) with ``num_classes`` = null."""

  hidden: int = 256
  depth: int = 4
  num_classes: int = 0
  s_embed: bool = True
  dtype: Dtype = jnp.float32
  remat: str = "none"  # layers.REMAT_OPTIONS, as for the other networks

  @nn.compact
  def __call__(self, x, c_t, c_s, labels=None, train: bool = False):
    del train
    n, d = x.shape
    c_t = jnp.broadcast_to(jnp.asarray(c_t, jnp.float32).reshape(-1), (n,))
    emb = _NoiseEmbedder(self.hidden, dtype=self.dtype, name="t_embedder")(c_t)
    if self.s_embed and c_s is not None:
      c_s = jnp.broadcast_to(jnp.asarray(c_s, jnp.float32).reshape(-1), (n,))
      emb = emb + _NoiseEmbedder(self.hidden, dtype=self.dtype, name="s_embedder")(c_s)
    if self.num_classes:
      if labels is None:
        labels = jnp.full((n,), self.num_classes, jnp.int32)
      emb = emb + LabelEmbedder(self.num_classes + 1, self.hidden, name="y_embedder")(labels)
    emb = nn.silu(emb)

    h = Dense(self.hidden, kernel_init=xavier_uniform(), dtype=self.dtype, name="in_proj")(x)
    h = h.astype(jnp.float32)
    block_cls = remat_block(_ResBlock, self.remat)
    for i in range(self.depth):
      h = block_cls(self.hidden, dtype=self.dtype, name=f"blocks_{i}")(h, emb)
    h = nn.LayerNorm(use_fast_variance=False, dtype=jnp.float32, name="out_norm")(h)
    out = Dense(d, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="out_proj")(h)
    return out.astype(jnp.float32)
