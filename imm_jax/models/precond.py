"""Preconditioning: f_{s,t}(x_t) = c_skip(s, t) x_t + c_out(s, t) G(c_in(t) x_t, c_noise(t), c_noise_2(s, t), y).

Spec: imm.md section 2 and reference_networks.md "Preconditioned network". All three output forms
satisfy the boundary condition f_{s,s}(x) = x.

The network ``G`` is any Flax module called as ``net.apply(variables, x, c_t, c_s, labels, train=...)``
with x in NHWC (or (N, D) for vector data), c_t and c_s of shape (N,), and integer labels (N,) where
the value ``num_classes`` means "no class" (the null / unconditional label).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from imm_jax.interpolants import Interpolant, _xp, expand_to

F_TYPES = ("identity", "simple_edm", "euler_fm")
TEMB_TYPES = ("identity", "stride")


@dataclasses.dataclass(frozen=True)
class Precond:
  """The f-form, the second time input and the constants around the network. Hashable (jit-static)."""

  interpolant: Interpolant = Interpolant("ot_fm")
  f_type: str = "euler_fm"
  temb_type: str = "identity"
  sigma_d: float = 0.5
  time_scale: float = 1000.0

  def __post_init__(self):
    if self.f_type not in F_TYPES:
      raise ValueError(f"unknown f_type {self.f_type!r} (config.precond.f_type): choose one of {F_TYPES}")
    if self.temb_type not in TEMB_TYPES:
      raise ValueError(
          f"unknown temb_type {self.temb_type!r} (config.precond.temb_type): choose one of {TEMB_TYPES}")
    if self.f_type == "euler_fm" and self.interpolant.name != "ot_fm":
      raise ValueError("config.precond.f_type='euler_fm' needs config.precond.interpolant='ot_fm'")

  @classmethod
  def from_config(cls, cfg) -> "Precond":
    return cls(interpolant=Interpolant(cfg.interpolant), f_type=cfg.f_type, temb_type=cfg.temb_type,
               sigma_d=float(cfg.sigma_d), time_scale=float(cfg.time_scale))

  def c_in(self, t):
    xp = _xp(t)
    a, s = self.interpolant.alpha(t), self.interpolant.sigma(t)
    return 1.0 / (self.sigma_d * xp.sqrt(a * a + s * s))

  def noise_labels(self, s, t):
    """(c_noise(t), second time input): 1000 t and 1000 s (`identity`) or 1000 (t - s) (`stride`)."""
    second = s if self.temb_type == "identity" else t - s
    return self.time_scale * t, self.time_scale * second

  def skip_out(self, s, t):
    """(c_skip(s, t), c_out(s, t)) for f = c_skip x_t + c_out G."""
    xp = _xp(s, t)
    ip = self.interpolant
    a_t, s_t, a_s, s_s = ip.alpha(t), ip.sigma(t), ip.alpha(s), ip.sigma(s)
    if self.f_type == "identity":
      ratio = s_s / s_t
      return ratio, a_s - a_t * ratio
    if self.f_type == "simple_edm":
      norm2 = a_t * a_t + s_t * s_t
      c_skip = (a_t * a_s + s_t * s_s) / norm2
      c_out = -(a_s * s_t - a_t * s_s) * self.sigma_d / xp.sqrt(norm2)
      return c_skip, c_out
    return xp.ones_like(t - s), -(t - s) * self.sigma_d

  def kernel_scale(self, s, t):
    """w~(s, t) = 1 / |c_out(s, t)|: the Laplace kernel then compares G-space distances (App. C.8).

    A group with s = t (t drawn exactly at eps, probability 2^-23 per draw) has y_t = y_r = x_t and
    MMD 0 for any width; its scale is set to 0 instead of inf so the kernel's gradient stays 0, not NaN.
    """
    c_out = jnp.abs(self.skip_out(s, t)[1])
    return jnp.where(c_out > 0, 1.0 / jnp.where(c_out > 0, c_out, 1.0), 0.0)


def denoise(net_apply: Callable[..., Any], precond: Precond, x, s, t, labels=None, *,
            cfg_scale=None, null_label: int | None = None, **apply_kwargs):
  """f_{s,t}(x) with the network ``net_apply(x_in, c_t, c_s, labels, **apply_kwargs) -> G``.

  ``s`` and ``t`` are scalars or per-example vectors. The f-coefficients are computed in float64 on
  the host when the times are host numbers (the sampler), else in the traced dtype (training).
  With ``cfg_scale`` set, the unconditional and conditional passes run as one batched call and
  G_w = G_u + w (G_c - G_u) is formed before c_skip / c_out (Eqs. 14, 85-86).
  """
  n = x.shape[0]
  s_vec = _per_example(s, n)
  t_vec = _per_example(t, n)
  c_in = precond.c_in(t_vec)
  c_t, c_s = precond.noise_labels(s_vec, t_vec)
  c_skip, c_out = precond.skip_out(s_vec, t_vec)
  x_in = expand_to(_cast(c_in, x.dtype), x) * x
  c_t, c_s = _cast(c_t, jnp.float32), _cast(c_s, jnp.float32)
  if cfg_scale is None:
    g = net_apply(x_in, c_t, c_s, labels, **apply_kwargs)
  else:
    if labels is None or null_label is None:
      raise ValueError("classifier-free guidance needs class labels and the model's null label "
                       "(a class-conditional model: config.model.num_classes > 0)")
    uncond = jnp.full_like(labels, null_label)
    g2 = net_apply(jnp.concatenate([x_in, x_in]), jnp.concatenate([c_t, c_t]),
                   jnp.concatenate([c_s, c_s]), jnp.concatenate([uncond, labels]), **apply_kwargs)
    g_u, g_c = jnp.split(g2, 2)
    g = g_u + cfg_scale * (g_c - g_u)
  g = g.astype(x.dtype)
  return expand_to(_cast(c_skip, x.dtype), x) * x + expand_to(_cast(c_out, x.dtype), x) * g


def _per_example(v, n):
  if isinstance(v, (float, int, np.floating, np.integer)):
    return np.full((n,), float(v), dtype=np.float64)
  if isinstance(v, np.ndarray):
    return np.broadcast_to(v.astype(np.float64), (n,))
  v = jnp.asarray(v)
  return jnp.broadcast_to(v, (n,))


def _cast(v, dtype):
  if isinstance(v, np.ndarray):
    return jnp.asarray(v.astype(jnp.dtype(dtype)))
  return v.astype(dtype)
