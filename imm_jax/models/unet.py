"""EDM's SongUNet (DDPM++ / NCSN++) with IMM's second time branch (reference_networks.md "SongUNet").

Parameter names follow the reference state dict (``model.`` prefix dropped, ``.`` -> ``/``, the
``enc.`` / ``dec.`` dict prefix joined with ``_``): ``map_label``, ``map_layer0``, ``map_layer1``,
``map_layer0_s``, ``map_layer1_s``, ``enc_16x16_conv``, ``enc_16x16_block0/{norm0,conv0,affine,norm1,
conv1,skip,norm2,qkv,proj}``, ``enc_8x8_down/...``, ``dec_8x8_in0``, ``dec_8x8_in1``, ``dec_16x16_up``,
``dec_16x16_block{i}``, ``dec_16x16_aux_norm``, ``dec_16x16_aux_conv``. Conv kernels are HWIO, Dense
kernels (in, out), GroupNorm ``scale``/``bias`` (torch ``weight``/``bias``).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imm_jax.models.layers import (Conv2d, Dense, GroupNorm, augment_embedding, edm_positional_frequencies,
                                   normal, precise_cos_sin, remat_block, xavier_uniform)

Dtype = Any

EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")

# EDM's SongUNet init: xavier_uniform everywhere, zero biases; the last conv of each residual branch
# and of the output scaled by 1e-5, the attention qkv by sqrt(0.2).
_INIT = xavier_uniform()
_INIT_ZERO = xavier_uniform(1e-5)
_INIT_ATTN = xavier_uniform(float(np.sqrt(0.2)))


def dropout(x, rate: float, rng):
  """Inverted dropout as torch.nn.functional.dropout. The mask is drawn flat and reshaped (a 4-D draw
  costs XLA:CPU seconds of compile time per call site, see layers.py)."""
  keep = jax.random.bernoulli(rng, 1.0 - rate, (x.size,)).reshape(x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class UNetBlock(nn.Module):
  """EDM UNetBlock as configured by SongUNet: adaptive_scale=False, skip_scale=sqrt(1/2), eps 1e-6,
  resample_proj=True, one attention head."""

  out_channels: int
  up: bool = False
  down: bool = False
  attention: bool = False
  num_heads: int = 1
  dropout: float = 0.0
  skip_scale: float = float(np.sqrt(0.5))
  eps: float = 1e-6
  resample_filter: Sequence[float] = (1, 1)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train: bool = False):
    cin = x.shape[-1]
    cout = self.out_channels
    orig = x
    h = nn.silu(GroupNorm(eps=self.eps, name="norm0")(x))
    h = Conv2d(cout, 3, up=self.up, down=self.down, resample_filter=self.resample_filter,
               kernel_init=_INIT, dtype=self.dtype, name="conv0")(h)
    params = Dense(cout, kernel_init=_INIT, dtype=self.dtype, name="affine")(emb)
    h = h.astype(jnp.float32) + params.astype(jnp.float32)[:, None, None, :]
    h = nn.silu(GroupNorm(eps=self.eps, name="norm1")(h))
    if train and self.dropout > 0:
      h = dropout(h, self.dropout, self.make_rng("dropout"))
    h = Conv2d(cout, 3, kernel_init=_INIT_ZERO, dtype=self.dtype, name="conv1")(h)
    if cout != cin or self.up or self.down:
      orig = Conv2d(cout, 1, up=self.up, down=self.down, resample_filter=self.resample_filter,
                    kernel_init=_INIT, dtype=self.dtype, name="skip")(orig)
    x = (h.astype(jnp.float32) + orig.astype(jnp.float32)) * self.skip_scale

    if self.attention:
      n, hh, ww, c = x.shape
      heads = self.num_heads
      qkv = Conv2d(3 * c, 1, kernel_init=_INIT_ATTN, dtype=self.dtype,
                   name="qkv")(GroupNorm(eps=self.eps, name="norm2")(x))
      # Reference channel layout of qkv: [head][channel][3].
      qkv = qkv.reshape(n, hh * ww, heads, c // heads, 3)
      q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
      a = jax.nn.dot_product_attention(q, k, v)
      a = a.reshape(n, hh, ww, c)
      a = Conv2d(c, 1, kernel_init=_INIT_ZERO, dtype=self.dtype, name="proj")(a)
      x = (a.astype(jnp.float32) + x) * self.skip_scale
    return x


class FourierFrequencies(nn.Module):
  """NCSN++ FourierEmbedding frequencies (torch buffer ``freqs`` ~ N(0, scale^2)). Stored as a
  parameter so that converted checkpoints load; gradients are stopped (keep weight decay off it)."""

  num_channels: int
  scale: float = 16.0

  @nn.compact
  def __call__(self, labels):
    freqs = self.param("freqs", normal(self.scale), (self.num_channels // 2,), jnp.float32)
    freqs = jax.lax.stop_gradient(freqs)
    x = jnp.asarray(labels, jnp.float32)[:, None] * (2 * np.pi * freqs)[None, :]
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=-1)


class SongUNet(nn.Module):
  """G(x, c_t, c_s, y) on NHWC inputs.

  ``labels``: int (N,) with ``label_dim`` meaning null (embedded as the all-zero one-hot, like the
  reference's unconditional rows), or None for unconditional models. ``augment_labels``: (N,
  augment_dim) augmentation parameters (imm_jax.augment; None = zeros = no augmentation) through EDM's
  ``map_augment`` (bias-free, added next to the class embedding); ``augment_dim`` 0 has no such input.
  ``remat``: layers.REMAT_OPTIONS, applied to every UNetBlock (parameters unchanged).
  """

  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 128
  channel_mult: Sequence[int] = (2, 2, 2)
  channel_mult_emb: int = 4
  num_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.10
  embedding_type: str = "positional"
  channel_mult_noise: int = 1
  encoder_type: str = "standard"
  decoder_type: str = "standard"
  resample_filter: Sequence[int] = (1, 1)
  s_embed: bool = True
  fourier_scale: float = 16.0
  dtype: Dtype = jnp.float32
  remat: str = "none"

  def _check(self):
    for field, value, choices in (("embedding_type", self.embedding_type, EMBEDDING_TYPES),
                                  ("encoder_type", self.encoder_type, ENCODER_TYPES),
                                  ("decoder_type", self.decoder_type, DECODER_TYPES)):
      if value not in choices:
        raise ValueError(f"SongUNet: unsupported {field} {value!r} (config.model.{field}): "
                         f"choose one of {choices}")

  def _noise_embedding(self, labels, name):
    noise_channels = self.model_channels * self.channel_mult_noise
    if self.embedding_type == "positional":
      cos, sin = precise_cos_sin(labels, edm_positional_frequencies(noise_channels, endpoint=True))
      return jnp.concatenate([sin, cos], axis=-1)  # EDM's [cos, sin] with the halves swapped
    emb = FourierFrequencies(noise_channels, self.fourier_scale, name=name)(labels)
    half = noise_channels // 2
    return jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)

  @nn.compact
  def __call__(self, x, c_t, c_s, labels=None, train: bool = False, augment_labels=None):
    self._check()
    n = x.shape[0]
    emb_channels = self.model_channels * self.channel_mult_emb
    block = dict(dropout=self.dropout, resample_filter=tuple(self.resample_filter), dtype=self.dtype)
    block_cls = remat_block(UNetBlock, self.remat, static_argnums=(3,))  # train: (self, x, emb, train)
    dense = lambda feats, name: Dense(feats, kernel_init=_INIT, name=name)

    # Mapping (float32 throughout: the reference runs it in float64).
    c_t = jnp.broadcast_to(jnp.asarray(c_t, jnp.float32).reshape(-1), (n,))
    emb = self._noise_embedding(c_t, "map_noise")
    if self.label_dim:
      if labels is None:
        labels = jnp.full((n,), self.label_dim, jnp.int32)
      onehot = jax.nn.one_hot(labels, self.label_dim, dtype=jnp.float32)  # null -> all-zero row
      emb = emb + dense(emb.shape[-1], "map_label")(onehot * np.sqrt(self.label_dim))
    if self.augment_dim:
      emb = emb + augment_embedding(self.augment_dim, emb.shape[-1], augment_labels, n, _INIT, "map_augment")
    emb = dense(emb_channels, "map_layer1")(nn.silu(dense(emb_channels, "map_layer0")(emb)))
    if self.s_embed and c_s is not None:
      c_s = jnp.broadcast_to(jnp.asarray(c_s, jnp.float32).reshape(-1), (n,))
      emb_s = self._noise_embedding(c_s, "map_noise_s")
      emb = emb + dense(emb_channels, "map_layer1_s")(nn.silu(dense(emb_channels, "map_layer0_s")(emb_s)))
    emb = nn.silu(emb)

    # Encoder.
    skips = []
    aux = x
    cout = self.in_channels
    caux = self.in_channels
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      if level == 0:
        cout = self.model_channels
        x = Conv2d(cout, 3, kernel_init=_INIT, dtype=self.dtype, name=f"enc_{res}x{res}_conv")(x)
        x = x.astype(jnp.float32)
        skips.append(x)
      else:
        x = block_cls(cout, down=True, name=f"enc_{res}x{res}_down", **block)(x, emb, train)
        skips.append(x)
        if self.encoder_type == "skip":
          aux = Conv2d(caux, 0, down=True, resample_filter=tuple(self.resample_filter), dtype=self.dtype,
                       name=f"enc_{res}x{res}_aux_down")(aux).astype(jnp.float32)
          x = skips[-1] = x + Conv2d(cout, 1, kernel_init=_INIT, dtype=self.dtype,
                                     name=f"enc_{res}x{res}_aux_skip")(aux).astype(jnp.float32)
        elif self.encoder_type == "residual":
          r = Conv2d(cout, 3, down=True, resample_filter=tuple(self.resample_filter), fused_resample=True,
                     kernel_init=_INIT, dtype=self.dtype, name=f"enc_{res}x{res}_aux_residual")(aux)
          x = skips[-1] = aux = (x + r.astype(jnp.float32)) / np.sqrt(2)
          caux = cout
      for idx in range(self.num_blocks):
        cout = self.model_channels * mult
        x = block_cls(cout, attention=res in self.attn_resolutions, name=f"enc_{res}x{res}_block{idx}",
                      **block)(x, emb, train)
        skips.append(x)

    # Decoder.
    aux = None
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = self.img_resolution >> level
      if level == len(self.channel_mult) - 1:
        x = block_cls(cout, attention=True, name=f"dec_{res}x{res}_in0", **block)(x, emb, train)
        x = block_cls(cout, name=f"dec_{res}x{res}_in1", **block)(x, emb, train)
      else:
        x = block_cls(cout, up=True, name=f"dec_{res}x{res}_up", **block)(x, emb, train)
      for idx in range(self.num_blocks + 1):
        x = jnp.concatenate([x, skips.pop()], axis=-1)
        cout = self.model_channels * mult
        attn = idx == self.num_blocks and res in self.attn_resolutions
        x = block_cls(cout, attention=attn, name=f"dec_{res}x{res}_block{idx}", **block)(x, emb, train)
      if self.decoder_type == "skip" or level == 0:
        if self.decoder_type == "skip" and level < len(self.channel_mult) - 1:
          aux = Conv2d(self.out_channels, 0, up=True, resample_filter=tuple(self.resample_filter),
                       dtype=self.dtype, name=f"dec_{res}x{res}_aux_up")(aux).astype(jnp.float32)
        tmp = GroupNorm(eps=1e-6, name=f"dec_{res}x{res}_aux_norm")(x)
        tmp = Conv2d(self.out_channels, 3, kernel_init=_INIT_ZERO, dtype=self.dtype,
                     name=f"dec_{res}x{res}_aux_conv")(nn.silu(tmp)).astype(jnp.float32)
        aux = tmp if aux is None else tmp + aux
    return aux.astype(jnp.float32)
