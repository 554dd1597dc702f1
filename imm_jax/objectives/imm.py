"""The IMM objective: grouped particle kernel MMD between f_{s,t}(x_t) and the stop-gradient f_{s,r}(x_r).

Spec: imm.md section 3 (Algorithm 3 of App. D with the V-statistic of Eq. 67). A batch of B examples
is read as B / M consecutive groups of M particles; each group shares one (s, r, t). Because groups are
contiguous, sharding the batch axis over devices keeps every group on one device and the kernel
matrices need no cross-device traffic; only the final mean is reduced.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from imm_jax import augment as augment_lib
from imm_jax.interpolants import Interpolant, expand_to, gaussian
from imm_jax.models.precond import Precond, denoise

# k_{s,t}(a, b) as a function of u = w~(s, t) max(||a - b||, eps_k) / D (kernel_matrix): the paper's Laplace
# kernel, the spec's RBF alternative, and the kernels of the paper's theory: energy (-u, the energy
# distance's: conditionally positive definite, matches all moments), squared (-u^2 / 2, what Lemma 1
# calls the energy kernel -||x - y||^2: matches only the mean, and IMM with one particle is then a
# consistency model), pseudo_huber (c - sqrt(u^2 + c^2), Lemma 2: squared for u << c, energy for u >> c;
# c = kernel_c / sqrt(D), so kernel_c is in units of the dimension-free rho = u sqrt(D), the normalised
# outputs' per-element RMS distance. Its medians in trained digits (D = 256) and 2-D toy runs are ~4-5
# between the particles of a group and ~0.03-0.05 between a particle's y_t and y_r, i.e. u ~ 0.26 on
# digits, ~3.5 on the toys and, if images behave alike, ~0.08 at CIFAR-10's D, where Laplace's exp(-u)
# is nearly the energy kernel 1 - u. The training metrics rho_particles and rho_target log them.)
KERNELS = ("laplace", "rbf", "energy", "squared", "pseudo_huber")
KERNEL_C = 0.1  # pseudo_huber's default c (config.imm.kernel_c)
# r(s, t): a constant step from t towards the data in one of these variables (App. C.6, Fig. 11).
MAPPINGS = ("eta", "t", "logsnr", "inv_eta")
# w(s, t) of Eq. 13 and its reductions in Table 4: none (w = 1), elbo (1/2 sigmoid(b - lambda) (-dlambda/dt)),
# elbo_alpha (times alpha_t^a), full (times 1 / (alpha_t^2 + sigma_t^2) as well).
WEIGHTINGS = ("full", "elbo_alpha", "elbo", "none")
KERNEL_DIST_EPS = 1e-8  # epsilon_k: the Laplace kernel's max(||a - b||, eps) keeps the diagonal's gradient 0


@dataclasses.dataclass(frozen=True)
class IMMConfig:
  group_size: int = 4            # M
  eps: float = 0.006             # t ~ U(eps, T)
  T: float = 0.994
  k: int = 15                    # the step is 2^-k of the mapped variable's range (mapping_delta)
  eta_max: float = 160.0         # the eta mapping's range: delta = (eta_max - eta_min) / 2^k
  eta_min: float = 0.0
  min_gap: float = 0.0           # Delta of the fp16 variant: r <= t - Delta (0 disables)
  kernel: str = "laplace"        # KERNELS
  kernel_c: float = KERNEL_C     # pseudo_huber's c in units of rho = u sqrt(D) (KERNELS)
  weight_a: float = 1.0
  weight_b: float = 5.0
  label_dropout: float = 0.0
  mapping: str = "eta"           # MAPPINGS
  weighting: str = "full"        # WEIGHTINGS

  @classmethod
  def from_config(cls, cfg) -> "IMMConfig":
    return cls(group_size=int(cfg.group_size), eps=float(cfg.eps), T=float(cfg.T), k=int(cfg.k),
               eta_max=float(cfg.eta_max), eta_min=float(cfg.eta_min), min_gap=float(cfg.min_gap),
               kernel=cfg.kernel, weight_a=float(cfg.weight_a), weight_b=float(cfg.weight_b),
               label_dropout=float(cfg.label_dropout),
               # config.json of runs from before these options: the paper's choices
               mapping=cfg.get("mapping", "eta"), weighting=cfg.get("weighting", "full"),
               kernel_c=float(cfg.get("kernel_c", KERNEL_C)))

  def __post_init__(self):
    if self.kernel not in KERNELS:
      raise ValueError(f"unknown kernel {self.kernel!r} (config.imm.kernel): choose one of {KERNELS}")
    if not self.kernel_c > 0:
      raise ValueError(f"config.imm.kernel_c (pseudo_huber's c) must be > 0, got {self.kernel_c}")
    if self.group_size < 1:
      raise ValueError(f"config.imm.group_size must be >= 1, got {self.group_size}")
    if not 0.0 <= self.eps < self.T <= 1.0:
      raise ValueError(f"need 0 <= config.imm.eps < config.imm.T <= 1, got eps={self.eps}, T={self.T}")
    if self.mapping not in MAPPINGS:
      raise ValueError(f"unknown mapping {self.mapping!r} (config.imm.mapping): choose one of {MAPPINGS}")
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f"unknown weighting {self.weighting!r} (config.imm.weighting): choose one of {WEIGHTINGS}")
    if self.mapping in ("logsnr", "inv_eta") and self.eps <= 0:
      raise ValueError(f"config.imm.mapping={self.mapping!r} needs config.imm.eps > 0: its step is a fraction "
                       "of the range over [eps, T], infinite at eps = 0 (the paper used eps=0.001)")
    if self.mapping == "logsnr" and self.T >= 1:
      raise ValueError("config.imm.mapping='logsnr' needs config.imm.T < 1: lambda(1) is -infinity")


def eta_decrement_r(s, t, interpolant: Interpolant, k: int, eta_max: float = 160.0,
                    eta_min: float = 0.0, min_gap: float = 0.0):
  """r(s, t) = max(s, min(t - Delta, eta^-1(eta(t) - (eta_max - eta_min) / 2^k))) (App. C.6, I.6):
  mapped_r with the paper's mapping."""
  cfg = IMMConfig(k=k, eta_max=eta_max, eta_min=eta_min, min_gap=min_gap, mapping="eta")
  return mapped_r(s, t, cfg, interpolant)


