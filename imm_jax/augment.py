"""Non-leaking geometric augmentation for image training (EDM's CIFAR-10 recipe, after StyleGAN2-ADA).

The paper's CIFAR-10 run uses EDM's augmentation (spec imm.md section 5). The pipeline here is written
from the papers' descriptions (the geometric augmentations of Karras et al. 2020, "Training generative
adversarial networks with limited data", and their use with conditioning in Karras et al. 2022,
"Elucidating the design space of diffusion-based generative models"), not from their code; its label
layout is its own. Each image independently draws, each with probability ``p``:

  * ``yflip``: a vertical flip by a fair coin;
  * ``scale``: isotropic scaling by 2^N(0, scale_std^2) about the centre;
  * ``rotate``: rotation by U(-pi, pi);
  * ``aniso``: stretching by 2^N(0, aniso_std^2) along a direction w ~ U(-pi, pi) and by its inverse
    across it;
  * ``translate``: a shift by N(0, translate_std^2) image widths along each axis;

and, with ``xflip``, a horizontal flip by a fair coin on every image (EDM sets the x-flip strength so
high that every image draws it). What was drawn is summarised in ``AUGMENT_DIM`` = 9 numbers per image,
all zero for an image left as it is:

  [x-flip, y-flip, log2 scale, cos(angle) - 1, sin(angle), log2 stretch * cos 2w, log2 stretch * sin 2w,
   shift x, shift y]

A network given them (``config.model.augment_dim = 9``: SongUNet and DiT add a bias-free linear map of
them to their conditioning embedding) learns the augmented images as a family indexed by these numbers;
the samplers pass none, which means zeros, so samples are un-augmented images and the augmentation does
not leak into them. Without them (``augment_dim = 0``) rotated or stretched images are part of what the
network learns to generate.

Geometry: the transforms compose into one affine map about the image centre. Output pixels are
resampled from the input reflected about its first and last rows and columns (as ADA's reflect
padding, here without a data-dependent padding size), bilinearly on a 2x supersampled grid: Lanczos-3
upsampling, the transform, Lanczos-3 antialiased downsampling (ADA supersamples 2x with a wavelet
low-pass filter). Flips are exact index reversals, and an image that draws no geometric transform is
passed through unchanged, bit for bit.

The pipeline runs on the device inside the jitted training step, on the sharded global batch: each
image's transform is independent of the others, so nothing crosses devices.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np

AUGMENT_DIM = 9
TRANSFORMS = ("yflip", "scale", "rotate", "aniso", "translate")
_GEOMETRIC = ("scale", "rotate", "aniso", "translate")
_SUPERSAMPLE = 2
TURN_OFF = "set config.augment.p=0 and config.augment.xflip=False"


@dataclasses.dataclass(frozen=True)
class Augment:
  """The augmentation pipeline (module docstring); hashable, so a jit-static field of the objectives."""

  p: float = 0.12
  xflip: bool = True
  transforms: tuple[str, ...] = TRANSFORMS
  scale_std: float = 0.2
  aniso_std: float = 0.2
  translate_std: float = 0.125

  def __post_init__(self):
    if not 0.0 <= self.p <= 1.0:
      raise ValueError(f"config.augment.p must be a probability in [0, 1], got {self.p}")
    unknown = [t for t in self.transforms if t not in TRANSFORMS]
    if unknown:
      raise ValueError(f"unknown transform {unknown[0]!r} in config.augment.transforms: choose from {TRANSFORMS}")
    for name in ("scale_std", "aniso_std", "translate_std"):
      if getattr(self, name) < 0:
        raise ValueError(f"config.augment.{name} must be >= 0, got {getattr(self, name)}")

  @classmethod
  def from_config(cls, cfg) -> "Augment | None":
    """The pipeline of a ``config.augment`` section, or None when it changes nothing (p = 0, no x-flip)."""
    aug = cls(p=float(cfg.p), xflip=bool(cfg.xflip), transforms=tuple(cfg.transforms),
              scale_std=float(cfg.scale_std), aniso_std=float(cfg.aniso_std),
              translate_std=float(cfg.translate_std))
    return aug if aug.xflip or (aug.p > 0 and aug.transforms) else None

  def __call__(self, rng, x):
    """(augmented images, labels (N, AUGMENT_DIM) float32) for NHWC float images ``x``."""
    if x.ndim != 4:
      raise ValueError(f"config.augment transforms NHWC images; this data has examples of shape "
                       f"{x.shape[1:]}: {TURN_OFF}")
    params = self.draw(rng, x.shape[0])
    return apply(x, params), labels(params)

  def draw(self, rng, n: int) -> dict:
    """Per-image parameters, each at its identity value where the transform was not drawn."""
    keys = iter(jax.random.split(rng, 12))
    zero = jnp.zeros((n,), jnp.float32)

    def drawn(name):
      return (name in self.transforms) & (jax.random.uniform(next(keys), (n,)) < self.p)

    def coin(on):
      return jnp.where(on & (jax.random.uniform(next(keys), (n,)) < 0.5), 1.0, 0.0)

    xflip = coin(jnp.full((n,), self.xflip))
    yflip = coin(drawn("yflip"))
    log2_scale = jnp.where(drawn("scale"), self.scale_std * jax.random.normal(next(keys), (n,)), zero)
    angle = jnp.where(drawn("rotate"), jax.random.uniform(next(keys), (n,), minval=-np.pi, maxval=np.pi), zero)
    on = drawn("aniso")
    log2_stretch = jnp.where(on, self.aniso_std * jax.random.normal(next(keys), (n,)), zero)
    direction = jnp.where(on, jax.random.uniform(next(keys), (n,), minval=-np.pi, maxval=np.pi), zero)
    on = drawn("translate")
    shift = jnp.where(on[:, None], self.translate_std * jax.random.normal(next(keys), (n, 2)), 0.0)
    return dict(xflip=xflip, yflip=yflip, log2_scale=log2_scale, angle=angle, log2_stretch=log2_stretch,
                direction=direction, shift=shift)


def labels(params: dict):
  """The (N, AUGMENT_DIM) augmentation labels of drawn parameters (module docstring)."""
  a, w, s = params["angle"], params["direction"], params["log2_stretch"]
  cols = [params["xflip"], params["yflip"], params["log2_scale"], jnp.cos(a) - 1.0, jnp.sin(a),
          s * jnp.cos(2 * w), s * jnp.sin(2 * w), params["shift"][:, 0], params["shift"][:, 1]]
  return jnp.stack(cols, axis=-1).astype(jnp.float32)


def inverse_matrix(params: dict):
  """(N, 2, 3): for each image, the map from output to input coordinates (x right, y down, in image
  widths about the centre). The forward transform scales, stretches, rotates (counter-clockwise on
  screen for a positive angle), then shifts the content."""
  inv_scale = jnp.exp2(-params["log2_scale"])
  a, w, st = params["angle"], params["direction"], params["log2_stretch"]
  # Forward: R(-a) S(w, st) 2^scale, with R the rotation matrix (y points down, so R(-a) turns the content
  # counter-clockwise on screen) and S(w, st) = R(w) diag(2^st, 2^-st) R(-w); inverse 2^-scale S(w, -st) R(a).
  def rot(t):
    c, s = jnp.cos(t), jnp.sin(t)
    return jnp.stack([jnp.stack([c, -s], -1), jnp.stack([s, c], -1)], -2)

  def diag(u, v):
    z = jnp.zeros_like(u)
    return jnp.stack([jnp.stack([u, z], -1), jnp.stack([z, v], -1)], -2)

  stretch_inv = rot(w) @ diag(jnp.exp2(-st), jnp.exp2(st)) @ rot(-w)
  lin = inv_scale[:, None, None] * (stretch_inv @ rot(a))
  offset = -jnp.einsum("nij,nj->ni", lin, params["shift"])
  return jnp.concatenate([lin, offset[:, :, None]], axis=-1)


def apply(x, params: dict):
  """Images ``x`` (N, H, W, C) under drawn ``params``: exact flips, then the affine part resampled."""
  x = jnp.where(params["xflip"][:, None, None, None] > 0, x[:, :, ::-1], x)
  x = jnp.where(params["yflip"][:, None, None, None] > 0, x[:, ::-1], x)
  moved = ((params["log2_scale"] != 0) | (params["angle"] != 0) | (params["log2_stretch"] != 0)
           | jnp.any(params["shift"] != 0, axis=-1))
  warped = warp(x, inverse_matrix(params))
  return jnp.where(moved[:, None, None, None], warped, x)


def warp(x, matrix, supersample: int = _SUPERSAMPLE):
  """out(p) = x(matrix @ [p, 1]) for output positions p (image widths about the centre), sampled from
  ``x`` reflected about its border pixels; bilinear on a ``supersample``-times finer grid."""
  n, h, w, c = x.shape
  dtype = x.dtype
  x = x.astype(jnp.float32)
  if supersample > 1:
    x = _resize_reflect(x, supersample, up=True)
  hs, ws = x.shape[1:3]
  # Output pixel centres in image widths about the centre (an image h tall spans h / w widths).
  cols = (jnp.arange(ws, dtype=jnp.float32) + 0.5) / ws - 0.5
  rows = ((jnp.arange(hs, dtype=jnp.float32) + 0.5) / hs - 0.5) * (h / w)
  gx, gy = jnp.meshgrid(cols, rows)  # (hs, ws)
  src = jnp.einsum("nij,hwj->nhwi", matrix[:, :, :2], jnp.stack([gx, gy], -1)) + matrix[:, None, None, :, 2]
  src_x = (src[..., 0] + 0.5) * ws - 0.5        # back to pixel indices of the (supersampled) input
  src_y = (src[..., 1] / (h / w) + 0.5) * hs - 0.5
  out = jax.vmap(_bilinear_reflect)(x, src_y, src_x)
  if supersample > 1:
    out = _resize_reflect(out, supersample, up=False)
  return out.astype(dtype)


def _reflect(i, size: int):
  """Integer indices folded into [0, size) by reflection about the first and last index (no repeat);
  numpy indices stay numpy (static), traced ones jax."""
  xp = np if isinstance(i, np.ndarray) else jnp
  if size == 1:
    return xp.zeros_like(i)
  period = 2 * (size - 1)
  i = xp.mod(i, period)
  return xp.where(i >= size, period - i, i)


def _bilinear_reflect(img, yy, xx):
  """img (H, W, C) at fractional pixel indices yy, xx (Ho, Wo), reflected beyond the border."""
  h, w = img.shape[:2]
  y0, x0 = jnp.floor(yy), jnp.floor(xx)
  fy, fx = (yy - y0)[..., None], (xx - x0)[..., None]
  y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
  ya, yb = _reflect(y0, h), _reflect(y0 + 1, h)
  xa, xb = _reflect(x0, w), _reflect(x0 + 1, w)
  top = img[ya, xa] * (1 - fx) + img[ya, xb] * fx
  bottom = img[yb, xa] * (1 - fx) + img[yb, xb] * fx
  return top * (1 - fy) + bottom * fy


def _lanczos3(x):
  """jax.image's 'lanczos3' kernel, sinc(x) sinc(x / 3) on |x| < 3."""
  return np.where(np.abs(x) < 3, np.sinc(x) * np.sinc(x / 3), 0.0)


