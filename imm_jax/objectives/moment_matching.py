"""Multistep moment-matching distillation (Salimans, Mensink, Heek, Hoogeboom 2024), spec mm_distill.md.

A student x-predictor g_eta(z_t, t), initialised from a teacher g_theta, is trained so that its k-step
ancestral sampler (``sampling.ancestral``, Alg. 1) matches the teacher's moments: with x ~ data,
z_t ~ q(z_t | x), x~ = g_eta(z_t, t) and z_s ~ q(z_s | z_t, x~), the condition is
E_g[x~ | z_s] = E_q[x | z_s] (the teacher), enforced through L~ = 1/2 E |E_g[x~ | z_s] - g_theta(z_s)|^2
with the dependence of z_s on eta stop-gradiented.

Networks and schedule. Every network is read as an x-predictor through the preconditioning:
g(z, t) = f_{0,t}(z) (see objectives/flow_matching.py: G does not depend on the second time input for a
denoiser; for ``euler_fm`` this is z - t sigma_d G = z - t v_hat). The interpolant is the trainer's own
(OT-FM for a flow-matching teacher): the posterior q(z_s | z_t, x) is derived for it directly by Gaussian
conditioning (``sampling.gaussian_posterior``; the spec's VP formulas hold for any (alpha, sigma)), not
by rescaling to VP. Time is t itself: s ~ U(s_min, 1), t = min(s + delta, 1) with delta ~ U[0, 1/k],
and the sampler's grid is uniform in t from 1 to 0.

Variants (``config.moment_matching.variant``):
  * ``alternating`` (Alg. 2). An auxiliary denoiser g_phi, initialised from the teacher, estimates
    E_g[x~ | z_s]. Each trainer step is one phi-update (``update_extra``, the paper's even n) followed
    by one eta-update (``loss``, odd n), each on its own times and noise for the step's data batch; phi
    has its own state of the trainer's optimizer. phi minimises w {|x~ - g_phi|^2 + |g_theta - g_phi|^2}
    (x~, z_s, g_theta constant); eta minimises w x~^T sg[g_phi(z_s) - g_theta(z_s)].
  * ``parameter`` (Alg. 3, "instant"). g_phi is replaced by the teacher after one infinitesimal
    preconditioned step on an independent batch: with nu = Lambda grad_theta L_theta(x~', z_s') and
    L_theta(x, z) = w |x - g_theta(z)|^2, the student minimises -w x~^T sg[J_theta(z_s) nu], J nu a
    Jacobian-vector product in parameter space (jax.jvp). Lambda = diag(1 / (sqrt(v_hat) + eps)) is
    Adam's preconditioner from the teacher checkpoint (or the identity). The two batches are the
    even and odd examples of the step's batch (groups of two sharing s and t).

Sign (the spec's warning, settled). g_{phi(lambda)} - g_theta ~ -lambda J Lambda grad, so the
surrogate that descends L~_instant = 1/2 g_1^T Lambda g_2 is **minus** w x~^T sg(J nu): its gradient is
exactly d/d eta of 1/2 g_1^T Lambda g_2 through batch 1. The printed Eq. 8 / Alg. 3 drop the minus;
tests/test_moment_matching.py shows that this sign makes the monitored moment loss go down and the
other makes it go up.

Monitoring. ``loss`` returns the surrogate's gradient with the value of the moment-loss estimate
(``surrogate + sg(moment - surrogate)``), so train/loss is L~: for ``parameter`` the unbiased two-batch
estimate 1/2 g_1^T Lambda g_2 = -mean(w (x~ - g_theta(z_s)) . J nu) (free: g_theta(z_s) is the primal
of the JVP); for ``alternating`` 1/2 w |E_g[x~ | z_s] - g_theta|^2 with E_g[x~ | z_s] read off the
auxiliary's optimum (2 g_phi - g_theta with the teacher regulariser, g_phi without it).

Guidance is applied to the teacher only (``teacher_cfg_scale``), with a straight-through gradient in
the parameter version (the backward pass and the JVP use the unguided teacher).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from imm_jax.interpolants import expand_to, gaussian
from imm_jax.models.precond import Precond, denoise
from imm_jax.sampling import gaussian_posterior

VARIANTS = ("alternating", "parameter")
WEIGHTS = ("auto", "edm", "flat")
POSTERIORS = ("conditional", "marginal")
PRECONDITIONERS = ("adam", "identity")

# Network passes per example of the global batch and trainer step (forward = 1, backward = 2):
#   alternating: phi-step  student fwd 1 + aux fwd/bwd 3 + teacher fwd 1;
#                eta-step  student fwd/bwd 3 + aux fwd 1 + teacher fwd 1                      -> 10
#   parameter (per pair):  student fwd/bwd 3 + student fwd 1 + teacher fwd/bwd 3 + teacher JVP 2 -> 4.5
PASSES_PER_EXAMPLE = {"alternating": 10.0, "parameter": 4.5}


@dataclasses.dataclass(frozen=True)
class MomentMatchingConfig:
  variant: str = "alternating"
  k: int = 8                       # sampling steps the student is distilled for (one run per k)
  s_min: float = 0.0               # s ~ U(s_min, 1)
  weight: str = "auto"             # w(s): 'edm' = 1 + alpha_s^2 / sigma_s^2, 'flat' = 1, 'auto': flat for k <= 2
  weight_max: float = 1e4          # cap of the edm weight (it is 1 / s^2 near s = 0 under OT-FM)
  posterior: str = "conditional"   # z_s ~ q(z_s | z_t, x~) ('marginal': q(z_s | x~))
  aux_teacher_reg: bool = True     # the |g_theta - g_phi|^2 term of the alternating phi-loss
  preconditioner: str = "adam"     # Lambda of the parameter version
  teacher_cfg_scale: float = 1.0   # classifier-free guidance of the teacher only

  @classmethod
  def from_config(cls, cfg) -> "MomentMatchingConfig":
    return cls(variant=str(cfg.variant), k=int(cfg.k), s_min=float(cfg.s_min), weight=str(cfg.weight),
               weight_max=float(cfg.weight_max), posterior=str(cfg.posterior),
               aux_teacher_reg=bool(cfg.aux_teacher_reg), preconditioner=str(cfg.preconditioner),
               teacher_cfg_scale=float(cfg.teacher_cfg_scale))

  def __post_init__(self):
    for name, value, choices in (("variant", self.variant, VARIANTS), ("weight", self.weight, WEIGHTS),
                                 ("posterior", self.posterior, POSTERIORS),
                                 ("preconditioner", self.preconditioner, PRECONDITIONERS)):
      if value not in choices:
        raise ValueError(f"unknown {name} {value!r} (config.moment_matching.{name}): choose one of {choices}")
    if self.k < 1:
      raise ValueError(f"config.moment_matching.k must be >= 1, got {self.k}")
    if not 0.0 <= self.s_min < 1.0:
      raise ValueError(f"need 0 <= config.moment_matching.s_min < 1, got {self.s_min}")


def sample_times(rng, n: int, cfg: MomentMatchingConfig):
  """s ~ U(s_min, 1), t = min(s + delta, 1) with delta ~ U[0, 1/k] (Alg. 2: continuous t, random gap)."""
  k_s, k_d = jax.random.split(rng)
  s = jax.random.uniform(k_s, (n,), jnp.float32, cfg.s_min, 1.0)
  t = jnp.minimum(s + jax.random.uniform(k_d, (n,), jnp.float32, 0.0, 1.0 / cfg.k), 1.0)
  return s, t


def time_weight(s, interpolant, cfg: MomentMatchingConfig):
  """w(s): 1 (flat) or EDM's x-space weight (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 in VE units
  sigma = sigma_d eta_s, times sigma_d^2: 1 + alpha_s^2 / sigma_s^2, capped at ``weight_max``. 'auto' is
  the spec's choice: flat for k <= 2, EDM otherwise."""
  kind = cfg.weight if cfg.weight != "auto" else ("flat" if cfg.k <= 2 else "edm")
  if kind == "flat":
    return jnp.ones_like(s)
  a, sg = interpolant.alpha(s), interpolant.sigma(s)
  return jnp.minimum(1.0 + a * a / jnp.maximum(sg * sg, 1e-12), cfg.weight_max)


