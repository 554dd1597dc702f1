"""Flow matching (imm_jax.objectives.flow_matching) and the flow-ODE samplers (sampling.generate_ode).

Expected values are written out by hand or in NumPy float64 from the formulas in the module docstring;
the samplers are checked on Gaussian data, whose flow map is known in closed form.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imm_jax import sampling
from imm_jax.configs_loader import load_config
from imm_jax.interpolants import Interpolant
from imm_jax.models.precond import Precond
from imm_jax.objectives import make_objective, time_range
from imm_jax.objectives.flow_matching import FlowMatchingConfig, FlowMatchingObjective

SIGMA_D = 0.5
D = 3


def linear_net(params, x_in, c_t, c_s, labels, rng):
  """G = x_in W + (c_t / 1000) u + (c_s / 1000) v + b: linear in everything, easy to write by hand."""
  del labels, rng
  return x_in @ params["w"] + (c_t / 1000.0)[:, None] * params["u"] + (c_s / 1000.0)[:, None] * params["v"] \
      + params["b"]


def objective(f_type="euler_fm", prediction="velocity"):
  return FlowMatchingObjective(net_apply=linear_net, precond=Precond(Interpolant("ot_fm"), f_type=f_type),
                               cfg=FlowMatchingConfig(prediction=prediction))


def zero_params(d):
  return {"w": jnp.zeros((d, d)), "u": jnp.zeros(d), "v": jnp.zeros(d), "b": jnp.zeros(d)}


def fm_inputs(x, noise, t, s):
  x, noise = np.asarray(x, np.float64), np.asarray(noise, np.float64)
  t, s = np.asarray(t, np.float64), np.asarray(s, np.float64)
  x_t = (1 - t)[:, None] * x + t[:, None] * noise
  return {k: jnp.asarray(v, jnp.float32) for k, v in dict(x=x, noise=noise, x_t=x_t, t=t, s=s).items()}


# -- the loss ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction,expected", [("velocity", 2.5), ("x", 0.625)])
def test_loss_by_hand_one_point(prediction, expected):
  # x = (1, -1), eps = (0.5, 0), t = 0.5, G = b = 0: G* = (eps - x) / sigma_d = (-1, 2), so the velocity
  # loss is ((0 + 1)^2 + (0 - 2)^2) / 2 = 2.5 and the x loss t^2 = 0.25 times that.
  inputs = fm_inputs([[1.0, -1.0]], [[0.5, 0.0]], [0.5], [0.2])
  loss, metrics = objective(prediction=prediction).loss(zero_params(2), inputs, jax.random.key(0))
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  assert float(metrics["g_mse"]) == pytest.approx(2.5, rel=1e-6)


def test_loss_by_hand_with_a_bias():
  # G = b = (-1, 1): error (0, -1) -> 0.5; ignores s (target independent of the second time input).
  inputs = fm_inputs([[1.0, -1.0]], [[0.5, 0.0]], [0.5], [0.2])
  p = dict(zero_params(2), b=jnp.array([-1.0, 1.0]))
  assert float(objective().loss(p, inputs, jax.random.key(0))[0]) == pytest.approx(0.5, rel=1e-6)


def _reference_loss(params, inputs, f_type, prediction):
  """NumPy float64: x_hat = f_{0,t}(x_t) through each f-form's (c_skip, c_out); velocity loss
  |v_hat - v|^2 / sigma_d^2 with v_hat = (x_t - x_hat) / t, v = eps - x; x loss |x_hat - x|^2 / sigma_d^2."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  x, noise, x_t, t, s = (np.asarray(inputs[k], np.float64) for k in ("x", "noise", "x_t", "t", "s"))
  n2 = (1 - t) ** 2 + t**2
  c_in = 1.0 / (SIGMA_D * np.sqrt(n2))
  g = (c_in[:, None] * x_t) @ p["w"] + t[:, None] * p["u"] + s[:, None] * p["v"] + p["b"]
  if f_type == "euler_fm":
    c_skip, c_out = np.ones_like(t), -t * SIGMA_D
  elif f_type == "simple_edm":
    c_skip, c_out = (1 - t) / n2, -t * SIGMA_D / np.sqrt(n2)
  else:
    c_skip, c_out = np.zeros_like(t), np.ones_like(t)
  x_hat = c_skip[:, None] * x_t + c_out[:, None] * g
  if prediction == "velocity":
    err = ((x_t - x_hat) / t[:, None] - (noise - x)) ** 2
  else:
    err = (x_hat - x) ** 2
  return err.mean() / SIGMA_D**2


