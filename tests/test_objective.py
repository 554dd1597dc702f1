"""The IMM objective (imm_jax.objectives.imm.IMMObjective) checked against the spec (imm.md section 3).

The expected loss is a NumPy float64 transcription of the spec's compact reference (section 3.2 code
block) evaluated on the same prepared inputs; gradients are compared with a hand-written version in
which the target y_r is a constant. Nothing here uses the code under test to produce expected values.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imm_jax.interpolants import Interpolant
from imm_jax.models.precond import Precond
from imm_jax.objectives.imm import IMMConfig, IMMObjective, drop_labels

SIGMA_D = 0.5
D = 6
M = 4
NUM_CLASSES = 3
NULL = NUM_CLASSES
REPO = Path(__file__).resolve().parents[1]


# -- a tiny network G(x_in, c_t, c_s, labels) and its float64 twin ---------------------------------------


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "w": rng.standard_normal((D, D)) / np.sqrt(D),
      "u": rng.standard_normal(D),
      "v": rng.standard_normal(D),
      "emb": 0.5 * rng.standard_normal((NUM_CLASSES + 1, D)),
  }


def to_jax(params):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def net_apply(params, x_in, c_t, c_s, labels, rng):
  del rng
  h = x_in @ params["w"] + (c_t / 1000.0)[:, None] * params["u"] + (c_s / 1000.0)[:, None] * params["v"]
  if labels is not None:
    h = h + params["emb"][labels]
  return jnp.tanh(h)


def _net(xp, params, x_in, c_t, c_s, labels):
  h = x_in @ params["w"] + (c_t / 1000.0)[:, None] * params["u"] + (c_s / 1000.0)[:, None] * params["v"]
  if labels is not None:
    h = h + params["emb"][labels]
  return xp.tanh(h)


def reference_loss(xp, params_t, params_r, inputs, *, f_type, temb, kernel, a, b, m=M, outputs=False):
  """Spec section 3.2 compact reference (OT-FM), in backend ``xp`` (np for float64 values, jnp for grads).

  y_t = f(params_t, x_t, s, t); y_r = f(params_r, x_r, s, r); Laplace (or another) kernel with width
  1 / |c_out(s, t)|, V-statistic MMD per group, weighted by w(t) and averaged over groups. ``outputs``:
  (y_t, y_r) grouped (G, M, D) and the kernel widths (G,) instead."""
  x_t, x_r, s, r, t = (inputs[k] for k in ("x_t", "x_r", "s", "r", "t"))
  labels = inputs.get("label")
  alpha = lambda u: 1.0 - u
  sigma = lambda u: u

  def coeffs(s_, t_):
    a_t, s_t, a_s, s_s = alpha(t_), sigma(t_), alpha(s_), sigma(s_)
    if f_type == "identity":
      return s_s / s_t, a_s - (s_s / s_t) * a_t
    if f_type == "simple_edm":
      return ((a_s * a_t + s_s * s_t) / (a_t**2 + s_t**2),
              -SIGMA_D * (a_s * s_t - s_s * a_t) / xp.sqrt(a_t**2 + s_t**2))
    return xp.ones_like(t_), -(t_ - s_) * SIGMA_D

  def f(p, x, s_, t_):
    c_in = 1.0 / (SIGMA_D * xp.sqrt(alpha(t_) ** 2 + sigma(t_) ** 2))
    second = 1000.0 * (s_ if temb == "identity" else t_ - s_)
    g = _net(xp, p, c_in[:, None] * x, 1000.0 * t_, second, labels)
    c_skip, c_out = coeffs(s_, t_)
    return c_skip[:, None] * x + c_out[:, None] * g

  yt = f(params_t, x_t, s, t)
  yr = f(params_r, x_r, s, r)
  n_groups = x_t.shape[0] // m
  dim = x_t.shape[1]
  yt, yr = yt.reshape(n_groups, m, dim), yr.reshape(n_groups, m, dim)
  tg, sg = t[::m], s[::m]
  wt = 1.0 / xp.abs(coeffs(sg, tg)[1])
  if outputs:
    return yt, yr, wt

  def K(u, v):
    sq = ((u[:, :, None, :] - v[:, None, :, :]) ** 2).sum(-1)
    if kernel == "rbf":
      return xp.exp(-0.5 * wt[:, None, None] * sq / dim)
    u = wt[:, None, None] * xp.sqrt(xp.maximum(sq, 1e-16)) / dim   # max(||.||, 1e-8)
    c = 0.1 / dim**0.5  # pseudo-Huber's default c, 0.1, is in units of u sqrt(D)
    return {"laplace": lambda: xp.exp(-u), "energy": lambda: -u,
            "squared": lambda: -0.5 * wt[:, None, None] ** 2 * sq / dim**2,
            "pseudo_huber": lambda: c - xp.sqrt(u**2 + c**2)}[kernel]()

  mmd = K(yt, yt).mean((1, 2)) + K(yr, yr).mean((1, 2)) - 2 * K(yt, yr).mean((1, 2))
  lam = 2 * xp.log(alpha(tg) / sigma(tg))
  w = 0.5 / (1 + xp.exp(-(b - lam))) * (2 / (tg * (1 - tg))) * alpha(tg) ** a / (alpha(tg) ** 2 + sigma(tg) ** 2)
  return (w * mmd).mean()


def make_objective(f_type="euler_fm", temb="identity", kernel="laplace", a=1.0, b=4.0, k=12, eps=0.0,
                   label_dropout=0.0, null_label=NULL, apply=net_apply):
  cfg = IMMConfig(group_size=M, eps=eps, T=0.994, k=k, kernel=kernel, weight_a=a, weight_b=b,
                  label_dropout=label_dropout)
  return IMMObjective(net_apply=apply, precond=Precond(Interpolant("ot_fm"), f_type=f_type, temb_type=temb),
                      cfg=cfg, null_label=null_label)


def make_batch(n, seed=0, shape=(D,)):
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(rng.standard_normal((n,) + shape), jnp.float32),
          "label": jnp.asarray(rng.integers(0, NUM_CLASSES, n), jnp.int32)}


def prepare(obj, batch, key):
  # Eager on purpose: op-by-op compilations are cached across objectives (jit would recompile the
  # random-number generation for every configuration), which keeps this file fast.
  return obj.prepare(batch, key)


def np_inputs(inputs):
  return {k: np.asarray(v, np.float64) if k != "label" else np.asarray(v) for k, v in inputs.items()}


# -- prepare ----------------------------------------------------------------------------------------------


def test_prepare_groups_share_times_in_repeat_interleave_layout():
  obj = make_objective(k=8)
  inputs = prepare(obj, make_batch(32), jax.random.key(0))
  s, r, t = (np.asarray(inputs[k]) for k in ("s", "r", "t"))
  assert s.shape == r.shape == t.shape == (32,)
  for v in (s, r, t):
    groups = v.reshape(8, M)
    np.testing.assert_array_equal(groups, np.repeat(groups[:, :1], M, axis=1))  # consecutive M share
  assert len(np.unique(t)) == 8                                                   # one draw per group
  assert np.all(s <= r) and np.all(r < t) and np.all(t <= 0.994) and np.all(s >= 0.0)


def test_prepare_x_t_and_x_r_share_x_and_noise():
  obj = make_objective(eps=0.006)
  batch = make_batch(32, seed=1, shape=(4, 4, 3))  # image-shaped: per-example times broadcast over H, W, C
  inputs = np_inputs(prepare(obj, batch, jax.random.key(1)))
  x = np.asarray(batch["x"], np.float64)
  s, r, t = (inputs[k][:, None, None, None] for k in ("s", "r", "t"))
  noise = (inputs["x_t"] - (1 - t) * x) / t           # x_t = alpha_t x + sigma_t eps
  # x_r = alpha_r x + sigma_r eps with the same eps ...
  np.testing.assert_allclose(inputs["x_r"], (1 - r) * x + r * noise, atol=2e-5)
  # ... which is DDIM(x_t, x, r, t) (Eq. 11)
  ddim = (1 - r - (r / t) * (1 - t)) * x + (r / t) * inputs["x_t"]
  np.testing.assert_allclose(inputs["x_r"], ddim, atol=2e-5)
  # eps ~ N(0, sigma_d^2)
  assert abs(noise.mean()) < 0.03 and abs(noise.std() - SIGMA_D) < 0.02
  # the noise differs across examples of a group (particles are different draws)
  assert not np.allclose(noise[0], noise[1])


def test_prepare_rejects_partial_groups():
  with pytest.raises(ValueError):
    make_objective().prepare(make_batch(10), jax.random.key(0))


# -- label dropout ----------------------------------------------------------------------------------------


def test_label_dropout_probabilities():
  batch = make_batch(32, seed=2)
  labels = np.asarray(batch["label"])
  all_null = np.asarray(prepare(make_objective(label_dropout=1.0), batch, jax.random.key(0))["label"])
  np.testing.assert_array_equal(all_null, NULL)
  none = np.asarray(prepare(make_objective(label_dropout=0.0), batch, jax.random.key(0))["label"])
  np.testing.assert_array_equal(none, labels)
  # drop_labels itself: each label independently with probability p (p = 0.1 for ImageNet)
  many = jnp.asarray(np.random.default_rng(3).integers(0, NUM_CLASSES, 20_000), jnp.int32)
  out = np.asarray(drop_labels(jax.random.key(3), many, 0.1, NULL))
  dropped = out == NULL
  assert abs(dropped.mean() - 0.1) < 0.007
  np.testing.assert_array_equal(out[~dropped], np.asarray(many)[~dropped])
  np.testing.assert_array_equal(np.asarray(drop_labels(jax.random.key(3), many, 1.0, NULL)), NULL)
  np.testing.assert_array_equal(np.asarray(drop_labels(jax.random.key(3), many, 0.0, NULL)), np.asarray(many))


def test_both_passes_get_the_same_dropped_labels_and_the_spec_time_inputs():
  calls = []

  def recording_apply(params, x_in, c_t, c_s, labels, rng):
    record = lambda *a: calls.append(dict(zip(("x_in", "c_t", "c_s", "labels"),
                                              (np.asarray(v, np.float64) for v in a))))
    jax.debug.callback(record, x_in, c_t, c_s, labels, ordered=True)
    return net_apply(params, x_in, c_t, c_s, labels, rng)

  inputs = prepare(make_objective(label_dropout=0.5, k=8), make_batch(32, seed=3), jax.random.key(4))
  for temb in ("identity", "stride"):
    calls.clear()
    obj = make_objective(temb=temb, label_dropout=0.5, apply=recording_apply, k=8)
    jax.block_until_ready(jax.jit(obj.loss)(to_jax(make_params()), inputs, jax.random.key(5)))
    jax.effects_barrier()
    assert len(calls) == 2
    online, target = calls
    lab = np.asarray(inputs["label"])
    assert 0 < np.sum(lab == NULL) < 32
    np.testing.assert_array_equal(online["labels"], lab)
    np.testing.assert_array_equal(target["labels"], lab)
    ni = np_inputs(inputs)
    s, r, t = ni["s"], ni["r"], ni["t"]
    # online pass at (s, t), target pass at (s, r)
    np.testing.assert_allclose(online["c_t"], 1000 * t, rtol=1e-6)
    np.testing.assert_allclose(target["c_t"], 1000 * r, rtol=1e-6)
    np.testing.assert_allclose(online["c_s"], 1000 * (s if temb == "identity" else t - s), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(target["c_s"], 1000 * (s if temb == "identity" else r - s), rtol=1e-5, atol=1e-4)
    c_in = lambda u: 1 / (SIGMA_D * np.sqrt((1 - u) ** 2 + u**2))
    np.testing.assert_allclose(online["x_in"], c_in(t)[:, None] * ni["x_t"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(target["x_in"], c_in(r)[:, None] * ni["x_r"], rtol=1e-5, atol=1e-6)


# -- the loss value ---------------------------------------------------------------------------------------


LOSS_CASES = [
    # f_type, temb, kernel, a, b, k, eps
    ("euler_fm", "identity", "laplace", 1.0, 4.0, 12, 0.0),    # ImageNet
    ("euler_fm", "stride", "laplace", 2.0, 4.0, 12, 0.0),      # ImageNet XL best
    ("simple_edm", "identity", "laplace", 1.0, 5.0, 15, 0.006),  # CIFAR
    ("identity", "identity", "laplace", 1.0, 4.0, 8, 0.006),
    ("euler_fm", "identity", "rbf", 1.0, 4.0, 8, 0.0),
    ("euler_fm", "identity", "energy", 1.0, 4.0, 8, 0.0),
    ("simple_edm", "identity", "squared", 1.0, 5.0, 10, 0.006),
    ("euler_fm", "stride", "pseudo_huber", 1.0, 4.0, 12, 0.0),
]


@pytest.mark.parametrize("f_type,temb,kernel,a,b,k,eps", LOSS_CASES)
def test_loss_matches_numpy_reference(f_type, temb, kernel, a, b, k, eps):
  obj = make_objective(f_type=f_type, temb=temb, kernel=kernel, a=a, b=b, k=k, eps=eps, label_dropout=0.3)
  inputs = prepare(obj, make_batch(32, seed=4), jax.random.key(6))
  params = make_params(1)
  loss, metrics = jax.jit(obj.loss)(to_jax(params), inputs, jax.random.key(0))
  expected = reference_loss(np, params, params, np_inputs(inputs), f_type=f_type, temb=temb, kernel=kernel,
                            a=a, b=b)
  assert float(loss) == pytest.approx(expected, rel=2e-4, abs=1e-7)
  assert float(metrics["loss"]) == pytest.approx(float(loss))
  assert expected > 1e-5  # non-trivial: the test can fail


def test_loss_is_zero_for_the_exact_point_mass_predictor():
  # Data = one point x0. The exact x-predictor gives f_{s,t}(x_t) = DDIM(x_t, x0, s, t) = alpha_s x0 + sigma_s eps
  # and, because x_r reuses x and eps, f_{s,r}(x_r) is the same point: every MMD is 0 (for any r).
  x0 = np.linspace(-1, 1, D)

  def oracle(params, x_in, c_t, c_s, labels, rng):  # euler_fm: f = x - (t - s) sigma_d G, G = (x - x0) / (t sigma_d)
    t = c_t / 1000.0
    x = x_in * (SIGMA_D * jnp.sqrt((1 - t) ** 2 + t**2))[:, None]
    return (x - jnp.asarray(x0, jnp.float32)) / (SIGMA_D * t[:, None]) + 0 * params["u"]

  obj = make_objective(k=8, eps=0.006, apply=oracle, null_label=None)
  batch = {"x": jnp.asarray(np.broadcast_to(x0, (32, D)), jnp.float32)}
  inputs = prepare(obj, batch, jax.random.key(7))
  loss, metrics = jax.jit(obj.loss)(to_jax(make_params()), inputs, jax.random.key(0))
  assert abs(float(loss)) < 1e-4
  ni = np_inputs(inputs)
  np.testing.assert_allclose(float(metrics["base_case_frac"]), np.mean(ni["r"][::M] == ni["s"][::M]))
  np.testing.assert_allclose(float(metrics["t_minus_r"]), np.mean(ni["t"][::M] - ni["r"][::M]), rtol=1e-5)
  # sensitivity: a predictor that is wrong by a constant makes the loss positive
  bad = make_objective(k=8, eps=0.006, null_label=None,
                       apply=lambda p, xi, ct, cs, y, rng: oracle(p, xi, ct, cs, y, rng) + 0.5)
  assert float(jax.jit(bad.loss)(to_jax(make_params()), inputs, jax.random.key(0))[0]) > 1e-3


def test_kernel_distance_metrics():
  """rho = w~ ||a - b|| / sqrt(D): y_t to its own y_r (median over particles), and between the particles
  of a group (mean over j != l, median over groups)."""
  obj = make_objective(f_type="simple_edm", k=8, eps=0.006)
  inputs = prepare(obj, make_batch(32, seed=5), jax.random.key(8))
  params = make_params(2)
  _, metrics = jax.jit(obj.loss)(to_jax(params), inputs, jax.random.key(0))
  yt, yr, wt = reference_loss(np, params, params, np_inputs(inputs), f_type="simple_edm", temb="identity",
                              kernel="laplace", a=1.0, b=4.0, outputs=True)
  root_d = math.sqrt(yt.shape[-1])
  target = wt[:, None] * np.linalg.norm(yt - yr, axis=-1) / root_d
  pairs = [np.mean([wt[i] * np.linalg.norm(yt[i, j] - yt[i, l]) / root_d
                    for j in range(M) for l in range(M) if j != l]) for i in range(yt.shape[0])]
  assert float(metrics["rho_target"]) == pytest.approx(np.median(target), rel=1e-4)
  assert float(metrics["rho_particles"]) == pytest.approx(np.median(pairs), rel=1e-4)
  assert np.median(pairs) > 2 * np.median(target) > 0  # distinct particles are far apart, a target is near


@pytest.mark.parametrize("eps", [0.0, 0.006])
def test_loss_finite_when_a_group_draws_t_equal_eps(eps):
  obj = make_objective(k=12, eps=eps)
  batch = make_batch(32, seed=4)
  inputs = dict(prepare(obj, batch, jax.random.key(6)))
  x = np.asarray(batch["x"][:M], np.float64)
  for key in ("s", "r", "t"):   # group 0 draws t = eps: then s = eps + (t - eps) u = eps and r = s
    inputs[key] = inputs[key].at[:M].set(eps)
  n = SIGMA_D * np.random.default_rng(0).standard_normal(x.shape)
  x_t = jnp.asarray((1 - eps) * x + eps * n, jnp.float32)
  inputs["x_t"] = inputs["x_t"].at[:M].set(x_t)
  inputs["x_r"] = inputs["x_r"].at[:M].set(x_t)
  params = to_jax(make_params(1))
  loss, grads = jax.jit(jax.value_and_grad(lambda p: obj.loss(p, inputs, jax.random.key(0))[0]))(params)
  assert np.isfinite(float(loss))
  # the degenerate group contributes 0 (y_t = y_r = x_t), so the loss is 7/8 of the other 7 groups' mean
  rest = {k: v[M:] for k, v in inputs.items()}
  assert float(loss) == pytest.approx(7 / 8 * float(jax.jit(obj.loss)(params, rest, jax.random.key(0))[0]),
                                      rel=1e-5)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


# -- gradients --------------------------------------------------------------------------------------------


def test_gradient_flows_through_y_t_only(f_type="simple_edm"):
  obj = make_objective(f_type=f_type, k=8, label_dropout=0.3)
  inputs = prepare(obj, make_batch(32, seed=5), jax.random.key(8))
  params = to_jax(make_params(2))
  g_code = jax.jit(jax.grad(lambda p: obj.loss(p, inputs, jax.random.key(0))[0]))(params)

  ji = {k: v for k, v in inputs.items()}
  kw = dict(f_type=f_type, temb="identity", kernel="laplace", a=1.0, b=4.0)
  frozen = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), params)   # a constant copy: y_r is a constant
  g_manual = jax.jit(jax.grad(lambda p: reference_loss(jnp, p, frozen, ji, **kw)))(params)
  g_both = jax.jit(jax.grad(lambda p: reference_loss(jnp, p, p, ji, **kw)))(params)
  for key in params:
    np.testing.assert_allclose(np.asarray(g_code[key]), np.asarray(g_manual[key]), rtol=2e-3, atol=1e-6)
  # sensitivity: differentiating through y_r as well gives a different gradient
  diff = max(float(jnp.abs(g_both[k] - g_manual[k]).max()) for k in params)
  scale = max(float(jnp.abs(g_manual[k]).max()) for k in params)
  assert diff > 1e-2 * scale


def test_microbatches_of_whole_groups_average_to_the_full_batch_loss():
  obj = make_objective(k=8, label_dropout=0.3)
  inputs = prepare(obj, make_batch(32, seed=6), jax.random.key(9))  # 8 groups
  params = to_jax(make_params(3))
  loss_fn = jax.jit(lambda p, i: obj.loss(p, i, jax.random.key(0))[0])
  grad_fn = jax.jit(jax.grad(lambda p, i: obj.loss(p, i, jax.random.key(0))[0]))
  full = float(loss_fn(params, inputs))
  g_full = grad_fn(params, inputs)
  for chunk in (8,):  # 4 micro-batches of 2 groups
    parts = [{k: v[i:i + chunk] for k, v in inputs.items()} for i in range(0, 32, chunk)]
    losses = [float(loss_fn(params, p)) for p in parts]
    assert np.mean(losses) == pytest.approx(full, rel=1e-5)
    grads = [grad_fn(params, p) for p in parts]
    for key in params:
      np.testing.assert_allclose(np.mean([np.asarray(g[key]) for g in grads], 0), np.asarray(g_full[key]),
                                 rtol=1e-4, atol=1e-7)
  assert len(set(losses)) > 1  # the groups differ


# -- sharding over 8 simulated CPU devices ----------------------------------------------------------------


_SHARDED_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    import flax.linen as nn
    from jax.sharding import NamedSharding, PartitionSpec as P
    from imm_jax.interpolants import Interpolant
    from imm_jax.models.precond import Precond
    from imm_jax.objectives.imm import IMMConfig, IMMObjective
    from imm_jax.parallel import create_mesh

    assert jax.device_count() == 8, jax.devices()

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x, c_t, c_s, labels=None):
        h = jnp.concatenate([x, c_t[:, None] / 1000.0, c_s[:, None] / 1000.0], -1)
        h = jnp.tanh(nn.Dense(16)(h))
        return nn.Dense(x.shape[-1])(h)

    net = Net()
    apply = lambda p, x, ct, cs, y, rng: net.apply({"params": p}, x, ct, cs, y)
    obj = IMMObjective(apply, Precond(Interpolant("ot_fm"), "euler_fm", "stride"),
                       IMMConfig(group_size=4, eps=0.0, T=0.994, k=8, weight_a=2.0, weight_b=4.0))
    rng = np.random.default_rng(0)
    params = {"Dense_0": {"kernel": rng.standard_normal((10, 16)) / 3, "bias": rng.standard_normal(16)},
              "Dense_1": {"kernel": rng.standard_normal((16, 8)) / 4, "bias": rng.standard_normal(8)}}
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    # a prepared batch (the layout prepare() produces): 16 groups of 4 sharing (s, r, t)
    t = rng.uniform(0.05, 0.994, 16); s = t * rng.uniform(size=16); r = s + (t - s) * rng.uniform(size=16)
    x, n = rng.standard_normal((64, 8)), 0.5 * rng.standard_normal((64, 8))
    s, r, t = (np.repeat(v, 4)[:, None] for v in (s, r, t))
    inputs = {"x_t": (1 - t) * x + t * n, "x_r": (1 - r) * x + r * n, "s": s[:, 0], "r": r[:, 0], "t": t[:, 0]}
    inputs = jax.device_put(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), inputs), jax.devices()[0])
    loss_fn = jax.jit(lambda p, i: obj.loss(p, i, jax.random.key(2))[0])
    grad_fn = jax.jit(jax.grad(lambda p, i: obj.loss(p, i, jax.random.key(2))[0]))
    single = float(loss_fn(params, inputs))
    g_single = grad_fn(params, inputs)
    out = {"single": single, "sharded": {}}
    for fsdp in (1, 2):
      mesh = create_mesh(-1, fsdp)
      sh = NamedSharding(mesh, P(("data", "fsdp")))
      ins = jax.device_put(inputs, sh)
      ps = jax.device_put(params, NamedSharding(mesh, P()))
      n_dev = len(ins["x_t"].sharding.device_set)
      shard_rows = ins["x_t"].addressable_shards[0].data.shape[0]
      loss = float(loss_fn(ps, ins))
      gdiff = None
      if fsdp == 2:  # gradients once (each sharded compile costs about a second)
        g = grad_fn(ps, ins)
        gdiff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max() / (np.abs(np.asarray(b)).max() + 1e-12))
                    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_single)))
      out["sharded"][str(fsdp)] = {"loss": loss, "n_dev": n_dev, "rows": shard_rows, "grad_rel": gdiff}
    print("RESULT " + json.dumps(out))
""")


def test_loss_sharded_over_8_cpu_devices_equals_single_device(tmp_path):
  script = tmp_path / "sharded_loss.py"
  script.write_text(_SHARDED_SCRIPT)
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=240)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  out = json.loads(line[len("RESULT "):])
  assert out["single"] > 0
  for fsdp, res in out["sharded"].items():
    assert res["n_dev"] == 8, res
    assert res["rows"] == 8, res   # 64 rows / 8 devices = two whole groups of 4 per device
    assert res["loss"] == pytest.approx(out["single"], rel=1e-6), (fsdp, res)
  assert out["sharded"]["2"]["grad_rel"] < 1e-5, out