def adam_preconditioner(opt_state, b2: float, eps: float):
  """Lambda = 1 / (sqrt(v_hat) + eps), v_hat = nu / (1 - b2^count), from the (first) Adam-family state
  (optax ScaleByAdamState: adam, adamw, radam) in an optimizer state, as a parameter-shaped pytree."""
  states = [s for s in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda v: isinstance(v, optax.ScaleByAdamState))
      if isinstance(s, optax.ScaleByAdamState)]
  if not states:
    raise ValueError("the teacher's optimizer state holds no Adam second moments; use "
                     "config.moment_matching.preconditioner='identity'")
  state = states[0]
  correction = 1.0 - b2 ** jnp.maximum(jnp.asarray(state.count, jnp.float32), 1.0)
  return jax.tree.map(lambda v: 1.0 / (jnp.sqrt(v / correction) + eps), state.nu)


def _mean_per_example(v):
  return jnp.mean(v.reshape(v.shape[0], -1), axis=1)


@dataclasses.dataclass(frozen=True)
class MomentMatchingObjective:
  """Moment-matching distillation as a trainer objective with objective-owned state (``extra``).

  Beyond ``group_size`` / ``prepare`` / ``loss``, it implements the trainer's protocol for objectives
  with state besides the trained parameters (see objectives/__init__.py): ``teacher_items``,
  ``init_extra(params, teacher, tx)`` and ``update_extra(extra, params, inputs, rng, tx)``; its
  ``loss`` takes ``extra`` as a fourth argument.
  """

  net_apply: Callable[..., Any]
  precond: Precond
  cfg: MomentMatchingConfig
  null_label: int | None = None

  @property
  def group_size(self) -> int:
    return 2 if self.cfg.variant == "parameter" else 1

  @property
  def passes_per_example(self) -> float:
    return PASSES_PER_EXAMPLE[self.cfg.variant]

  @property
  def teacher_items(self) -> tuple[str, ...]:
    """What the trainer loads from the teacher workdir: EMA 'params' and, for the parameter version
    with Adam's preconditioner, 'precond' (Lambda)."""
    if self.cfg.variant == "parameter" and self.cfg.preconditioner == "adam":
      return ("params", "precond")
    return ("params",)

  # -- state ------------------------------------------------------------------------------------------

  def init_extra(self, params, teacher, tx):
    """(student params, extra): the student (and the auxiliary) start from the teacher."""
    del params
    theta = teacher["params"]
    if self.cfg.variant == "alternating":
      return theta, {"teacher": theta, "aux": theta, "aux_opt": tx.init(theta)}
    extra = {"teacher": theta}
    if "precond" in teacher:
      extra["precond"] = teacher["precond"]
    return theta, extra

  # -- randomness ---------------------------------------------------------------------------------------

  def _draw(self, rng, x, num_times: int):
    k_time, k_noise, k_post = jax.random.split(rng, 3)
    n = x.shape[0]
    s, t = (jnp.repeat(v, n // num_times) for v in sample_times(k_time, num_times, self.cfg))
    ip = self.precond.interpolant
    noise = gaussian(k_noise, x.shape, self.precond.sigma_d)
    z_t = expand_to(ip.alpha(t), x) * x + expand_to(ip.sigma(t), x) * noise
    return {"z_t": z_t, "s": s, "t": t, "post_noise": gaussian(k_post, x.shape, 1.0)}

  def prepare(self, batch, rng):
    x = batch["x"].astype(jnp.float32)
    n, m = x.shape[0], self.group_size
    if n % m:
      raise ValueError(f"the parameter-space moment matching pairs examples: the batch size {n} must be even")
    k_student, k_aux = jax.random.split(rng)
    inputs = self._draw(k_student, x, n // m)
    if self.cfg.variant == "alternating":
      inputs.update({f"aux_{k}": v for k, v in self._draw(k_aux, x, n).items()})
    if self.null_label is not None:
      inputs["label"] = batch["label"]
    return inputs

  # -- networks as x-predictors ------------------------------------------------------------------------

  def x_pred(self, params, z, t, labels, rng, cfg_scale=None):
    """g(z, t) = f_{0,t}(z) (optionally with classifier-free guidance)."""
    apply = lambda xi, ct, cs, y: self.net_apply(params, xi, ct, cs, y, rng)
    return denoise(apply, self.precond, z, jnp.zeros_like(t), t, labels, cfg_scale=cfg_scale,
                   null_label=self.null_label)

  def teacher(self, theta, z, t, labels, rng):
    """The teacher's x-prediction; guided forward with the unguided teacher's derivatives."""
    plain = self.x_pred(theta, z, t, labels, rng)
    if self.null_label is None or self.cfg.teacher_cfg_scale == 1.0 or labels is None:
      return plain
    guided = self.x_pred(theta, z, t, labels, rng, cfg_scale=self.cfg.teacher_cfg_scale)
    return plain + jax.lax.stop_gradient(guided - plain)

  def student_step(self, params, z_t, s, t, post_noise, labels, rng):
    """(x~, sg z_s): the student's x-prediction at t and a draw of z_s given it."""
    x_tilde = self.x_pred(params, z_t, t, labels, rng)
    x_sg = jax.lax.stop_gradient(x_tilde)
    ip = self.precond.interpolant
    s_b, t_b = expand_to(s, z_t), expand_to(t, z_t)
    if self.cfg.posterior == "conditional":
      mean, std = gaussian_posterior(z_t, x_sg, s_b, t_b, ip)
    else:
      mean, std = ip.alpha(s_b) * x_sg, ip.sigma(s_b)
    z_s = mean + std * self.precond.sigma_d * post_noise
    return x_tilde, jax.lax.stop_gradient(z_s)

  def weight(self, s):
    return time_weight(s, self.precond.interpolant, self.cfg)

  # -- the alternating version's phi-step ---------------------------------------------------------------

  def update_extra(self, extra, params, inputs, rng, tx):
    """The auxiliary network's update (alternating); the parameter version has nothing to update."""
    if self.cfg.variant != "alternating":
      return extra, {}
    labels = inputs.get("label")
    k_student, k_net = jax.random.split(rng)
    s = inputs["aux_s"]
    x_tilde, z_s = self.student_step(jax.lax.stop_gradient(params), inputs["aux_z_t"], s, inputs["aux_t"],
                                     inputs["aux_post_noise"], labels, k_student)
    x_tilde = jax.lax.stop_gradient(x_tilde)
    target = jax.lax.stop_gradient(self.teacher(extra["teacher"], z_s, s, labels, k_net))
    w = self.weight(s)

    def aux_loss(phi):
      a = self.x_pred(phi, z_s, s, labels, k_net)  # the teacher's dropout key: matched noise
      per = _mean_per_example(jnp.square(x_tilde - a))
      if self.cfg.aux_teacher_reg:
        per = per + _mean_per_example(jnp.square(target - a))
      return jnp.mean(w * per)

    value, grads = jax.value_and_grad(aux_loss)(extra["aux"])
    updates, aux_opt = tx.update(grads, extra["aux_opt"], extra["aux"])
    aux = optax.apply_updates(extra["aux"], updates)
    return dict(extra, aux=aux, aux_opt=aux_opt), {"aux_loss": value, "aux_grad_norm": optax.tree.norm(grads)}

  # -- the student's loss -------------------------------------------------------------------------------

  def loss(self, params, inputs, rng, extra):
    if self.cfg.variant == "alternating":
      surrogate, moment, metrics = self._alternating_loss(params, inputs, rng, extra)
    else:
      surrogate, moment, metrics = self._parameter_loss(params, inputs, rng, extra)
    loss = surrogate + jax.lax.stop_gradient(moment - surrogate)
    return loss, dict(metrics, loss=moment, surrogate=surrogate)

  def _alternating_loss(self, params, inputs, rng, extra):
    labels = inputs.get("label")
    k_student, k_net = jax.random.split(rng)
    s = inputs["s"]
    x_tilde, z_s = self.student_step(params, inputs["z_t"], s, inputs["t"], inputs["post_noise"], labels,
                                     k_student)
    aux = self.x_pred(extra["aux"], z_s, s, labels, k_net)
    d = jax.lax.stop_gradient(aux - self.teacher(extra["teacher"], z_s, s, labels, k_net))
    w = self.weight(s)
    surrogate = jnp.mean(w * _mean_per_example(x_tilde * d))
    # E_g[x~|z_s] - g_theta = 2 (g_phi - g_theta) at the regularised auxiliary's optimum, (g_phi - g_theta)
    # without the regulariser; the moment loss is half its weighted square.
    scale = 2.0 if self.cfg.aux_teacher_reg else 1.0
    moment = 0.5 * jnp.mean(w * _mean_per_example(jnp.square(scale * d)))
    return surrogate, moment, {"aux_teacher_gap": jnp.mean(_mean_per_example(jnp.square(d)))}

  def _parameter_loss(self, params, inputs, rng, extra):
    # Pairs (2i, 2i+1) share (s, t): even examples are batch 1 (x~ with gradient), odd ones batch 2.
    one = jax.tree.map(lambda v: v[0::2], inputs)
    two = jax.tree.map(lambda v: v[1::2], inputs)
    labels1, labels2 = one.get("label"), two.get("label")
    k1, k2, k_t1, k_t2 = jax.random.split(rng, 4)
    theta = extra["teacher"]
    s = one["s"]
    w = self.weight(s)
    x1, z_s1 = self.student_step(params, one["z_t"], s, one["t"], one["post_noise"], labels1, k1)
    x2, z_s2 = self.student_step(jax.lax.stop_gradient(params), two["z_t"], two["s"], two["t"],
                                 two["post_noise"], labels2, k2)
    x2 = jax.lax.stop_gradient(x2)

    def teacher_loss(th):  # L_theta(x~', z_s') = w |x~' - g_theta(z_s')|^2 on batch 2
      return jnp.mean(w * _mean_per_example(jnp.square(x2 - self.teacher(th, z_s2, two["s"], labels2, k_t2))))

    nu = jax.grad(teacher_loss)(theta)
    if "precond" in extra:
      nu = jax.tree.map(jnp.multiply, extra["precond"], nu)
    g1, delta = jax.jvp(lambda th: self.teacher(th, z_s1, s, labels1, k_t1), (theta,), (nu,))
    g1, delta = jax.lax.stop_gradient(g1), jax.lax.stop_gradient(delta)
    surrogate = -jnp.mean(w * _mean_per_example(x1 * delta))
    moment = -jnp.mean(w * _mean_per_example((jax.lax.stop_gradient(x1) - g1) * delta))
    return surrogate, moment, {"jvp_norm": jnp.sqrt(jnp.mean(jnp.square(delta)))}