def _resize_taps(factor: int, up: bool):
  """Lanczos-3 resampling by an integer ``factor`` as FIR taps (float64 numpy): jax.image.resize's
  weights (normalised to sum 1; antialiased, i.e. the kernel stretched by ``factor``, going down) where
  the whole kernel lies inside the input. A list of (offsets, weights), one per output phase:
  up, output f m + r = sum_k w_r[k] x[m + offsets_r[k]]; down (one phase), output i =
  sum_k w[k] x[f i + offsets[k]]."""
  if up:
    phases = []
    for r in range(factor):
      centre = (r + 0.5) / factor - 0.5  # the output's position between input samples m - 1 .. m + 1
      offsets = np.arange(-3, 4)
      weights = _lanczos3(centre - offsets)
      phases.append((offsets[weights != 0], weights[weights != 0] / weights.sum()))
    return phases
  centre = (factor - 1) / 2  # output i sits at input position f i + (f - 1) / 2
  offsets = np.arange(-3 * factor, 3 * factor + factor)
  weights = _lanczos3((centre - offsets) / factor)
  return [(offsets[weights != 0], weights[weights != 0] / weights.sum())]


def _resize_reflect(x, factor: int, up: bool):
  """NHWC ``x`` resized by an integer ``factor`` (up, or down antialiased) with a Lanczos-3 kernel, the
  input reflected about its border pixels where the kernel reaches past them.

  Separable multiply-adds of shifted (strided) views, one axis after the other, equal to
  jax.image.resize of the reflect-padded image; no matrix products: jax.image.resize's float32 GEMMs at
  HIGHEST precision get no Triton tiling from XLA:GPU compiling without a GPU (no autotuning) at
  CIFAR-10's training batch ("Couldn't find output tile sizes"), and cost more than these few taps."""
  for axis in (1, 2):
    x = _resample_axis(x, axis, factor, up)
  return x


