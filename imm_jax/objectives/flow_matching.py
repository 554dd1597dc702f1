"""Flow matching (OT-FM) on the same networks and preconditioning as IMM: the many-step baseline and
the teacher for moment-matching distillation.

x_t = (1 - t) x + t eps with eps ~ N(0, sigma_d^2 I), target velocity v = eps - x.

How the network's output G is read. Every f-form of ``Precond`` is f_{s,t}(x_t) = DDIM(x_t, g, s, t) with
the clean-sample prediction g = f_{0,t}(x_t) = c_skip(0, t) x_t + c_out(0, t) G, so a network whose G
does not depend on s is an ordinary denoiser and f_{s,t} is one DDIM step, which under OT-FM is one Euler
step of the flow ODE: x_s = x_t - (t - s) v_hat with v_hat = (x_t - g) / t. With ``euler_fm`` (the
default) this is f_{s,t} = x_t - (t - s) sigma_d G, so G = v_hat / sigma_d is a velocity prediction and
the regression target is G* = (eps - x) / sigma_d. The other forms regress their own G*, the value for
which f_{0,t}(x_t) = x: (alpha_t eps - sigma_t x) / (sigma_d sqrt(alpha_t^2 + sigma_t^2)) for
``simple_edm`` (TrigFlow's v-target) and x for ``identity``.

The second time input. Training draws s ~ U(eps, t) as IMM does although the target does not depend on
it, so the network learns to ignore it: the trained model is then a valid f_{s,t} for every s, and every
sampler applies unchanged (IMM's pushforward is Euler, ``sampling.generate_ode`` adds Heun, and the
moment-matching teacher reads g = f_{0,t}).

``prediction`` chooses the loss space, a time weighting of the same G-space error:
  * ``velocity``: |v_hat - v|^2 / sigma_d^2 = (c_out(0, t) / (t sigma_d))^2 |G - G*|^2 (1 for euler_fm);
  * ``x``:        |g - x|^2 / sigma_d^2     = (c_out(0, t) / sigma_d)^2 |G - G*|^2  (t^2 for euler_fm).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from imm_jax import augment as augment_lib
from imm_jax.interpolants import expand_to, gaussian
from imm_jax.models.precond import Precond
from imm_jax.objectives.imm import drop_labels

PREDICTIONS = ("velocity", "x")
# Network passes per example and step for the compute accounting: forward + backward (= 2 forwards).
PASSES_PER_EXAMPLE = 3.0


@dataclasses.dataclass(frozen=True)
class FlowMatchingConfig:
  eps: float = 0.0             # t ~ U(eps, T); the samplers run from T to eps
  T: float = 1.0
  prediction: str = "velocity"
  label_dropout: float = 0.0

  @classmethod
  def from_config(cls, cfg) -> "FlowMatchingConfig":
    return cls(eps=float(cfg.eps), T=float(cfg.T), prediction=str(cfg.prediction),
               label_dropout=float(cfg.label_dropout))

  def __post_init__(self):
    if self.prediction not in PREDICTIONS:
      raise ValueError(f"unknown prediction {self.prediction!r} (config.flow_matching.prediction): "
                       f"choose one of {PREDICTIONS}")
    if not 0.0 <= self.eps < self.T <= 1.0:
      raise ValueError(f"need 0 <= config.flow_matching.eps < config.flow_matching.T <= 1, "
                       f"got eps={self.eps}, T={self.T}")


def g_target(precond: Precond, x, noise, t):
  """G* with f_{0,t}(x_t) = x for x_t = alpha_t x + sigma_t noise; ``t`` shaped to broadcast against x."""
  if precond.f_type == "euler_fm":
    return (noise - x) / precond.sigma_d
  if precond.f_type == "identity":
    return x
  ip = precond.interpolant
  a, s = ip.alpha(t), ip.sigma(t)
  return (a * noise - s * x) / (precond.sigma_d * jnp.sqrt(a * a + s * s))


def loss_weight(precond: Precond, t, prediction: str):
  """The per-example factor turning |G - G*|^2 into the chosen loss space (module docstring)."""
  c_out = precond.skip_out(jnp.zeros_like(t), t)[1]
  if prediction == "x":
    return (c_out / precond.sigma_d) ** 2
  # sigma_t = t; its floor only matters for `identity`, whose velocity weight is 1 / t^2.
  return (c_out / (precond.sigma_d * jnp.maximum(t, 1e-6))) ** 2


@dataclasses.dataclass(frozen=True)
class FlowMatchingObjective:
  """OT flow matching as a trainer objective (groups of one example)."""

  net_apply: Callable[..., Any]
  precond: Precond
  cfg: FlowMatchingConfig
  null_label: int | None = None
  augment: augment_lib.Augment | None = None

  group_size = 1
  passes_per_example = PASSES_PER_EXAMPLE

  def __post_init__(self):
    if self.precond.interpolant.name != "ot_fm":
      raise ValueError("objective='flow_matching' is OT flow matching: it needs "
                       "config.precond.interpolant='ot_fm'")

  def prepare(self, batch, rng):
    x, rng, extra = augment_lib.augment_inputs(self.augment, batch["x"].astype(jnp.float32), rng)
    n = x.shape[0]
    k_t, k_s, k_noise, k_drop = jax.random.split(rng, 4)
    t = jax.random.uniform(k_t, (n,), jnp.float32, self.cfg.eps, self.cfg.T)
    s = self.cfg.eps + (t - self.cfg.eps) * jax.random.uniform(k_s, (n,), jnp.float32)
    noise = gaussian(k_noise, x.shape, self.precond.sigma_d)
    inputs = {"x": x, "x_t": expand_to(1.0 - t, x) * x + expand_to(t, x) * noise, "noise": noise,
              "s": s, "t": t, **extra}
    if self.null_label is not None:
      inputs["label"] = drop_labels(k_drop, batch["label"], self.cfg.label_dropout, self.null_label)
    return inputs

  def loss(self, params, inputs, rng):
    x, x_t, noise, s, t = (inputs[k] for k in ("x", "x_t", "noise", "s", "t"))
    c_t, c_s = self.precond.noise_labels(s, t)
    x_in = expand_to(self.precond.c_in(t), x_t) * x_t
    g = self.net_apply(params, x_in, c_t, c_s, inputs.get("label"), rng,
                       **augment_lib.net_kwargs(inputs)).astype(jnp.float32)
    err = jnp.mean(jnp.square(g - g_target(self.precond, x, noise, expand_to(t, x))).reshape(x.shape[0], -1),
                   axis=1)
    loss = jnp.mean(loss_weight(self.precond, t, self.cfg.prediction) * err)
    return loss, {"loss": loss, "g_mse": jnp.mean(err)}