def mapping_delta(cfg: IMMConfig, interpolant: Interpolant) -> float:
  """The mapping's constant step: 2^-k of its variable's range, (eta_max - eta_min) for eta (the paper's
  constants) and the range over the training times [eps, T] for the others."""
  if cfg.mapping == "eta":
    span = cfg.eta_max - cfg.eta_min
  elif cfg.mapping == "t":
    span = cfg.T - cfg.eps
  elif cfg.mapping == "logsnr":
    span = float(interpolant.logsnr(cfg.eps) - interpolant.logsnr(cfg.T))
  else:
    span = float(1.0 / interpolant.eta(cfg.eps) - 1.0 / interpolant.eta(cfg.T))
  return span / 2.0**cfg.k


def mapped_r(s, t, cfg: IMMConfig, interpolant: Interpolant):
  """r(s, t) by ``cfg.mapping``, a constant step from t towards the data (App. C.6; Fig. 11 compares them):

    eta      eta(r) = eta(t) - delta           (the paper's choice; eta_decrement_r), >= eta_min
    t        r = t - delta
    logsnr   lambda(r) = lambda(t) + delta     i.e. eta(r) = eta(t) exp(-delta / 2)
    inv_eta  1/eta(r) = 1/eta(t) + delta       i.e. eta(r) = eta(t) / (1 + delta eta(t))

  with delta = mapping_delta(cfg), then r = max(s, min(t - min_gap, r)). (The paper names
  the logsnr mapping a "decrement in lambda"; lambda = 2 log(alpha / sigma) grows towards the data, so
  the step that moves t towards the data adds to it.)
  """
  delta = mapping_delta(cfg, interpolant)
  if cfg.mapping == "eta":
    # Clamped at eta_min: below it eta^-1 leaves [0, 1) (e.g. k <= 7 at small t would give r > t).
    r = interpolant.eta_inv(jnp.maximum(interpolant.eta(t) - delta, cfg.eta_min))
  elif cfg.mapping == "t":
    r = t - delta
  elif cfg.mapping == "logsnr":
    r = interpolant.eta_inv(interpolant.eta(t) * math.exp(-0.5 * delta))
  else:
    eta_t = interpolant.eta(t)
    r = interpolant.eta_inv(eta_t / (1.0 + delta * eta_t))
  if cfg.min_gap > 0:
    r = jnp.minimum(t - cfg.min_gap, r)
  return jnp.maximum(s, r)


def sample_times(rng, num_groups: int, cfg: IMMConfig, interpolant: Interpolant):
  """One (s, r, t) per group: t ~ U(eps, T), s ~ U(eps, t), r = mapped_r(s, t)."""
  k_t, k_s = jax.random.split(rng)
  t = jax.random.uniform(k_t, (num_groups,), jnp.float32, cfg.eps, cfg.T)
  s = cfg.eps + (t - cfg.eps) * jax.random.uniform(k_s, (num_groups,), jnp.float32)
  return s, mapped_r(s, t, cfg, interpolant), t