@pytest.mark.parametrize("f_type", ["euler_fm", "simple_edm", "identity"])
@pytest.mark.parametrize("prediction", ["velocity", "x"])
def test_loss_matches_numpy_reference(f_type, prediction):
  rng = np.random.default_rng(0)
  params = {"w": rng.standard_normal((D, D)) / 2, "u": rng.standard_normal(D), "v": rng.standard_normal(D),
            "b": rng.standard_normal(D)}
  inputs = fm_inputs(rng.standard_normal((5, D)), SIGMA_D * rng.standard_normal((5, D)),
                     [0.05, 0.3, 0.5, 0.8, 1.0], [0.01, 0.1, 0.5, 0.2, 0.0])
  jparams = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  loss, _ = objective(f_type, prediction).loss(jparams, inputs, jax.random.key(0))
  np.testing.assert_allclose(float(loss), _reference_loss(params, inputs, f_type, prediction), rtol=2e-5)


def test_prepare_draws_the_ot_path_and_s_below_t():
  obj = objective()
  x = jnp.asarray(np.random.default_rng(1).standard_normal((64, D)), jnp.float32)
  inputs = obj.prepare({"x": x}, jax.random.key(3))
  t, s = np.asarray(inputs["t"]), np.asarray(inputs["s"])
  assert np.all((0 <= s) & (s <= t) & (t < 1))
  np.testing.assert_allclose(inputs["x_t"], (1 - t)[:, None] * x + t[:, None] * inputs["noise"], atol=1e-6)
  assert abs(float(np.std(inputs["noise"])) - SIGMA_D) < 0.1


def test_config_and_objective_choices():
  with pytest.raises(ValueError, match="prediction"):
    FlowMatchingConfig(prediction="eps")
  with pytest.raises(ValueError, match="ot_fm"):
    FlowMatchingObjective(net_apply=linear_net, precond=Precond(Interpolant("vp_cosine"), f_type="simple_edm"),
                          cfg=FlowMatchingConfig())
  c = load_config("flow_matching", "toy2d-moons")
  assert c.objective == "flow_matching" and time_range(c) == (0.0, 1.0)
  assert isinstance(make_objective(c, None, Precond(), None), FlowMatchingObjective)
  with pytest.raises(ValueError, match="toy2d-moons"):
    load_config("flow_matching", "cifar")


# -- samplers on Gaussian data: the flow map is x_s = x_t std(s) / std(t) --------------------------------

DATA_STD = 1.3


def exact_denoise(x, s, t):
  """f_{s,t} = DDIM(x_t, E[x | x_t], s, t) for x ~ N(0, DATA_STD^2) under OT-FM."""
  std2 = (1 - t) ** 2 * DATA_STD**2 + t**2 * SIGMA_D**2
  x_hat = (1 - t) * DATA_STD**2 / std2 * x
  ratio = s / t
  return (1 - s - ratio * (1 - t)) * x_hat + ratio * x


def _flow_error(method, steps):
  x1 = jnp.linspace(-1.0, 1.0, 7)[:, None]
  times = np.linspace(1.0, 0.0, steps + 1)
  out = sampling.ode_sample(exact_denoise, x1, times, method)
  return float(jnp.max(jnp.abs(out - x1 * DATA_STD / SIGMA_D)))


def test_euler_is_pushforward_and_heun_is_second_order():
  x1 = jnp.linspace(-1.0, 1.0, 7)[:, None]
  times = np.linspace(1.0, 0.0, 9)
  np.testing.assert_array_equal(sampling.ode_sample(exact_denoise, x1, times, "euler"),
                                sampling.pushforward(exact_denoise, x1, times))
  e8, e16 = _flow_error("euler", 8), _flow_error("euler", 16)
  h8, h16 = _flow_error("heun", 8), _flow_error("heun", 16)
  assert 1.6 < e8 / e16 < 2.4          # first order
  assert h8 / h16 > 3.0                # second order
  assert h8 < e8 / 5 and _flow_error("heun", 100) < 1e-3


# -- end to end ---------------------------------------------------------------------------------------------


def tiny_toy_fm(num_steps=4):
  c = load_config("flow_matching", "toy2d-8gaussians")
  c.num_steps = num_steps
  c.batch_size = 32
  c.log_every = 1
  c.sample_every = num_steps
  c.checkpoint.update(every=num_steps, async_save=False)
  c.model.update(hidden=16, depth=1)
  c.sample.update(num=16, steps=(2,), sampler="heun")
  c.eval.update(num=32, steps=(1, 4), at_start=False)
  return c


def test_flow_matching_trains_and_samples_with_both_solvers(tmp_path):
  from imm_jax.trainer import train_and_evaluate

  c = tiny_toy_fm()
  figures = train_and_evaluate(c, str(tmp_path / "fm"))
  assert set(figures) == {"energy_1step", "energy_4step", "mmd_1step", "mmd_4step"}
  assert all(np.isfinite(v) for v in figures.values())
  assert os.path.exists(tmp_path / "fm" / "samples" / "step0000004_2step.png")