def _resample_axis(x, axis: int, factor: int, up: bool):
  """``_resize_reflect`` along one axis: the reflected input's shifted views times ``_resize_taps``."""
  n = x.shape[axis]
  phases = _resize_taps(factor, up)
  lo = -min(int(o.min()) for o, _ in phases)
  count = n if up else n // factor            # outputs per phase
  span = count if up else factor * (count - 1) + 1
  hi = max(int(o.max()) for o, _ in phases) + span - n
  padded = jnp.take(x, _reflect(np.arange(-lo, n + max(hi, 0)), n), axis=axis)  # static indices
  stride = 1 if up else factor
  outs = []
  for offsets, weights in phases:
    acc = None
    for o, w in zip(offsets, weights):
      view = jax.lax.slice_in_dim(padded, lo + int(o), lo + int(o) + span, stride=stride, axis=axis)
      acc = view * float(w) if acc is None else acc + view * float(w)
    outs.append(acc)
  if not up:
    return outs[0]
  y = jnp.stack(outs, axis=axis + 1)  # (..., n, factor, ...): output f m + r
  return y.reshape(x.shape[:axis] + (n * factor,) + x.shape[axis + 1:])


def for_training(config, net) -> Augment | None:
  """The pipeline ``config.augment`` asks for (None: off), checked against the objective and network."""
  dim = int(getattr(net, "augment_dim", 0) or 0)
  if dim not in (0, AUGMENT_DIM):
    raise ValueError(f"config.model.augment_dim must be 0 or {AUGMENT_DIM} (the labels of imm_jax.augment), "
                     f"got {dim}")
  section = config.get("augment", None)
  aug = Augment.from_config(section) if section is not None else None
  if aug is None:
    return None
  if config.objective not in ("imm", "flow_matching"):
    raise ValueError(f"config.augment applies to objective 'imm' or 'flow_matching', not "
                     f"{config.objective!r} (distillation matches its teacher on un-augmented data): {TURN_OFF}")
  if net is not None and not hasattr(net, "augment_dim"):
    raise ValueError(f"config.augment transforms images: it needs config.model.name 'unet' or 'dit', not "
                     f"{config.model.name!r}; or {TURN_OFF}")
  if dim == 0:
    logging.warning("config.augment is on but config.model.augment_dim=0: the network is not told which "
                    "images were transformed, so the transforms can appear in its samples (set "
                    "config.model.augment_dim=%d to condition on them)", AUGMENT_DIM)
  return aug


def augment_inputs(augment: Augment | None, x, rng):
  """(x, rng, extra inputs) for an objective's ``prepare``: without augmentation x, rng and {} as given
  (so such runs draw what they drew before); with it the augmented x, the rest of rng and the labels."""
  if augment is None:
    return x, rng, {}
  rng, key = jax.random.split(rng)
  x, aug_labels = augment(key, x)
  return x, rng, {"augment_labels": aug_labels}


def net_kwargs(inputs: dict) -> dict:
  """The network keyword arguments carried by prepared inputs (the augmentation labels, if any)."""
  return {"augment_labels": inputs["augment_labels"]} if "augment_labels" in inputs else {}