def time_weight(t, interpolant: Interpolant, a: float, b: float, weighting: str = "full"):
  """w(s, t) = 1/2 sigmoid(b - lambda_t) (-d lambda/dt) alpha_t^a / (alpha_t^2 + sigma_t^2) (Eq. 13).

  ``weighting`` keeps the leading factors only (Table 4's ablation): none (w = 1), elbo (the first
  two), elbo_alpha (and alpha_t^a), full (all). t is kept inside [1e-7, 1 - 1e-7]: at t = 0 (eps = 0
  runs) the formula reads 0 * inf, while its limit is 0, which the clamped value reproduces to ~1e-5.
  """
  if weighting == "none":
    return jnp.ones_like(t)
  t = jnp.clip(t, 1e-7, 1.0 - 1e-7)
  alpha, sigma = interpolant.alpha(t), interpolant.sigma(t)
  w = 0.5 * jax.nn.sigmoid(b - interpolant.logsnr(t)) * interpolant.neg_dlogsnr_dt(t)
  if weighting in ("elbo_alpha", "full"):
    w = w * alpha**a
  if weighting == "full":
    w = w / (alpha**2 + sigma**2)
  return w


def pairwise_sq_distance(a, b):
  """Squared Euclidean distances between the rows of a (G, M, D) and b (G, N, D) -> (G, M, N).

  Written as a difference (not the |a|^2 + |b|^2 - 2ab expansion) so nearby particles keep full
  relative precision: kernel widths are tiny when t - s is small.
  """
  diff = a[:, :, None, :] - b[:, None, :, :]
  return jnp.sum(diff * diff, axis=-1)


def kernel_matrix(a, b, scale, kind: str = "laplace", c: float = KERNEL_C):
  """k_{s,t}(a, b) per group; scale = w~(s, t) with shape (G,). D normalises by the sample size.

  With u = w~ max(||a - b||, eps_k) / D (the max taken on the squared distance, so the gradient at
  coincident points is exactly 0 rather than 0 * inf): Laplace exp(-u) (the paper's), energy -u, squared
  -u^2 / 2, pseudo_huber c' - sqrt(u^2 + c'^2) with c' = c / sqrt(D) (KERNELS); RBF exp(-w~ ||a - b||^2 / (2 D))
  (the spec's).
  """
  dim = a.shape[-1]
  sq = pairwise_sq_distance(a, b)
  scale = scale[:, None, None]
  if kind == "rbf":
    return jnp.exp(-0.5 * scale * sq / dim)
  if kind == "squared":
    return -0.5 * jnp.square(scale / dim) * sq
  u = scale * jnp.sqrt(jnp.maximum(sq, KERNEL_DIST_EPS**2)) / dim
  if kind == "laplace":
    return jnp.exp(-u)
  if kind == "energy":
    return -u
  if kind == "pseudo_huber":  # c' - sqrt(u^2 + c'^2), written without its cancellation for u << c'
    c = c / math.sqrt(dim)
    return -jnp.square(u) / (c + jnp.sqrt(jnp.square(u) + c * c))
  raise ValueError(f"unknown kernel {kind!r} (config.imm.kernel): choose one of {KERNELS}")


def group_mmd(y_t, y_r, scale, kind: str = "laplace", c: float = KERNEL_C):
  """V-statistic MMD^2 per group over the full M x M blocks, diagonals included (Eq. 67).

  y_t, y_r: (G, M, D); scale: (G,). Returns (G,). For every kernel of KERNELS it is >= 0: the
  conditionally positive definite ones (energy, squared, pseudo_huber) give v^T K v >= 0 for the
  weights v = (1/M, ..., -1/M, ...), which sum to 0. The squared kernel's is (w~ / D)^2 ||mean(y_t) - mean(y_r)||^2,
  computed so: its three blocks are large and nearly cancel, which float32 would not resolve.
  """
  if kind == "squared":
    diff = jnp.mean(y_t, axis=1) - jnp.mean(y_r, axis=1)
    return jnp.square(scale / y_t.shape[-1]) * jnp.sum(diff * diff, axis=-1)
  k_tt = kernel_matrix(y_t, y_t, scale, kind, c).mean(axis=(1, 2))
  k_rr = kernel_matrix(y_r, y_r, scale, kind, c).mean(axis=(1, 2))
  k_tr = kernel_matrix(y_t, y_r, scale, kind, c).mean(axis=(1, 2))
  return k_tt + k_rr - 2.0 * k_tr


