"""Moment-matching distillation (imm_jax.objectives.moment_matching) against mm_distill.md.

The posterior is checked against the spec's precision form, both losses against NumPy transcriptions of
Algorithms 2 and 3 on a network linear in its parameters (so the teacher gradient and the parameter-space
JVP are written out by hand), the sign of the parameter version by gradient steps on a fixed batch, and
both versions end to end through the trainer with a flow-matching teacher trained in the test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from imm_jax import sampling
from imm_jax.configs_loader import load_config
from imm_jax.interpolants import Interpolant
from imm_jax.models.precond import Precond
from imm_jax.objectives.moment_matching import (MomentMatchingConfig, MomentMatchingObjective,
                                                adam_preconditioner, sample_times)

SIGMA_D = 0.5
D = 3
OT = Interpolant("ot_fm")


# -- the posterior q(z_s | z_t, x) --------------------------------------------------------------------------


def precision_form(z_t, x, s, t):
  """The spec's first form: var = (1/sigma_s^2 + alpha_{t|s}^2 / sigma_{t|s}^2)^-1,
  mean = var (alpha_{t|s} z_t / sigma_{t|s}^2 + alpha_s x / sigma_s^2), OT-FM, noise std sigma_d."""
  a_ts = (1 - t) / (1 - s)
  var_ts = t**2 - a_ts**2 * s**2
  var = 1.0 / (1.0 / s**2 + a_ts**2 / var_ts)
  return var * (a_ts * z_t / var_ts + (1 - s) * x / s**2), np.sqrt(var)


@pytest.mark.parametrize("s,t", [(0.1, 0.3), (0.5, 0.55), (0.02, 0.9), (0.7, 1.0)])
def test_posterior_matches_the_precision_form(s, t):
  rng = np.random.default_rng(0)
  z_t, x = rng.standard_normal(4), rng.standard_normal(4)
  mean, std = sampling.gaussian_posterior(jnp.asarray(z_t), jnp.asarray(x), s, t, OT)
  ref_mean, ref_std = precision_form(z_t, x, s, t)
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(std, ref_std, rtol=1e-5)


def test_posterior_boundaries():
  z_t, x = jnp.array([0.3, -2.0]), jnp.array([1.0, 0.5])
  mean, std = sampling.gaussian_posterior(z_t, x, 0.4, 1.0, OT)      # t = 1: forward diffusion q(z_s | x)
  np.testing.assert_allclose(mean, 0.6 * x, rtol=1e-6)
  assert float(std) == pytest.approx(0.4, rel=1e-6)
  mean, std = sampling.gaussian_posterior(z_t, x, 0.0, 0.3, OT)      # s = 0: the point mass at x
  np.testing.assert_allclose(mean, x, rtol=1e-6)
  assert float(std) == 0.0


def test_times_follow_algorithm_2():
  cfg = MomentMatchingConfig(k=4, s_min=0.01)
  s, t = (np.asarray(v) for v in sample_times(jax.random.key(0), 4096, cfg))
  assert np.all((s >= 0.01) & (s < 1) & (t > s - 1e-7) & (t - s <= 0.25 + 1e-6) & (t <= 1.0))
  assert 0.05 < np.mean(t == 1.0) < 0.2    # P(s + delta >= 1) = 1 / (2k)


def test_weight_is_flat_for_k_up_to_2_and_edm_above():
  from imm_jax.objectives.moment_matching import time_weight

  s = jnp.array([0.1, 0.5])
  np.testing.assert_allclose(time_weight(s, OT, MomentMatchingConfig(k=2)), [1.0, 1.0])
  np.testing.assert_allclose(time_weight(s, OT, MomentMatchingConfig(k=4)), [82.0, 2.0], rtol=1e-5)  # 1 + (1-s)^2/s^2
  np.testing.assert_allclose(time_weight(s, OT, MomentMatchingConfig(k=4, weight_max=50.0)), [50.0, 2.0])


# -- losses on a network linear in its parameters ---------------------------------------------------------


def linear_net(params, x_in, c_t, c_s, labels, rng):
  del labels, rng
  return x_in @ params["w"] + (c_t / 1000.0)[:, None] * params["u"] + (c_s / 1000.0)[:, None] * params["v"] \
      + params["b"]


def random_params(seed):
  rng = np.random.default_rng(seed)
  return {"w": rng.standard_normal((D, D)) / 2, "u": rng.standard_normal(D), "v": rng.standard_normal(D),
          "b": 0.3 * rng.standard_normal(D)}


def f32(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def make_objective(variant, weight="edm", net=linear_net, reg=True):
  cfg = MomentMatchingConfig(variant=variant, k=4, weight=weight, aux_teacher_reg=reg)
  return MomentMatchingObjective(net_apply=net, precond=Precond(OT, f_type="euler_fm"), cfg=cfg)


def np_xpred(p, z, t):
  """g(z, t) = f_{0,t}(z) = z - t sigma_d G(c_in z, 1000 t, 0) for euler_fm."""
  c_in = 1.0 / (SIGMA_D * np.sqrt((1 - t) ** 2 + t**2))
  g = (c_in[:, None] * z) @ p["w"] + t[:, None] * p["u"] + p["b"]
  return z - (t * SIGMA_D)[:, None] * g, c_in


def np_zs(z_t, x, s, t, noise):
  mean, std = precision_form(z_t, x, s[:, None], t[:, None])
  return mean + std * SIGMA_D * noise


def np_weight(s):
  return np.minimum(1.0 + (1 - s) ** 2 / s**2, 1e4)


def draw_inputs(n, seed, prefix=""):
  rng = np.random.default_rng(seed)
  s = rng.uniform(0.05, 0.8, n)
  t = np.minimum(s + rng.uniform(0, 0.25, n), 1.0)
  x = rng.standard_normal((n, D))
  z_t = (1 - t)[:, None] * x + t[:, None] * SIGMA_D * rng.standard_normal((n, D))
  return {prefix + "z_t": z_t, prefix + "s": s, prefix + "t": t, prefix + "post_noise": rng.standard_normal((n, D))}


def test_alternating_losses_match_algorithm_2():
  eta, phi, theta = random_params(1), random_params(2), random_params(3)
  inputs = {**draw_inputs(6, 10), **draw_inputs(6, 11, "aux_")}
  obj = make_objective("alternating")
  tx = optax.sgd(0.1)
  extra = {"teacher": f32(theta), "aux": f32(phi), "aux_opt": tx.init(f32(phi))}
  new_extra, metrics = obj.update_extra(extra, f32(eta), f32(inputs), jax.random.key(0), tx)

  # phi-step: w(s) {|x~ - g_phi(z_s)|^2 + |g_theta(z_s) - g_phi(z_s)|^2}, x~ and z_s from the student.
  s, t = inputs["aux_s"], inputs["aux_t"]
  x_tilde, _ = np_xpred(eta, inputs["aux_z_t"], t)
  z_s = np_zs(inputs["aux_z_t"], x_tilde, s, t, inputs["aux_post_noise"])
  a, c_in = np_xpred(phi, z_s, s)
  target, _ = np_xpred(theta, z_s, s)
  w = np_weight(s)
  aux_loss = np.mean(w * (((x_tilde - a) ** 2).mean(1) + ((target - a) ** 2).mean(1)))
  assert float(metrics["aux_loss"]) == pytest.approx(aux_loss, rel=1e-5)
  # its gradient by hand: d a / d b = -s sigma_d, so d/db = mean_n w (2/D) (2a - x~ - target) (-s sigma_d)
  dlda = (w[:, None] * 2.0 / D * (2 * a - x_tilde - target)) / len(s)
  dldg = dlda * (-(s * SIGMA_D))[:, None]
  grad = {"b": dldg.sum(0), "u": (s[:, None] * dldg).sum(0), "w": (c_in[:, None] * z_s).T @ dldg, "v": 0 * phi["v"]}
  for k in phi:
    np.testing.assert_allclose(new_extra["aux"][k], phi[k] - 0.1 * grad[k], rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(new_extra["teacher"]["w"], extra["teacher"]["w"])

  # eta-step with the updated auxiliary: value = 1/2 w |2 (g_phi - g_theta)|^2, gradient of w x~ . d.
  phi2 = {k: np.asarray(v, np.float64) for k, v in new_extra["aux"].items()}
  s, t = inputs["s"], inputs["t"]
  x_tilde, c_in_t = np_xpred(eta, inputs["z_t"], t)
  z_s = np_zs(inputs["z_t"], x_tilde, s, t, inputs["post_noise"])
  d = np_xpred(phi2, z_s, s)[0] - np_xpred(theta, z_s, s)[0]
  w = np_weight(s)
  loss, metrics = obj.loss(f32(eta), f32(inputs), jax.random.key(1), new_extra)
  assert float(loss) == pytest.approx(0.5 * np.mean(w * ((2 * d) ** 2).mean(1)), rel=1e-4)
  assert float(metrics["surrogate"]) == pytest.approx(np.mean(w * (x_tilde * d).mean(1)), rel=1e-4)
  grads = jax.grad(lambda p: obj.loss(p, f32(inputs), jax.random.key(1), new_extra)[0])(f32(eta))
  dldx = w[:, None] * d / D / len(s)               # through x~ = z - t sigma_d G only (z_s is constant)
  dldg = dldx * (-(t * SIGMA_D))[:, None]
  expected = {"b": dldg.sum(0), "u": (t[:, None] * dldg).sum(0), "w": (c_in_t[:, None] * inputs["z_t"]).T @ dldg}
  for k, v in expected.items():
    np.testing.assert_allclose(grads[k], v, rtol=1e-4, atol=1e-7)


def _parameter_reference(eta, theta, lam, inputs):
  """Alg. 3 by hand: g = grad_theta mean w |x~' - g_theta(z_s')|^2 on the odd examples, nu = Lambda g,
  delta = J_theta(z_s) nu on the even ones (for g = z - s sigma_d (c_in z W + s u + b))."""
  one = {k: v[0::2] for k, v in inputs.items()}
  two = {k: v[1::2] for k, v in inputs.items()}
  s = one["s"]
  w = np_weight(s)
  x1, _ = np_xpred(eta, one["z_t"], one["t"])
  z1 = np_zs(one["z_t"], x1, s, one["t"], one["post_noise"])
  x2, _ = np_xpred(eta, two["z_t"], two["t"])
  z2 = np_zs(two["z_t"], x2, two["s"], two["t"], two["post_noise"])
  t2, c_in2 = np_xpred(theta, z2, s)
  dldg = (-2.0 * w[:, None] * (x2 - t2) / D / len(s)) * (-(s * SIGMA_D))[:, None]
  g = {"w": (c_in2[:, None] * z2).T @ dldg, "u": (s[:, None] * dldg).sum(0), "b": dldg.sum(0), "v": 0 * theta["v"]}
  nu = {k: lam[k] * g[k] for k in g}
  t1, c_in1 = np_xpred(theta, z1, s)
  delta = -(s * SIGMA_D)[:, None] * ((c_in1[:, None] * z1) @ nu["w"] + s[:, None] * nu["u"] + nu["b"])
  moment = -np.mean(w * ((x1 - t1) * delta).mean(1))
  surrogate = -np.mean(w * (x1 * delta).mean(1))
  return moment, surrogate, delta


def test_parameter_loss_matches_algorithm_3_with_the_minus_sign():
  eta, theta = random_params(4), random_params(5)
  lam = jax.tree.map(lambda a: np.abs(a) + 0.5, random_params(6))
  inputs = draw_inputs(8, 12)
  for k in ("s", "t"):                              # pairs (2i, 2i + 1) share (s, t)
    inputs[k] = np.repeat(inputs[k][0::2], 2)
  obj = make_objective("parameter")
  extra = {"teacher": f32(theta), "precond": f32(lam)}
  loss, metrics = obj.loss(f32(eta), f32(inputs), jax.random.key(0), extra)
  moment, surrogate, _ = _parameter_reference(eta, theta, lam, inputs)
  assert float(loss) == pytest.approx(moment, rel=1e-4)
  assert float(metrics["surrogate"]) == pytest.approx(surrogate, rel=1e-4)


def test_adam_preconditioner_from_a_teacher_optimizer_state():
  from imm_jax.trainer import make_optimizer
  import ml_collections

  cfg = ml_collections.ConfigDict(dict(name="adamw", lr=1e-3, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0,
                                       warmup_steps=0, schedule="constant", grad_clip=100.0))
  tx = make_optimizer(cfg, 10)
  params = {"a": jnp.zeros(2), "b": jnp.zeros(())}
  state = tx.init(params)
  g1, g2 = {"a": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}, {"a": jnp.array([3.0, 0.0]), "b": jnp.array(-1.0)}
  for g in (g1, g2):
    _, state = tx.update(g, state, params)
  lam = adam_preconditioner(state, 0.99, 1e-8)
  for k in params:
    v_hat = 0.01 * (0.99 * np.asarray(g1[k]) ** 2 + np.asarray(g2[k]) ** 2) / (1 - 0.99**2)
    np.testing.assert_allclose(lam[k], 1.0 / (np.sqrt(v_hat) + 1e-8), rtol=1e-5)
  with pytest.raises(ValueError, match="identity"):
    adam_preconditioner(optax.sgd(0.1).init(params), 0.99, 1e-8)


# -- the sign: the monitored moment loss goes down ----------------------------------------------------------


def tanh_net(params, x_in, c_t, c_s, labels, rng):
  del labels, rng, c_s
  h = jnp.tanh(x_in @ params["w1"] + (c_t / 1000.0)[:, None] * params["u"])
  return h @ params["w2"]


def test_parameter_version_descends_the_moment_loss_and_the_printed_sign_ascends_it():
  """With batch 2 a copy of batch 1 the estimate is exactly L~ = 1/2 g^T Lambda g >= 0 and the surrogate's
  gradient is exactly dL~/d eta; small gradient steps with our sign lower it, the other sign raises it."""
  rng = np.random.default_rng(7)
  theta = {"w1": rng.standard_normal((D, 8)), "u": rng.standard_normal(8), "w2": rng.standard_normal((8, D)) / 3}
  eta0 = jax.tree.map(lambda a: a + 0.3 * rng.standard_normal(a.shape), theta)
  lam = f32(jax.tree.map(lambda a: 0.5 + rng.uniform(size=a.shape), theta))
  inputs = f32({k: np.repeat(v, 2, axis=0) for k, v in draw_inputs(16, 13).items()})
  obj = make_objective("parameter", net=tanh_net)
  extra = {"teacher": f32(theta), "precond": lam}
  value_and_grad = jax.jit(jax.value_and_grad(lambda p: obj.loss(p, inputs, jax.random.key(0), extra)[0]))

  for direction in (-1.0, 1.0):            # -1: gradient descent on our surrogate; +1: the printed sign
    eta = f32(eta0)
    values = []
    for _ in range(6):
      value, grad = value_and_grad(eta)
      values.append(float(value))
      eta = jax.tree.map(lambda p, g: p + direction * 1.0 * g, eta, grad)
    assert values[0] > 0
    steps = np.diff(values)
    if direction < 0:
      assert np.all(steps < 0) and values[-1] < 0.8 * values[0], values
    else:
      assert np.all(steps > 0), values


# -- end to end with a flow-matching teacher trained here ----------------------------------------------------


def tiny(c, num_steps):
  c.num_steps = num_steps
  c.batch_size = 32
  c.log_every = 1
  c.sample_every = 1000
  c.checkpoint.update(every=num_steps, async_save=False)
  c.model.update(hidden=16, depth=1)
  c.sample.update(num=16, steps=())
  c.eval.update(num=32, steps=(2,), at_start=False)
  return c


@pytest.fixture(scope="module")
def teacher_workdir(tmp_path_factory):
  from imm_jax.trainer import train_and_evaluate

  workdir = str(tmp_path_factory.mktemp("fm") / "teacher")
  train_and_evaluate(tiny(load_config("flow_matching", "toy2d-8gaussians"), 8), workdir)
  return workdir


def _restore_tree(workdir):
  import orbax.checkpoint as ocp

  from imm_jax import checkpoints

  manager = checkpoints.create_manager(workdir, read_only=True, async_save=False)
  try:
    step = manager.latest_step()
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
  finally:
    manager.close()


@pytest.mark.filterwarnings("ignore:Sharding info not provided")  # _restore_tree reads raw arrays
@pytest.mark.parametrize("version", ["alt", "param"])
def test_distillation_trains_from_the_teacher(teacher_workdir, tmp_path, version):
  from imm_jax.trainer import train_and_evaluate
  from imm_jax.writers import read_metrics

  c = tiny(load_config("mm_distill", f"toy2d-8gaussians-{version}"), 3)
  c.teacher.workdir = teacher_workdir
  c.moment_matching.k = 2
  workdir = str(tmp_path / version)
  figures = train_and_evaluate(c, workdir)
  assert np.isfinite(figures["energy_2step"])
  rows = [r for r in read_metrics(workdir) if "train/loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert all(np.isfinite(r["train/loss"]) and np.isfinite(r["train/surrogate"]) for r in rows)
  state, teacher = _restore_tree(workdir), _restore_tree(teacher_workdir)
  # The frozen teacher is the teacher run's EMA; student (and auxiliary) started there and moved.
  for a, b in zip(jax.tree.leaves(state["extra"]["teacher"]), jax.tree.leaves(teacher["ema_params"])):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state["params"]),
                                                      jax.tree.leaves(teacher["ema_params"])))
  if version == "alt":
    assert "train/aux_loss" in rows[0] and set(state["extra"]) == {"teacher", "aux", "aux_opt"}
  else:
    assert set(state["extra"]) == {"teacher", "precond"}
    assert all(np.all(np.asarray(v) > 0) for v in jax.tree.leaves(state["extra"]["precond"]))


def test_teacher_with_another_network_is_refused(teacher_workdir, tmp_path):
  from imm_jax.trainer import train_and_evaluate

  c = tiny(load_config("mm_distill", "toy2d-8gaussians-alt"), 2)
  c.teacher.workdir = teacher_workdir
  c.model.hidden = 24
  with pytest.raises(ValueError, match="model.hidden"):
    train_and_evaluate(c, str(tmp_path / "bad"))
  c = tiny(load_config("mm_distill", "toy2d-8gaussians-alt"), 2)
  with pytest.raises(ValueError, match="teacher.workdir"):
    train_and_evaluate(c, str(tmp_path / "none"))


@pytest.mark.parametrize("teacher_dim,refused", [(0, False), (9, True)])
def test_teacher_config_written_before_an_option_existed(teacher_workdir, tmp_path, teacher_dim, refused):
  """A teacher whose config.json has an option the student's lacks, or the other way round (runs of
  versions before ``model.augment_dim``), matches when the value is that option's default."""
  import json
  import os
  import shutil

  from imm_jax.builder import build_model
  from imm_jax.trainer import load_teacher

  teacher = str(tmp_path / "teacher")
  shutil.copytree(teacher_workdir, teacher)
  with open(os.path.join(teacher, "config.json")) as f:
    saved = json.load(f)
  saved["model"]["augment_dim"] = teacher_dim
  with open(os.path.join(teacher, "config.json"), "w") as f:
    json.dump(saved, f)
  c = tiny(load_config("mm_distill", "toy2d-8gaussians-alt"), 2)
  c.teacher.workdir = teacher
  assert "augment_dim" not in c.model
  if refused:
    with pytest.raises(ValueError, match="model.augment_dim: None vs 9"):
      load_teacher(c, build_model(c))
  else:
    assert set(load_teacher(c, build_model(c))) == {"params"}
