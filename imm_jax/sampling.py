"""Few-step samplers for f_{s,t}: pushforward and restart, time schedules, classifier-free guidance.

Spec: imm.md section 4 and reference_networks.md "Samplers". Times run from T (prior) to eps (data).
Schedules are computed on the host in float64; the sampler state is float32 on the device.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from imm_jax.interpolants import Interpolant, gaussian
from imm_jax.models.precond import Precond, denoise

SCHEDULES = ("uniform", "edm", "explicit", "default")
SAMPLERS = ("pushforward", "restart")
PAPER_TWO_STEP_ETA = 1.4  # eta(t_1) = 1.4 -> t_1 = 0.5833 under OT-FM (paper App. I.2)


def make_schedule(kind: str, steps: int, interpolant: Interpolant, eps: float, T: float,
                  mid_etas: Sequence[float] | None = None, rho: float = 7.0) -> np.ndarray:
  """Times t_N = T > ... > t_0 = eps (float64, length steps + 1).

  kind:
    * ``uniform``: linspace(T, eps, steps + 1).
    * ``edm``: uniform in eta^(1/rho) between eta(T) and eta(eps), mapped back to t.
    * ``explicit``: [T, *eta_inv(mid_etas), eps] (the paper's 2-step sampler is mid_etas=[1.4]).
    * ``default``: the paper's choice: 1 step T -> eps, 2 steps through eta = 1.4, else uniform.
  """
  if steps < 1:
    raise ValueError(f"--steps must be >= 1, got {steps}")
  if kind not in SCHEDULES:
    raise ValueError(f"unknown schedule {kind!r} (--schedule): choose one of {SCHEDULES}")
  if kind == "default":
    if steps == 2:
      kind, mid_etas = "explicit", [PAPER_TWO_STEP_ETA]
    else:
      kind = "uniform"
  if kind == "explicit" or mid_etas:
    mids = [] if mid_etas is None else list(mid_etas)
    if len(mids) != steps - 1:
      raise ValueError(f"an explicit schedule with {steps} steps needs {steps - 1} mid-point etas "
                       f"(--mid-etas), got {len(mids)}")
    times = np.array([T] + [float(interpolant.eta_inv(float(e))) for e in mids] + [eps], np.float64)
  elif kind == "uniform":
    times = np.linspace(T, eps, steps + 1, dtype=np.float64)
  else:
    eta_max, eta_min = float(interpolant.eta(T)), float(interpolant.eta(eps))
    i = np.arange(steps + 1, dtype=np.float64)
    etas = (eta_max ** (1 / rho) + i / steps * (eta_min ** (1 / rho) - eta_max ** (1 / rho))) ** rho
    times = np.array([float(interpolant.eta_inv(e)) for e in etas], np.float64)
    times[0], times[-1] = T, eps
  if not np.all(np.diff(times) < 0):
    raise ValueError(f"schedule times must decrease strictly from T={T} to eps={eps}: got {times}")
  return times


def pushforward(denoise_fn: Callable, x, times):
  """x_{t_{i-1}} = f_{t_{i-1}, t_i}(x_{t_i}) along ``times`` (Algorithms 2 / 4).

  ``times`` is a 1-D array (host or device); the loop is a lax.scan so one compile serves all
  step counts of equal length.
  """
  times = jnp.asarray(times, jnp.float32)

  def body(x, ts):
    t_cur, t_next = ts
    return denoise_fn(x, t_next, t_cur), None

  x, _ = jax.lax.scan(body, x, (times[:-1], times[1:]))
  return x


def restart(denoise_fn: Callable, x, times, rng, interpolant: Interpolant, sigma_d: float):
  """Restart sampling (Algorithm 5): jump to eps, then re-noise to the next time with fresh noise."""
  times = jnp.asarray(times, jnp.float32)
  eps = times[-1]
  n = times.shape[0] - 1
  keys = jax.random.split(rng, n)

  def body(x, inputs):
    i, t_cur, key = inputs
    x0 = denoise_fn(x, eps, t_cur)
    t_next = times[i + 1]
    noise = gaussian(key, x.shape, sigma_d, x.dtype)
    renoised = interpolant.alpha(t_next) * x0 + interpolant.sigma(t_next) * noise
    return jnp.where(i + 1 < n, renoised, x0), None

  x, _ = jax.lax.scan(body, x, (jnp.arange(n), times[:-1], keys))
  return x


@functools.partial(jax.jit, static_argnames=("net", "precond", "sampler", "guided", "null_label"))
def generate(net, params, precond: Precond, x_init, times, labels=None, cfg_scale=1.0, rng=None, *,
             sampler: str = "pushforward", guided: bool = False, null_label: int | None = None,
             extra_variables=None):
  """Run a sampler from prior noise ``x_init`` (N(0, sigma_d^2)) with the network's parameters.

  ``guided`` turns on classifier-free guidance with scale ``cfg_scale`` (a traced scalar, so sweeping
  it does not recompile). ``extra_variables``: other variable collections of the network besides
  ``params`` (e.g. ``{'buffers': ...}`` from ``checkpoints.restore_ema_variables``). Returns float32
  samples in model space.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r} (--sampler): choose one of {SAMPLERS}")
  x_init = x_init.astype(jnp.float32)

  def net_apply(x_in, c_t, c_s, y):
    return net.apply({**(extra_variables or {}), "params": params}, x_in, c_t, c_s, y, train=False)

  def denoise_fn(x, s, t):
    return denoise(net_apply, precond, x, s, t, labels, cfg_scale=cfg_scale if guided else None,
                   null_label=null_label)

  if sampler == "pushforward":
    return pushforward(denoise_fn, x_init, times)
  if rng is None:
    raise ValueError("the restart sampler needs an rng for its fresh noise")
  return restart(denoise_fn, x_init, times, rng, precond.interpolant, precond.sigma_d)


def prior_noise(rng, shape, sigma_d: float):
  """x ~ N(0, sigma_d^2 I): the sampler's starting point at t = T."""
  return gaussian(rng, shape, sigma_d)
