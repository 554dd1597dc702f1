"""Interpolants x_t = alpha_t x + sigma_t eps (data at t = 0, prior at t = 1) and the DDIM step.

Two schedules are supported (spec imm.md section 1):
  * ``ot_fm``:     alpha = 1 - t,          sigma = t
  * ``vp_cosine``: alpha = cos(pi t / 2),  sigma = sin(pi t / 2)

Every function is written with ``jnp`` so that it works for numpy scalars, NumPy arrays (float64
when the sampler wants it) and traced JAX arrays alike.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

INTERPOLANTS = ("ot_fm", "vp_cosine")


def _xp(*values):
  """numpy for host (NumPy / Python) inputs so float64 survives; jax.numpy for traced inputs."""
  return np if all(isinstance(v, (float, int, np.ndarray, np.generic)) for v in values) else jnp


@dataclasses.dataclass(frozen=True)
class Interpolant:
  """A noise schedule. Frozen and hashable so it can be a static argument of jitted functions."""

  name: str = "ot_fm"

  def __post_init__(self):
    if self.name not in INTERPOLANTS:
      raise ValueError(f"unknown interpolant {self.name!r}: choose one of {INTERPOLANTS}")

  def alpha(self, t):
    xp = _xp(t)
    return 1.0 - t if self.name == "ot_fm" else xp.cos(0.5 * math.pi * t)

  def sigma(self, t):
    xp = _xp(t)
    return t if self.name == "ot_fm" else xp.sin(0.5 * math.pi * t)

  def eta(self, t):
    """Noise-to-signal ratio sigma_t / alpha_t."""
    xp = _xp(t)
    return t / (1.0 - t) if self.name == "ot_fm" else xp.tan(0.5 * math.pi * t)

  def eta_inv(self, eta):
    xp = _xp(eta)
    return eta / (1.0 + eta) if self.name == "ot_fm" else (2.0 / math.pi) * xp.arctan(eta)

  def logsnr(self, t):
    """lambda_t = 2 log(alpha_t / sigma_t)."""
    xp = _xp(t)
    return 2.0 * xp.log(self.alpha(t) / self.sigma(t))

  def neg_dlogsnr_dt(self, t):
    """-d lambda / dt (positive): 2 / (t (1 - t)) for OT-FM, pi / (sin cos) for cosine."""
    if self.name == "ot_fm":
      return 2.0 / (t * (1.0 - t))
    return math.pi / (self.sigma(t) * self.alpha(t))


def ddim(x_t, x, s, t, interpolant: Interpolant):
  """DDIM(x_t, x, s, t) = (alpha_s - (sigma_s / sigma_t) alpha_t) x + (sigma_s / sigma_t) x_t (Eq. 11).

  ``s`` and ``t`` broadcast against ``x`` (pass them shaped (N, 1, ..., 1)).
  """
  ratio = interpolant.sigma(s) / interpolant.sigma(t)
  return (interpolant.alpha(s) - ratio * interpolant.alpha(t)) * x + ratio * x_t


def gaussian(key, shape, std: float = 1.0, dtype=jnp.float32):
  """std * N(0, I) of ``shape``, drawn flat and reshaped: XLA:CPU compiles a multi-dimensional
  threefry draw ~15x slower than a flat one, and the values are the same either way."""
  return std * jax.random.normal(key, (int(np.prod(shape)),), dtype).reshape(shape)


def expand_to(v, x):
  """Reshape a per-example vector (N,) to broadcast against x (N, ...)."""
  v = jnp.asarray(v) if not isinstance(v, np.ndarray) else v
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))