def kernel_distances(y_t, y_r, scale):
  """How far apart the kernel sees the particles, in rho = u sqrt(D) = w~ ||a - b|| / sqrt(D) (KERNELS):
  ``rho_target``, the median over particles of y_t's distance to its own y_r, and ``rho_particles``,
  the median over groups of the mean over pairs j != l of the distance between y_t^j and y_t^l (0 when
  M = 1). Medians: w~ grows as 1 / (t - s), so the few groups with a tiny t - s would set a mean. (With
  gradient accumulation, the mean of the micro-batches' medians.)"""
  dim, m = y_t.shape[-1], y_t.shape[1]
  unit = scale[:, None] / math.sqrt(dim)
  target = unit * jnp.sqrt(jnp.sum(jnp.square(y_t - y_r), axis=-1))
  pairs = jnp.sqrt(pairwise_sq_distance(y_t, y_t)) * unit[:, :, None]
  off_diagonal = jnp.sum(pairs, axis=(1, 2)) / max(m * (m - 1), 1)
  return {"rho_target": jnp.median(target), "rho_particles": jnp.median(off_diagonal)}


def drop_labels(rng, labels, p: float, null_label: int):
  """Replace each label by the null label with probability p (classifier-free guidance training)."""
  if labels is None or p <= 0:
    return labels
  keep = jax.random.uniform(rng, labels.shape) >= p
  return jnp.where(keep, labels, null_label)


@dataclasses.dataclass(frozen=True)
class IMMObjective:
  """IMM as a trainer objective: ``prepare`` draws all randomness of a global batch, ``loss`` is the
  mean over the groups it is given, so splitting the prepared batch into micro-batches of whole
  groups (gradient accumulation, device sharding) leaves the result unchanged.

  ``net_apply(params, x_in, c_t, c_s, labels, rng[, augment_labels=]) -> G`` runs the network in
  training mode (dropout draws from ``rng``). ``null_label`` is None for unconditional models. With
  ``augment``, both passes of a particle see its image's augmentation labels.
  """

  net_apply: Callable[..., Any]
  precond: Precond
  cfg: IMMConfig
  null_label: int | None = None
  augment: augment_lib.Augment | None = None

  @property
  def group_size(self) -> int:
    return self.cfg.group_size

  def prepare(self, batch, rng):
    x = batch["x"].astype(jnp.float32)
    b, m = x.shape[0], self.cfg.group_size
    if b % m:
      raise ValueError(f"the batch size {b} must be a multiple of config.imm.group_size={m}")
    x, rng, extra = augment_lib.augment_inputs(self.augment, x, rng)
    ip = self.precond.interpolant
    k_time, k_noise, k_drop = jax.random.split(rng, 3)
    s, r, t = (jnp.repeat(v, m) for v in sample_times(k_time, b // m, self.cfg, ip))
    noise = gaussian(k_noise, x.shape, self.precond.sigma_d)
    inputs = {
        "x_t": expand_to(ip.alpha(t), x) * x + expand_to(ip.sigma(t), x) * noise,
        # x_r = DDIM(x_t, x, r, t) = alpha_r x + sigma_r eps: the same x and eps as x_t (App. C.2).
        "x_r": expand_to(ip.alpha(r), x) * x + expand_to(ip.sigma(r), x) * noise,
        "s": s, "r": r, "t": t, **extra,
    }
    if self.null_label is not None:
      # One dropped label serves both passes.
      inputs["label"] = drop_labels(k_drop, batch["label"], self.cfg.label_dropout, self.null_label)
    return inputs

  def loss(self, params, inputs, rng):
    """(loss, metrics) for prepared inputs; gradients flow through y_t only (theta^- = sg(theta))."""
    m = self.cfg.group_size
    b = inputs["x_t"].shape[0]
    g = b // m
    labels = inputs.get("label")
    net_kwargs = augment_lib.net_kwargs(inputs)
    k_t, k_r = jax.random.split(rng)

    def f(p, x_in, s_in, t_in, key):
      apply = lambda xi, ct, cs, y: self.net_apply(p, xi, ct, cs, y, key, **net_kwargs)
      return denoise(apply, self.precond, x_in, s_in, t_in, labels)

    s, r, t = inputs["s"], inputs["r"], inputs["t"]
    y_t = f(params, inputs["x_t"], s, t, k_t)
    y_r = jax.lax.stop_gradient(f(jax.lax.stop_gradient(params), inputs["x_r"], s, r, k_r))
    s_g, r_g, t_g = s[::m], r[::m], t[::m]
    scale = self.precond.kernel_scale(s_g, t_g)
    y_t, y_r = y_t.reshape(g, m, -1), y_r.reshape(g, m, -1)
    mmd = group_mmd(y_t, y_r, scale, self.cfg.kernel, self.cfg.kernel_c)
    w = time_weight(t_g, self.precond.interpolant, self.cfg.weight_a, self.cfg.weight_b, self.cfg.weighting)
    loss = jnp.mean(w * mmd)
    metrics = {"loss": loss, "mmd": jnp.mean(mmd), "t_minus_r": jnp.mean(t_g - r_g),
               "base_case_frac": jnp.mean((r_g == s_g).astype(jnp.float32)),
               **kernel_distances(y_t, y_r, scale)}
    return loss, metrics
