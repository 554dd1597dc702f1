"""Few-step samplers for f_{s,t}: pushforward and restart, time schedules, classifier-free guidance.

Spec: imm.md section 4 and reference_networks.md "Samplers". Times run from T (prior) to eps (data).
Schedules are computed on the host in float64; the sampler state is float32 on the device.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

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


# -- flow-ODE and ancestral samplers (flow matching, moment-matching distillation) ---------------------

ODE_METHODS = ("euler", "heun")


def heun(denoise_fn: Callable, x, times):
  """Heun's second-order solver of the OT-FM flow ODE dx/dt = v(x, t) along ``times``.

  With Euler x' = f_{s,t}(x) = x - (t - s) v(x, t) and v(x', s) = (x' - f_{0,s}(x')) / s:
  x_s = x - (t - s) (v(x, t) + v(x', s)) / 2 = (x + x') / 2 - (t - s) / (2 s) (x' - f_{0,s}(x')).
  A step ending at s = 0 stays Euler (EDM's rule), so N steps cost 2N - 1 network passes when the
  schedule ends at 0, else 2N.
  """
  times = jnp.asarray(times, jnp.float32)

  def body(x, ts):
    t_cur, t_next = ts
    x_euler = denoise_fn(x, t_next, t_cur)

    def corrected(x_euler):
      x_hat = denoise_fn(x_euler, jnp.zeros_like(t_next), t_next)
      return 0.5 * (x + x_euler) - 0.5 * (t_cur - t_next) / t_next * (x_euler - x_hat)

    return jax.lax.cond(t_next > 0, corrected, lambda v: v, x_euler), None

  x, _ = jax.lax.scan(body, x, (times[:-1], times[1:]))
  return x


def ode_sample(denoise_fn: Callable, x, times, method: str = "euler"):
  """Solve the flow ODE from ``times[0]`` to ``times[-1]``. Euler is IMM's pushforward: under OT-FM one
  DDIM step f_{s,t} of a model whose G ignores s is exactly one Euler step."""
  if method not in ODE_METHODS:
    raise ValueError(f"unknown ODE method {method!r}: choose one of {ODE_METHODS}")
  return pushforward(denoise_fn, x, times) if method == "euler" else heun(denoise_fn, x, times)


def gaussian_posterior(z_t, x, s, t, interpolant: Interpolant):
  """q(z_s | z_t, x) = N(mean, std^2 sigma_d^2 I) for z_u = alpha_u x + sigma_u sigma_d N(0, I), s < t.

  Gaussian conditioning, valid for any (alpha, sigma) schedule, OT-FM included (no conversion to VP):
  alpha_{t|s} = alpha_t / alpha_s, sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2,
  mean = (alpha_{t|s} sigma_s^2 / sigma_t^2) z_t + (alpha_s sigma_{t|s}^2 / sigma_t^2) x,
  std^2 = sigma_s^2 sigma_{t|s}^2 / sigma_t^2 (mm_distill.md section 1). At t = 1 under OT-FM
  (alpha_1 = 0) this is forward diffusion q(z_s | x); at s = 0 it is the point mass at x. ``s`` and ``t``
  broadcast against x (scalars or per-example vectors shaped (N, 1, ..., 1)). Returns (mean, std).
  """
  a_t, s_t, a_s, s_s = interpolant.alpha(t), interpolant.sigma(t), interpolant.alpha(s), interpolant.sigma(s)
  a_ts = a_t / jnp.maximum(a_s, 1e-12)
  var_ts = jnp.maximum(s_t * s_t - a_ts * a_ts * s_s * s_s, 0.0)
  inv_var_t = 1.0 / jnp.maximum(s_t * s_t, 1e-12)
  mean = (a_ts * s_s * s_s * inv_var_t) * z_t + (a_s * var_ts * inv_var_t) * x
  return mean, jnp.sqrt(s_s * s_s * var_ts * inv_var_t)


def ancestral(denoise_fn: Callable, x, times, rng, interpolant: Interpolant, sigma_d: float):
  """The k-step ancestral sampler of moment matching (Alg. 1 of Salimans et al. 2024).

  For each t_i -> t_{i+1}: x_hat = f_{0,t_i}(z) (the x-prediction), z ~ q(z_{t_{i+1}} | z, x_hat).
  Returns the last x_hat. The paper's grid is uniform from 1 to 0 (``make_schedule('uniform', k,
  ..., eps=0, T=1)``).
  """
  times = jnp.asarray(times, jnp.float32)
  keys = jax.random.split(rng, times.shape[0] - 1)

  def body(carry, inputs):
    z, _ = carry
    t_cur, t_next, key = inputs
    x_hat = denoise_fn(z, jnp.zeros_like(t_cur), t_cur)
    mean, std = gaussian_posterior(z, x_hat, t_next, t_cur, interpolant)
    z = mean + std * gaussian(key, z.shape, sigma_d, z.dtype)
    return (z, x_hat), None

  (_, x_hat), _ = jax.lax.scan(body, (x, x), (times[:-1], times[1:], keys))
  return x_hat


def _guided_denoise_fn(net, params, precond: Precond, labels, cfg_scale, guided: bool, null_label,
                       extra_variables):
  def net_apply(x_in, c_t, c_s, y):
    return net.apply({**(extra_variables or {}), "params": params}, x_in, c_t, c_s, y, train=False)

  def denoise_fn(x, s, t):
    return denoise(net_apply, precond, x, s, t, labels, cfg_scale=cfg_scale if guided else None,
                   null_label=null_label)

  return denoise_fn


@functools.partial(jax.jit, static_argnames=("net", "precond", "method", "guided", "null_label"))
def generate_ode(net, params, precond: Precond, x_init, times, labels=None, cfg_scale=1.0, *,
                 method: str = "euler", guided: bool = False, null_label: int | None = None,
                 extra_variables=None):
  """Flow-ODE samples (Euler or Heun, OT-FM) from prior noise ``x_init``; arguments as ``generate``."""
  if precond.interpolant.name != "ot_fm":
    raise ValueError("the flow-ODE samplers integrate the OT-FM velocity: config.precond.interpolant='ot_fm'")
  denoise_fn = _guided_denoise_fn(net, params, precond, labels, cfg_scale, guided, null_label, extra_variables)
  return ode_sample(denoise_fn, x_init.astype(jnp.float32), times, method)


@functools.partial(jax.jit, static_argnames=("net", "precond", "guided", "null_label"))
def generate_ancestral(net, params, precond: Precond, x_init, times, labels=None, cfg_scale=1.0, rng=None, *,
                       guided: bool = False, null_label: int | None = None, extra_variables=None):
  """Ancestral (moment-matching Alg. 1) samples from prior noise ``x_init``; arguments as ``generate``."""
  if rng is None:
    raise ValueError("the ancestral sampler needs an rng for its fresh noise")
  denoise_fn = _guided_denoise_fn(net, params, precond, labels, cfg_scale, guided, null_label, extra_variables)
  return ancestral(denoise_fn, x_init.astype(jnp.float32), times, rng, precond.interpolant, precond.sigma_d)


SAMPLER_CHOICES = SAMPLERS + ODE_METHODS + ("ancestral",)


def run_sampler(sampler: str, net, params, precond: Precond, x_init, times, labels=None, cfg_scale=1.0,
                rng=None, *, guided: bool = False, null_label: int | None = None, extra_variables=None):
  """The one entry point for every sampler name: pushforward / restart (IMM), euler / heun (flow ODE),
  ancestral (moment matching). Used by the trainer's sample grids and by ``imm_jax.sample``."""
  common = dict(guided=guided, null_label=null_label, extra_variables=extra_variables)
  if sampler in ODE_METHODS:
    return generate_ode(net, params, precond, x_init, times, labels, cfg_scale, method=sampler, **common)
  if sampler == "ancestral":
    return generate_ancestral(net, params, precond, x_init, times, labels, cfg_scale, rng, **common)
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r} (--sampler / config.sample.sampler): choose one of "
                     f"{SAMPLER_CHOICES}")
  return generate(net, params, precond, x_init, times, labels, cfg_scale, rng, sampler=sampler, **common)
