"""IMM formulas checked against the method's specification (shared/spec/imm.md, reference_networks.md).

Every expected value is independent of the code under test: a number quoted in the spec, a closed form
derived by hand, or a NumPy float64 re-implementation written here from the spec's equations.

Covers interpolants and DDIM, preconditioning (c_in, c_skip, c_out, noise labels, kernel scale,
guidance), the time weighting w(s, t) and Table 4's reductions of it, the eta-decrement r(s, t) and the
other mappings of Fig. 11, time sampling, the Laplace / RBF
kernels with the V-statistic MMD, and the samplers (schedules, pushforward, restart).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imm_jax.interpolants import Interpolant, ddim
from imm_jax.models.precond import Precond, denoise
from imm_jax.objectives.imm import (
    IMMConfig,
    KERNEL_DIST_EPS,
    KERNELS,
    eta_decrement_r,
    group_mmd,
    kernel_matrix,
    mapped_r,
    sample_times,
    time_weight,
)
from imm_jax import sampling

SIGMA_D = 0.5
OT = Interpolant("ot_fm")
COS = Interpolant("vp_cosine")


# -- independent float64 reference of spec section 1 ---------------------------------------------------


def np_alpha(name, t):
  t = np.asarray(t, np.float64)
  return 1.0 - t if name == "ot_fm" else np.cos(0.5 * np.pi * t)


def np_sigma(name, t):
  t = np.asarray(t, np.float64)
  return t if name == "ot_fm" else np.sin(0.5 * np.pi * t)


def np_eta(name, t):
  return np_sigma(name, t) / np_alpha(name, t)


def np_eta_inv(name, e):
  e = np.asarray(e, np.float64)
  return e / (1.0 + e) if name == "ot_fm" else (2.0 / np.pi) * np.arctan(e)


def np_ddim(x_t, x, s, t, name):
  """Eq. 11: (alpha_s - (sigma_s / sigma_t) alpha_t) x + (sigma_s / sigma_t) x_t."""
  ratio = np_sigma(name, s) / np_sigma(name, t)
  return (np_alpha(name, s) - ratio * np_alpha(name, t)) * x + ratio * x_t


def np_skip_out(f_type, name, s, t, sigma_d=SIGMA_D):
  """(c_skip, c_out) written from imm.md section 2 'Output forms'."""
  a_t, s_t, a_s, s_s = np_alpha(name, t), np_sigma(name, t), np_alpha(name, s), np_sigma(name, s)
  if f_type == "identity":
    return s_s / s_t, a_s - (s_s / s_t) * a_t
  if f_type == "simple_edm":
    return ((a_s * a_t + s_s * s_t) / (a_t**2 + s_t**2),
            -sigma_d * (a_s * s_t - s_s * a_t) / np.sqrt(a_t**2 + s_t**2))
  assert name == "ot_fm"
  return np.ones_like(np.asarray(t - s, np.float64)), -(np.asarray(t, np.float64) - s) * sigma_d


F_FORMS = [("identity", "ot_fm"), ("identity", "vp_cosine"), ("simple_edm", "ot_fm"),
           ("simple_edm", "vp_cosine"), ("euler_fm", "ot_fm")]

T_GRID = np.array([0.006, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98, 0.994])


# -- interpolants ---------------------------------------------------------------------------------------


def test_ot_fm_closed_forms():
  t = T_GRID
  np.testing.assert_allclose(OT.alpha(t), 1.0 - t, rtol=0, atol=1e-15)
  np.testing.assert_allclose(OT.sigma(t), t, rtol=0, atol=1e-15)
  np.testing.assert_allclose(OT.eta(t), t / (1.0 - t), rtol=1e-14)
  np.testing.assert_allclose(OT.logsnr(t), 2.0 * np.log((1.0 - t) / t), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(OT.neg_dlogsnr_dt(t), 2.0 / (t * (1.0 - t)), rtol=1e-12)


def test_vp_cosine_closed_forms():
  t = T_GRID
  np.testing.assert_allclose(COS.alpha(t), np.cos(np.pi * t / 2), atol=1e-15)
  np.testing.assert_allclose(COS.sigma(t), np.sin(np.pi * t / 2), atol=1e-15)
  np.testing.assert_allclose(COS.eta(t), np.tan(np.pi * t / 2), rtol=1e-12)
  np.testing.assert_allclose(COS.logsnr(t), -2.0 * np.log(np.tan(np.pi * t / 2)), rtol=1e-11, atol=1e-11)
  np.testing.assert_allclose(COS.neg_dlogsnr_dt(t),
                             np.pi / (np.sin(np.pi * t / 2) * np.cos(np.pi * t / 2)), rtol=1e-12)
  # alpha^2 + sigma^2 = 1 (variance preserving).
  np.testing.assert_allclose(COS.alpha(t) ** 2 + COS.sigma(t) ** 2, 1.0, rtol=1e-14)


@pytest.mark.parametrize("ip", [OT, COS], ids=lambda i: i.name)
def test_eta_inverse_round_trip(ip):
  t = T_GRID
  np.testing.assert_allclose(ip.eta_inv(ip.eta(t)), t, rtol=1e-13)
  etas = np.array([1e-3, 0.1, 1.0, 1.4, 10.0, 160.0])
  np.testing.assert_allclose(ip.eta(ip.eta_inv(etas)), etas, rtol=1e-12)
  # and against the spec's inverse
  np.testing.assert_allclose(ip.eta_inv(etas), np_eta_inv(ip.name, etas), rtol=1e-14)


@pytest.mark.parametrize("ip", [OT, COS], ids=lambda i: i.name)
def test_neg_dlogsnr_matches_finite_difference(ip):
  t = T_GRID
  h = 1e-6
  fd = -(ip.logsnr(t + h) - ip.logsnr(t - h)) / (2 * h)
  np.testing.assert_allclose(ip.neg_dlogsnr_dt(t), fd, rtol=1e-6)
  # and the logSNR is 2 log(alpha / sigma) computed independently
  lam = 2.0 * np.log(np_alpha(ip.name, t) / np_sigma(ip.name, t))
  np.testing.assert_allclose(ip.logsnr(t), lam, rtol=1e-12, atol=1e-12)


def test_jax_inputs_follow_the_same_formulas():
  t = jnp.asarray(T_GRID, jnp.float32)
  closed = {"ot_fm": 2 / (T_GRID * (1 - T_GRID)),
            "vp_cosine": np.pi / (np.sin(np.pi * T_GRID / 2) * np.cos(np.pi * T_GRID / 2))}
  for ip in (OT, COS):
    np.testing.assert_allclose(np.asarray(ip.eta(t)), np_eta(ip.name, T_GRID), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(ip.neg_dlogsnr_dt(t)), closed[ip.name], rtol=1e-4)


def test_T_keeps_eta_max_near_160():
  # spec 1: "T = 0.994 for OT-FM and T = 0.996 for cosine. Both keep eta_max ~ 160."
  e_ot, e_cos = float(OT.eta(0.994)), float(COS.eta(0.996))
  assert e_ot == pytest.approx(0.994 / 0.006, rel=1e-12)      # 165.67
  assert e_cos == pytest.approx(math.tan(math.pi * 0.996 / 2), rel=1e-12)  # 159.15
  for e in (e_ot, e_cos):
    assert 150.0 < e < 170.0


# -- DDIM -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ip", [OT, COS], ids=lambda i: i.name)
def test_ddim_self_consistency_and_boundaries(ip):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((5, 3))
  x_t = rng.standard_normal((5, 3))
  for s, r, t in [(0.1, 0.4, 0.9), (0.0, 0.2, 0.3), (0.006, 0.5, 0.994), (0.3, 0.3, 0.7)]:
    two = ddim(ddim(x_t, x, r, t, ip), x, s, r, ip)
    one = ddim(x_t, x, s, t, ip)
    np.testing.assert_allclose(two, one, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(one, np_ddim(x_t, x, s, t, ip.name), rtol=1e-12, atol=1e-12)
    # s = t is the identity
    np.testing.assert_allclose(ddim(x_t, x, t, t, ip), x_t, rtol=1e-12, atol=1e-12)
  # x_t = DDIM(eps, x, t, 1) = alpha_t x + sigma_t eps
  eps = SIGMA_D * rng.standard_normal((5, 3))
  for t in (0.006, 0.3, 0.994):
    np.testing.assert_allclose(ddim(eps, x, t, 1.0, ip), np_alpha(ip.name, t) * x + np_sigma(ip.name, t) * eps,
                               rtol=1e-12, atol=1e-12)
  # x_r = DDIM(x_t, x, r, t) = alpha_r x + sigma_r eps with the same x and eps as x_t
  t, r = 0.8, 0.55
  xt = np_alpha(ip.name, t) * x + np_sigma(ip.name, t) * eps
  np.testing.assert_allclose(ddim(xt, x, r, t, ip), np_alpha(ip.name, r) * x + np_sigma(ip.name, r) * eps,
                             rtol=1e-12, atol=1e-12)


def test_ddim_with_per_example_jax_times():
  rng = np.random.default_rng(1)
  x, x_t = rng.standard_normal((2, 4, 3))
  s = np.array([0.1, 0.2, 0.0, 0.5])
  t = np.array([0.3, 0.9, 0.5, 0.5])
  got = ddim(jnp.asarray(x_t, jnp.float32), jnp.asarray(x, jnp.float32), jnp.asarray(s, jnp.float32)[:, None],
             jnp.asarray(t, jnp.float32)[:, None], OT)
  np.testing.assert_allclose(np.asarray(got), np_ddim(x_t, x, s[:, None], t[:, None], "ot_fm"), atol=1e-6)


# -- preconditioning ------------------------------------------------------------------------------------


@pytest.mark.parametrize("f_type,name", F_FORMS)
def test_c_in_and_skip_out_match_spec(f_type, name):
  pc = Precond(Interpolant(name), f_type=f_type)
  rng = np.random.default_rng(2)
  t = rng.uniform(0.01, 0.994, 50)
  s = t * rng.uniform(0.0, 1.0, 50)
  a, sg = np_alpha(name, t), np_sigma(name, t)
  np.testing.assert_allclose(pc.c_in(t), 1.0 / (SIGMA_D * np.sqrt(a**2 + sg**2)), rtol=1e-13)
  c_skip, c_out = pc.skip_out(s, t)
  e_skip, e_out = np_skip_out(f_type, name, s, t)
  np.testing.assert_allclose(c_skip, e_skip, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(c_out, e_out, rtol=1e-12, atol=1e-14)
  # kernel scale is 1 / |c_out|
  np.testing.assert_allclose(np.asarray(pc.kernel_scale(s, t)), 1.0 / np.abs(e_out), rtol=1e-5)


def test_c_in_ot_fm_closed_form():
  t = T_GRID
  np.testing.assert_allclose(Precond(OT).c_in(t), 2.0 / np.sqrt((1 - t) ** 2 + t**2), rtol=1e-13)
  # cosine: alpha^2 + sigma^2 = 1, so c_in = 1 / sigma_d = 2
  np.testing.assert_allclose(Precond(COS, f_type="simple_edm").c_in(t), 2.0, rtol=1e-13)


def test_simple_edm_under_ot_fm_uses_t_minus_s():
  rng = np.random.default_rng(3)
  t = rng.uniform(0.01, 0.994, 40)
  s = t * rng.uniform(size=40)
  # alpha_s sigma_t - sigma_s alpha_t = (1 - s) t - s (1 - t) = t - s
  np.testing.assert_allclose((1 - s) * t - s * (1 - t), t - s, atol=1e-15)
  _, c_out = Precond(OT, f_type="simple_edm").skip_out(s, t)
  np.testing.assert_allclose(c_out, -SIGMA_D * (t - s) / np.sqrt((1 - t) ** 2 + t**2), rtol=1e-12)


def test_kernel_scale_closed_forms():
  t = np.array([0.1, 0.5, 0.9, 0.994])
  s = np.array([0.0, 0.25, 0.3, 0.9])
  # Euler-FM: 1 / ((t - s) sigma_d)
  np.testing.assert_allclose(np.asarray(Precond(OT, "euler_fm").kernel_scale(s, t)),
                             1.0 / ((t - s) * SIGMA_D), rtol=1e-6)
  # Simple-EDM under OT-FM: sqrt((1-t)^2 + t^2) / ((t - s) sigma_d)
  np.testing.assert_allclose(np.asarray(Precond(OT, "simple_edm").kernel_scale(s, t)),
                             np.sqrt((1 - t) ** 2 + t**2) / ((t - s) * SIGMA_D), rtol=1e-6)


@pytest.mark.parametrize("f_type,name", F_FORMS)
def test_every_f_form_is_a_ddim_step_of_an_x_prediction(f_type, name):
  """f_{s,t}(x_t) = DDIM(x_t, g, s, t) with the x-prediction g implied by each form (derived by hand):
  identity: g = G; simple-EDM: g = alpha_t x_t / N^2 - sigma_t sigma_d G / N with N^2 = alpha_t^2 + sigma_t^2;
  Euler-FM: g = x_t - t sigma_d G (a v-prediction step)."""
  pc = Precond(Interpolant(name), f_type=f_type)
  rng = np.random.default_rng(4)
  t = rng.uniform(0.05, 0.994, 30)
  s = t * rng.uniform(size=30)
  x_t, big_g = rng.standard_normal((2, 30))
  a, sg = np_alpha(name, t), np_sigma(name, t)
  if f_type == "identity":
    g = big_g
  elif f_type == "simple_edm":
    n2 = a**2 + sg**2
    g = a * x_t / n2 - sg * SIGMA_D * big_g / np.sqrt(n2)
  else:
    g = x_t - t * SIGMA_D * big_g
  c_skip, c_out = pc.skip_out(s, t)
  np.testing.assert_allclose(c_skip * x_t + c_out * big_g, np_ddim(x_t, g, s, t, name), rtol=1e-10, atol=1e-12)


def test_precond_defaults_are_the_paper_constants():
  pc = Precond()
  assert pc.sigma_d == 0.5          # sigma_d = 0.5 [P 4.1]
  assert pc.time_scale == 1000.0    # c_noise(t) = 1000 t
  assert pc.interpolant.name == "ot_fm"


def test_euler_fm_needs_ot_fm():
  with pytest.raises(ValueError):
    Precond(COS, f_type="euler_fm")


def _linear_net(d, seed=0):
  """A random linear network G(x_in, c_t, c_s, y) and its record of calls (eager use only)."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((d, d)) / np.sqrt(d)
  u, v = rng.standard_normal((2, d))
  calls = []

  def apply(x_in, c_t, c_s, labels):
    calls.append(dict(x_in=np.asarray(x_in), c_t=np.asarray(c_t), c_s=np.asarray(c_s),
                      labels=None if labels is None else np.asarray(labels)))
    return (x_in @ jnp.asarray(w, x_in.dtype) + (c_t / 1000.0)[:, None] * jnp.asarray(u, x_in.dtype)
            + (c_s / 1000.0)[:, None] * jnp.asarray(v, x_in.dtype))

  def np_apply(x_in, c_t, c_s):
    return x_in @ w + (c_t / 1000.0)[:, None] * u + (c_s / 1000.0)[:, None] * v

  return apply, np_apply, calls


@pytest.mark.parametrize("f_type,name", F_FORMS)
@pytest.mark.parametrize("temb", ["identity", "stride"])
def test_boundary_condition_f_ss_is_identity(f_type, name, temb):
  pc = Precond(Interpolant(name), f_type=f_type, temb_type=temb)
  apply, _, _ = _linear_net(6)
  x = np.random.default_rng(5).standard_normal((4, 6)).astype(np.float32)
  for s in (0.006, 0.3, 0.994):
    out = denoise(apply, pc, jnp.asarray(x), s, s)  # host times
    np.testing.assert_allclose(np.asarray(out), x, rtol=0, atol=1e-6)
  s_vec = jnp.asarray([0.01, 0.2, 0.6, 0.99], jnp.float32)  # traced-style per-example times
  out = denoise(apply, pc, jnp.asarray(x), s_vec, s_vec)
  np.testing.assert_allclose(np.asarray(out), x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("f_type,name", F_FORMS)
@pytest.mark.parametrize("temb", ["identity", "stride"])
def test_denoise_matches_numpy_reference(f_type, name, temb):
  """denoise feeds c_in x, 1000 t and 1000 s (identity) / 1000 (t - s) (stride), then c_skip x + c_out G."""
  pc = Precond(Interpolant(name), f_type=f_type, temb_type=temb)
  apply, np_apply, calls = _linear_net(5, seed=1)
  rng = np.random.default_rng(6)
  x = rng.standard_normal((4, 5))
  t = np.array([0.2, 0.5, 0.9, 0.994])
  s = np.array([0.006, 0.4, 0.1, 0.5])
  out = denoise(apply, pc, jnp.asarray(x, jnp.float32), s, t)
  call = calls[-1]
  a, sg = np_alpha(name, t), np_sigma(name, t)
  c_in = 1.0 / (SIGMA_D * np.sqrt(a**2 + sg**2))
  np.testing.assert_allclose(call["x_in"], c_in[:, None] * x, rtol=1e-6)
  np.testing.assert_allclose(call["c_t"], 1000.0 * t, rtol=1e-6)
  np.testing.assert_allclose(call["c_s"], 1000.0 * (s if temb == "identity" else t - s), rtol=1e-5)
  c_skip, c_out = np_skip_out(f_type, name, s, t)
  g = np_apply(c_in[:, None] * x, 1000.0 * t, 1000.0 * (s if temb == "identity" else t - s))
  np.testing.assert_allclose(np.asarray(out), c_skip[:, None] * x + c_out[:, None] * g, rtol=1e-5, atol=1e-5)


def test_noise_labels():
  t, s = np.array([0.3, 0.994]), np.array([0.1, 0.0])
  c_t, c_s = Precond(OT, temb_type="identity").noise_labels(s, t)
  np.testing.assert_allclose(c_t, [300.0, 994.0])
  np.testing.assert_allclose(c_s, [100.0, 0.0])
  c_t, c_s = Precond(OT, temb_type="stride").noise_labels(s, t)
  np.testing.assert_allclose(c_t, [300.0, 994.0])
  np.testing.assert_allclose(c_s, [200.0, 994.0])


# -- classifier-free guidance ---------------------------------------------------------------------------


def _label_net(d, num_classes, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((d, d)) / np.sqrt(d)
  emb = rng.standard_normal((num_classes + 1, d))

  def apply(x_in, c_t, c_s, labels):
    return jnp.tanh(x_in @ jnp.asarray(w, jnp.float32) + jnp.asarray(emb, jnp.float32)[labels]
                    + (c_t / 1000.0 - c_s / 2000.0)[:, None])

  def np_apply(x_in, c_t, c_s, labels):
    return np.tanh(x_in @ w + emb[labels] + (c_t / 1000.0 - c_s / 2000.0)[:, None])

  return apply, np_apply


@pytest.mark.parametrize("f_type", ["euler_fm", "simple_edm", "identity"])
@pytest.mark.parametrize("w", [0.0, 1.0, 1.5])
def test_guidance_mixes_raw_network_outputs(f_type, w):
  d, nc = 6, 3
  apply, np_apply = _label_net(d, nc)
  pc = Precond(OT, f_type=f_type, temb_type="stride")
  rng = np.random.default_rng(7)
  x = rng.standard_normal((4, d))
  labels = np.array([0, 2, 1, 0])
  t, s = 0.8, 0.3
  out = denoise(apply, pc, jnp.asarray(x, jnp.float32), s, t, jnp.asarray(labels), cfg_scale=w, null_label=nc)
  c_in = 1.0 / (SIGMA_D * np.sqrt((1 - t) ** 2 + t**2))
  ct, cs = np.full(4, 1000 * t), np.full(4, 1000 * (t - s))
  g_c = np_apply(c_in * x, ct, cs, labels)
  g_u = np_apply(c_in * x, ct, cs, np.full(4, nc))
  c_skip, c_out = np_skip_out(f_type, "ot_fm", s, t)
  expected = c_skip * x + c_out * (g_u + w * (g_c - g_u))
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
  if w == 1.0:
    cond = denoise(apply, pc, jnp.asarray(x, jnp.float32), s, t, jnp.asarray(labels))
    np.testing.assert_allclose(np.asarray(out), np.asarray(cond), atol=1e-6)
  if w == 0.0:
    unc = denoise(apply, pc, jnp.asarray(x, jnp.float32), s, t, jnp.full((4,), nc))
    np.testing.assert_allclose(np.asarray(out), np.asarray(unc), atol=1e-6)


# -- time weighting w(s, t) -------------------------------------------------------------------------------


def _np_weight(name, t, a, b):
  """Eq. 13 from the spec in float64: 1/2 sigmoid(b - lambda) (-dlambda/dt) alpha^a / (alpha^2 + sigma^2)."""
  al, sg = np_alpha(name, t), np_sigma(name, t)
  lam = 2 * np.log(al / sg)
  neg_dlam = 2 / (t * (1 - t)) if name == "ot_fm" else np.pi / (al * sg)
  return 0.5 / (1 + np.exp(-(b - lam))) * neg_dlam * al**a / (al**2 + sg**2)


def test_weight_matches_spec_numbers():
  # spec 3.2 item 8: "a = 1, b = 4 at t = 0.006 / 0.1 / 0.5 / 0.9 / 0.994 gives 0.34 / 4.9 / 3.9 / 1.35 / 1.02.
  # With a = 2 the values at t = 0.9 and 0.994 fall to 0.135 and 0.006."
  ts = jnp.asarray([0.006, 0.1, 0.5, 0.9, 0.994], jnp.float32)
  w1 = np.asarray(time_weight(ts, OT, 1.0, 4.0))
  # The exact value at t = 0.006 is 0.33489 (float64 closed form): it is 0.335 to three places, which the
  # spec rounds (twice) to 0.34, so that entry gets a tolerance of 0.0055 instead of 0.005.
  for got, (val, half_ulp) in zip(w1, [(0.34, 0.0055), (4.9, 0.05), (3.9, 0.05), (1.35, 0.005), (1.02, 0.005)]):
    assert abs(got - val) <= half_ulp, (got, val)
  assert round(float(w1[0]), 3) == 0.335
  w2 = np.asarray(time_weight(jnp.asarray([0.9, 0.994], jnp.float32), OT, 2.0, 4.0))
  assert abs(w2[0] - 0.135) <= 0.0005
  assert abs(w2[1] - 0.006) <= 0.0005


@pytest.mark.parametrize("a,b", [(1.0, 4.0), (1.0, 5.0), (2.0, 4.0)])
def test_weight_ot_fm_closed_form(a, b):
  t = np.linspace(0.006, 0.994, 41)
  lam = 2 * np.log((1 - t) / t)
  closed = 1 / (1 + np.exp(-(b - lam))) * (1 - t) ** a / (t * (1 - t) * ((1 - t) ** 2 + t**2))
  got = np.asarray(time_weight(jnp.asarray(t, jnp.float32), OT, a, b))
  np.testing.assert_allclose(got, closed, rtol=2e-4)
  np.testing.assert_allclose(closed, _np_weight("ot_fm", t, a, b), rtol=1e-12)


def test_weight_cosine_matches_eq13():
  t = np.linspace(0.006, 0.996, 41)
  got = np.asarray(time_weight(jnp.asarray(t, jnp.float32), COS, 1.0, 4.0))
  np.testing.assert_allclose(got, _np_weight("vp_cosine", t, 1.0, 4.0), rtol=5e-4)


def test_weight_is_finite_at_t_zero():
  for ip in (OT, COS):
    w = np.asarray(time_weight(jnp.asarray([0.0, 1e-6], jnp.float32), ip, 1.0, 4.0))
    assert np.all(np.isfinite(w)), (ip.name, w)
    assert abs(w[0]) < 1e-4  # the limit is 0


# -- the eta-decrement r(s, t) --------------------------------------------------------------------------


def _np_r(s, t, k, min_gap=0.0, name="ot_fm"):
  delta = 160.0 / 2.0**k
  r = np_eta_inv(name, np_eta(name, t) - delta)
  if min_gap > 0:
    r = np.minimum(t - min_gap, r)
  return np.maximum(s, r)


def test_eta_decrement_delta_values():
  # spec: k = 15 -> delta ~ 0.0049; k = 12 -> delta ~ 0.039. Read delta off r at eta(t) = 1 (t = 0.5):
  # eta(r) = eta(t) - delta exactly when r > s.
  for k, stated, ndig in ((15, 0.0049, 4), (12, 0.039, 3)):
    r = float(eta_decrement_r(0.0, 0.5, OT, k))
    delta = 1.0 - r / (1.0 - r)
    assert delta == pytest.approx(160.0 / 2**k, rel=1e-5)
    assert round(delta, ndig) == stated


@pytest.mark.parametrize("k", [12, 15])
@pytest.mark.parametrize("min_gap", [0.0, 1e-4])
def test_eta_decrement_r_matches_spec_formula(k, min_gap):
  rng = np.random.default_rng(8)
  t = rng.uniform(0.0, 0.994, 4000)
  s = t * rng.uniform(size=4000)
  t32, s32 = t.astype(np.float32), s.astype(np.float32)
  got = np.asarray(eta_decrement_r(jnp.asarray(s32), jnp.asarray(t32), OT, k, min_gap=min_gap), np.float64)
  np.testing.assert_allclose(got, _np_r(s32.astype(np.float64), t32.astype(np.float64), k, min_gap),
                             rtol=0, atol=3e-7)


@pytest.mark.parametrize("k,eps", [(12, 0.0), (15, 0.006)])
@pytest.mark.parametrize("min_gap", [0.0, 1e-4])
def test_sampled_r_is_between_s_and_t(k, eps, min_gap):
  cfg = IMMConfig(eps=eps, T=0.994, k=k, min_gap=min_gap)
  s, r, t = (np.asarray(v) for v in sample_times(jax.random.key(1), 200_000, cfg, OT))
  assert np.all(s <= r) and np.all(r < t)
  if min_gap > 0:
    # r = max(s, min(t - Delta, ...)): the gap is at least Delta unless r falls back to s.
    ok = (r == s) | (r <= t - min_gap + 1e-7)
    assert np.all(ok)
    assert np.all(r[s < t - min_gap - 1e-6] <= t[s < t - min_gap - 1e-6] - min_gap + 1e-7)


def test_r_stays_below_t_for_large_delta():
  t = np.linspace(0.01, 0.99, 99)
  s = 0.5 * t
  for k in (4, 6, 7):
    r = np.asarray(eta_decrement_r(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), OT, k))
    assert np.all(r >= s.astype(np.float32)) and np.all(r < t.astype(np.float32)), k


def test_gap_at_T_for_k12_is_about_1p4e_minus_6():
  # spec 7.8: "t - r tiny at large t (~1.4e-6 at t = T for k = 12)"
  gap = 0.994 - float(eta_decrement_r(0.0, 0.994, OT, 12))
  assert gap == pytest.approx(1.4e-6, rel=0.05)
  # the fp16 variant keeps it at Delta = 1e-4
  gap = 0.994 - float(eta_decrement_r(0.0, 0.994, OT, 12, min_gap=1e-4))
  assert gap == pytest.approx(1e-4, rel=1e-3)


# -- the other mappings of Fig. 11 (config.imm.mapping) ----------------------------------------------


def _np_mapped_r_ot(mapping, s, t, k, eps, T):
  """float64 closed forms under OT-FM (alpha = 1 - t, sigma = t): lambda = 2 log((1 - t) / t), so
  t = 1 / (1 + exp(lambda / 2)); 1/eta = (1 - t) / t, so t = 1 / (1 + 1/eta)."""
  lam = lambda u: 2 * np.log((1 - u) / u)
  if mapping == "t":
    r = t - (T - eps) / 2.0**k
  elif mapping == "logsnr":
    r = 1 / (1 + np.exp((lam(t) + (lam(eps) - lam(T)) / 2.0**k) / 2))
  else:
    inv = lambda u: (1 - u) / u
    r = 1 / (1 + inv(t) + (inv(eps) - inv(T)) / 2.0**k)
  return np.maximum(s, r)


@pytest.mark.parametrize("mapping", ["t", "logsnr", "inv_eta"])
@pytest.mark.parametrize("k", [6, 10])
def test_other_mappings_match_their_closed_forms(mapping, k):
  eps, T = 0.001, 0.994
  cfg = IMMConfig(eps=eps, T=T, k=k, mapping=mapping)
  rng = np.random.default_rng(11)
  t = rng.uniform(eps, T, 4000).astype(np.float32)
  s = (eps + (t - eps) * rng.uniform(size=4000)).astype(np.float32)
  got = np.asarray(mapped_r(jnp.asarray(s), jnp.asarray(t), cfg, OT), np.float64)
  want = _np_mapped_r_ot(mapping, s.astype(np.float64), t.astype(np.float64), k, eps, T)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
  assert np.all(got >= s) and np.all(got < t)
  assert np.any(got == s) and np.any(got > s)  # both the base case and the step occur


def test_mappings_step_by_their_own_variable_on_the_cosine_schedule():
  eps, T, k = 0.001, 0.994, 8
  t = np.linspace(0.05, 0.95, 19)
  lam = lambda u: 2 * np.log(np.cos(np.pi * u / 2) / np.sin(np.pi * u / 2))
  inv_eta = lambda u: 1 / np.tan(np.pi * u / 2)
  for mapping, var, span in (("logsnr", lam, lam(eps) - lam(T)), ("inv_eta", inv_eta, inv_eta(eps) - inv_eta(T))):
    cfg = IMMConfig(eps=eps, T=T, k=k, mapping=mapping)
    r = np.asarray(mapped_r(jnp.zeros(19), jnp.asarray(t, jnp.float32), cfg, COS), np.float64)
    np.testing.assert_allclose(var(r) - var(t.astype(np.float32)), span / 2**k, rtol=2e-3)


def test_gap_statistics_of_the_t_mapping_match_quadrature():
  # r = max(s, t - delta) with s ~ U(eps, t): given L = t - eps, P(r = s) = min(1, delta / L) and
  # E[t - r] = L / 2 if L <= delta else delta - delta^2 / (2 L); t ~ U(eps, T).
  from imm_jax.experiments.mappings import gap_statistics, step_curve

  eps, T, k = 0.001, 0.994, 6
  cfg = IMMConfig(eps=eps, T=T, k=k, mapping="t")
  delta = (T - eps) / 2**k
  L = np.linspace(0, T - eps, 2_000_001)[1:]
  p_base = np.mean(np.minimum(1.0, delta / L))
  mean_gap = np.mean(np.where(L <= delta, L / 2, delta - delta**2 / (2 * L)))
  st = gap_statistics(cfg, OT, draws=400_000)
  assert st["delta"] == pytest.approx(delta, rel=1e-12)
  assert st["base_case_frac"] == pytest.approx(p_base, abs=5 * math.sqrt(p_base * (1 - p_base) / 400_000))
  assert st["mean_gap"] == pytest.approx(mean_gap, rel=0.01)
  assert all(b == pytest.approx(mean_gap, rel=0.05) for b in st["band_gaps"][1:])  # away from t = eps
  curve = step_curve(cfg, OT)
  assert all(g == pytest.approx(delta, rel=1e-4) for t, g in curve.items() if t > delta + 1e-3)


def test_eta_mapping_is_the_eta_decrement_and_min_gap_applies_to_all():
  t = jnp.asarray([0.3, 0.9, 0.994], jnp.float32)
  s = jnp.zeros(3)
  cfg = IMMConfig(eps=0.006, T=0.994, k=12)
  assert cfg.mapping == "eta" and cfg.weighting == "full"  # the paper's
  np.testing.assert_array_equal(mapped_r(s, t, cfg, OT), eta_decrement_r(s, t, OT, 12))
  for mapping in ("eta", "t", "logsnr", "inv_eta"):
    cfg = IMMConfig(eps=0.006, T=0.994, k=20, min_gap=1e-3, mapping=mapping)
    np.testing.assert_allclose(t - mapped_r(s, t, cfg, OT), 1e-3, rtol=1e-3)


def test_mapping_and_weighting_options_are_checked():
  with pytest.raises(ValueError, match="config.imm.mapping"):
    IMMConfig(mapping="lambda")
  with pytest.raises(ValueError, match="config.imm.weighting"):
    IMMConfig(weighting="elbo_only")
  with pytest.raises(ValueError, match="config.imm.kernel"):
    IMMConfig(kernel="gaussian")
  with pytest.raises(ValueError, match="config.imm.kernel_c"):
    IMMConfig(kernel="pseudo_huber", kernel_c=0.0)
  for mapping in ("logsnr", "inv_eta"):  # their range over [0, T] is infinite
    with pytest.raises(ValueError, match="config.imm.eps > 0"):
      IMMConfig(eps=0.0, mapping=mapping)
  with pytest.raises(ValueError, match="config.imm.T < 1"):
    IMMConfig(eps=0.001, T=1.0, mapping="logsnr")
  IMMConfig(eps=0.0, T=1.0, mapping="t")


def test_config_without_the_newer_options_reads_as_the_paper():
  import ml_collections

  from imm_jax.config_base import base_config
  old = ml_collections.ConfigDict({k: v for k, v in base_config().imm.items()
                                   if k not in ("mapping", "weighting", "kernel_c")})
  cfg = IMMConfig.from_config(old)
  assert (cfg.mapping, cfg.weighting, cfg.kernel_c) == ("eta", "full", 0.1)


@pytest.mark.parametrize("a,b", [(1.0, 4.0), (2.0, 5.0)])
def test_weighting_reductions_of_table_4(a, b):
  t = np.linspace(0.006, 0.994, 41)
  lam = 2 * np.log((1 - t) / t)
  elbo = 1 / (1 + np.exp(-(b - lam))) / (t * (1 - t))  # 1/2 sigmoid(b - lambda) * 2 / (t (1 - t))
  tj = jnp.asarray(t, jnp.float32)
  np.testing.assert_array_equal(time_weight(tj, OT, a, b, "none"), np.ones(41))
  np.testing.assert_allclose(time_weight(tj, OT, a, b, "elbo"), elbo, rtol=2e-4)
  np.testing.assert_allclose(time_weight(tj, OT, a, b, "elbo_alpha"), elbo * (1 - t) ** a, rtol=2e-4)
  np.testing.assert_allclose(time_weight(tj, OT, a, b, "full"),
                             elbo * (1 - t) ** a / ((1 - t) ** 2 + t**2), rtol=2e-4)


def _exact_base_case_probability(k, eps, T=0.994, n=400_001):
  """P(r = s) = E_t[(t - max(r0(t), eps)) / (t - eps)] with r0 = eta^-1(eta(t) - delta), by quadrature."""
  t = np.linspace(eps, T, n)[1:]
  r0 = np_eta_inv("ot_fm", np_eta("ot_fm", t) - 160.0 / 2**k)
  p = (t - np.clip(r0, eps, None)) / (t - eps)
  return float(np.mean(p))


@pytest.mark.parametrize("k,eps,stated,tol", [(15, 0.006, 0.024, 0.0005), (12, 0.0, 0.11, 0.005)])
def test_base_case_probability(k, eps, stated, tol):
  # spec 3.2 item 5: "probability ~2.4% for CIFAR (k = 15) and ~11% for ImageNet (k = 12)"
  exact = _exact_base_case_probability(k, eps)
  assert abs(exact - stated) <= tol
  cfg = IMMConfig(eps=eps, T=0.994, k=k)
  n = 1_000_000
  s, r, t = (np.asarray(v) for v in sample_times(jax.random.key(2), n, cfg, OT))
  p = float(np.mean(r == s))
  mc_sd = math.sqrt(exact * (1 - exact) / n)
  assert abs(p - exact) < 5 * mc_sd + 5e-4, (p, exact)   # MC noise + float32 rounding of r near T
  assert abs(p - stated) <= tol + 6 * mc_sd


# -- time sampling --------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.006, 0.0])
def test_sample_times_ranges_and_distribution(eps):
  cfg = IMMConfig(eps=eps, T=0.994, k=12)
  n = 100_000
  s, r, t = (np.asarray(v, np.float64) for v in sample_times(jax.random.key(3), n, cfg, OT))
  assert np.all((t >= eps) & (t <= 0.994))
  assert np.all((s >= eps) & (s <= t))
  ks_crit = 1.95 / math.sqrt(n)  # ~0.1% level
  # t ~ U(eps, T)
  u = np.sort((t - eps) / (0.994 - eps))
  ecdf = np.arange(1, n + 1) / n
  assert np.max(np.abs(ecdf - u)) < ks_crit
  # s | t ~ U(eps, t)
  v = np.sort((s - eps) / (t - eps))
  assert np.max(np.abs(ecdf - v)) < ks_crit
  # t is not, e.g., concentrated: its mean is (eps + T) / 2
  assert abs(t.mean() - (eps + 0.994) / 2) < 0.005


def test_sample_times_deterministic_per_key():
  cfg = IMMConfig()
  a = [np.asarray(v) for v in sample_times(jax.random.key(4), 64, cfg, OT)]
  b = [np.asarray(v) for v in sample_times(jax.random.key(4), 64, cfg, OT)]
  c = [np.asarray(v) for v in sample_times(jax.random.key(5), 64, cfg, OT)]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.allclose(a[2], c[2])
  assert a[0].shape == a[1].shape == a[2].shape == (64,)


# -- kernels and MMD ------------------------------------------------------------------------------------


def test_laplace_kernel_two_particles_by_hand():
  a = jnp.asarray([[[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]])     # (G=1, M=2, D=4)
  b = jnp.asarray([[[3.0, 4.0, 0.0, 0.0], [1.0, 2.0, 2.0, 0.0]]])
  scale = jnp.asarray([2.0])
  k = np.asarray(kernel_matrix(a, b, scale, "laplace"))[0]
  # ||a0-b0|| = 5, ||a0-b1|| = 3, ||a1-b0|| = sqrt(20), ||a1-b1|| = sqrt(8); k = exp(-2 d / 4)
  expected = np.exp(-2.0 * np.array([[5.0, 3.0], [math.sqrt(20), math.sqrt(8)]]) / 4.0)
  np.testing.assert_allclose(k, expected, rtol=1e-6)
  # the diagonal of k(a, a) is exp(-w eps_k / D) ~ 1
  kaa = np.asarray(kernel_matrix(a, a, scale, "laplace"))[0]
  np.testing.assert_allclose(np.diag(kaa), np.exp(-2.0 * 1e-8 / 4.0), rtol=1e-7)
  assert KERNEL_DIST_EPS == 1e-8


def test_rbf_kernel_by_hand():
  a = jnp.asarray([[[0.0, 0.0, 0.0, 0.0]]])
  b = jnp.asarray([[[3.0, 4.0, 0.0, 0.0]]])
  k = float(kernel_matrix(a, b, jnp.asarray([2.0]), "rbf")[0, 0, 0])
  # exp(-1/2 w ||a-b||^2 / D) = exp(-0.5 * 2 * 25 / 4)
  assert k == pytest.approx(math.exp(-6.25), rel=1e-6)


def _np_kernel(u_dist, sq_dist, w, d, kind, c=0.1):
  """The spec's kernels written out in float64 from the distance (kernel_matrix's docstring)."""
  u = w * max(u_dist, 1e-8) / d
  c = c / math.sqrt(d)  # pseudo-Huber's c is given in units of u sqrt(D)
  return {"laplace": math.exp(-u), "rbf": math.exp(-0.5 * w * sq_dist / d), "energy": -u,
          "squared": -0.5 * (w * u_dist / d) ** 2, "pseudo_huber": c - math.sqrt(u * u + c * c)}[kind]


def test_theory_kernels_by_hand():
  """energy -u, squared -u^2/2 and pseudo-Huber c' - sqrt(u^2 + c'^2), c' = c / sqrt(D), of u = w ||a - b|| / D."""
  a = jnp.asarray([[[0.0, 0.0, 0.0, 0.0]]])
  b = jnp.asarray([[[3.0, 4.0, 0.0, 0.0]]])
  scale = jnp.asarray([2.0])  # u = 2 * 5 / 4 = 2.5
  got = {kind: float(kernel_matrix(a, b, scale, kind, 1.0)[0, 0, 0]) for kind in ("energy", "squared", "pseudo_huber")}
  assert got["energy"] == pytest.approx(-2.5, rel=1e-6)
  assert got["squared"] == pytest.approx(-3.125, rel=1e-6)
  assert got["pseudo_huber"] == pytest.approx(0.5 - math.sqrt(6.25 + 0.25), rel=1e-6)  # c' = 1 / sqrt(4)
  # pseudo-Huber is the squared kernel for u << c and the energy kernel (+ c) for u >> c
  assert float(kernel_matrix(a, b, scale, "pseudo_huber", 2e3)[0, 0, 0]) == pytest.approx(-3.125 / 1e3, rel=1e-3)
  assert float(kernel_matrix(a, b, scale, "pseudo_huber", 2e-3)[0, 0, 0]) == pytest.approx(-2.5 + 1e-3, rel=1e-3)


def _np_vstat_mmd(yt, yr, scale, kind, c=0.1):
  g, m, d = yt.shape
  out = np.zeros(g)
  for i in range(g):
    def k(u, v):
      dist = np.linalg.norm(u - v)
      return _np_kernel(dist, dist**2, scale[i], d, kind, c)
    tot = 0.0
    for j in range(m):
      for l in range(m):
        tot += k(yt[i, j], yt[i, l]) + k(yr[i, j], yr[i, l]) - 2 * k(yt[i, j], yr[i, l])
    out[i] = tot / m**2
  return out


@pytest.mark.parametrize("kind", KERNELS)
def test_group_mmd_matches_brute_force_v_statistic(kind):
  rng = np.random.default_rng(9)
  yt = rng.standard_normal((3, 4, 5))
  yr = yt + 0.7 * rng.standard_normal((3, 4, 5))
  scale = np.array([1.0, 3.0, 0.5])
  got = np.asarray(group_mmd(jnp.asarray(yt, jnp.float32), jnp.asarray(yr, jnp.float32),
                             jnp.asarray(scale, jnp.float32), kind, 0.7))
  np.testing.assert_allclose(got, _np_vstat_mmd(yt, yr, scale, kind, 0.7), rtol=1e-4, atol=1e-6)
  assert np.all(got > 0)


@pytest.mark.parametrize("kind", KERNELS)
def test_group_mmd_is_nonnegative(kind):
  """The V-statistic is c^T K c with weights summing to 0: >= 0 for positive definite and conditionally
  positive definite kernels alike (Lemma 2 for pseudo-Huber), over many random groups and widths."""
  rng = np.random.default_rng(12)
  yt = rng.standard_normal((200, 4, 3)) * rng.uniform(0.01, 3.0, (200, 1, 1))
  yr = rng.standard_normal((200, 4, 3)) * rng.uniform(0.01, 3.0, (200, 1, 1))
  scale = rng.uniform(0.1, 30.0, 200)
  got = np.asarray(group_mmd(jnp.asarray(yt), jnp.asarray(yr), jnp.asarray(scale), kind, 0.3))
  assert got.min() > -1e-6


def test_squared_kernel_matches_only_the_mean_lemma_1():
  """-u^2/2 gives MMD^2 = (w / D)^2 ||mean(y_t) - mean(y_r)||^2: two groups with the same mean and another
  spread are not told apart (the other kernels tell them apart), and with one particle it is the L2
  consistency-model loss (w / D)^2 ||y_t - y_r||^2 (Lemma 1)."""
  rng = np.random.default_rng(13)
  g, m, d = 5, 4, 6
  yt = rng.standard_normal((g, m, d))
  yr = rng.standard_normal((g, m, d)) * 3.0
  scale = rng.uniform(0.5, 4.0, g)
  got = np.asarray(group_mmd(jnp.asarray(yt), jnp.asarray(yr), jnp.asarray(scale), "squared"))
  expected = (scale / d) ** 2 * np.sum((yt.mean(1) - yr.mean(1)) ** 2, axis=-1)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # the same mean, three times the spread
  yr = yt.mean(1, keepdims=True) + 3.0 * (yt - yt.mean(1, keepdims=True))
  args = (jnp.asarray(yt), jnp.asarray(yr), jnp.asarray(scale))
  np.testing.assert_allclose(np.asarray(group_mmd(*args, "squared")), 0.0, atol=1e-6)
  for kind in ("laplace", "rbf", "energy", "pseudo_huber"):
    assert np.asarray(group_mmd(*args, kind)).min() > 1e-4, kind
  # one particle
  got = np.asarray(group_mmd(jnp.asarray(yt[:, :1]), jnp.asarray(yr[:, :1]), jnp.asarray(scale), "squared"))
  np.testing.assert_allclose(got, (scale / d) ** 2 * np.sum((yt[:, 0] - yr[:, 0]) ** 2, -1), rtol=1e-5)


def test_group_mmd_identical_sets_is_zero():
  rng = np.random.default_rng(10)
  y = jnp.asarray(rng.standard_normal((2, 4, 6)), jnp.float32)
  for kind in KERNELS:
    got = np.asarray(group_mmd(y, y, jnp.asarray([1.0, 10.0]), kind))
    np.testing.assert_allclose(got, 0.0, atol=1e-6)
  # a permutation of the particles is the same empirical distribution
  got = np.asarray(group_mmd(y, y[:, ::-1], jnp.asarray([1.0, 10.0])))
  np.testing.assert_allclose(got, 0.0, atol=1e-6)


def test_laplace_gradient_is_finite_with_coincident_particles_and_matches_hand_derivative():
  rng = np.random.default_rng(11)
  d = 3
  a = rng.standard_normal((1, 4, d))
  a[0, 1] = a[0, 0]  # two coincident particles
  yr = jnp.asarray(a.copy(), jnp.float32)  # y_r identical to y_t: every cross diagonal coincides too
  w = 2.0
  grad_fn = jax.jit(jax.grad(lambda y, z: group_mmd(y, z, jnp.asarray([w])).sum()))
  grad = np.asarray(grad_fn(jnp.asarray(a, jnp.float32), yr))
  assert np.all(np.isfinite(grad))
  # hand derivative: d/dy_j of (1/M^2)[sum_{j,l} k(y_j, y_l) - 2 sum_{j,l} k(y_j, r_l)], coincident pairs
  # contribute 0 (max with eps_k); k' = -(w / D) k (y_j - z) / ||y_j - z||
  m = 4
  expected = np.zeros_like(a)
  for j in range(m):
    for l in range(m):
      for z, coef in ((a[0, l], 2.0), (a[0, l], -2.0)):  # tt (symmetric: x2) and -2 tr
        diff = a[0, j] - z
        dist = np.linalg.norm(diff)
        if dist < 1e-8:
          continue
        expected[0, j] += coef * (-w / d) * math.exp(-w * dist / d) * diff / dist / m**2
  np.testing.assert_allclose(grad, expected, atol=1e-6)  # here exactly 0: the sets are identical
  # a different target: compare with the hand derivative again (non-trivial values)
  r2 = a + 0.3 * rng.standard_normal(a.shape)
  grad = np.asarray(grad_fn(jnp.asarray(a, jnp.float32), jnp.asarray(r2, jnp.float32)))
  expected = np.zeros_like(a)
  for j in range(m):
    for l in range(m):
      for z, coef in ((a[0, l], 2.0), (r2[0, l], -2.0)):
        diff = a[0, j] - z
        dist = np.linalg.norm(diff)
        if dist < 1e-8:
          continue
        expected[0, j] += coef * (-w / d) * math.exp(-w * dist / d) * diff / dist / m**2
  assert np.all(np.isfinite(grad))
  assert np.abs(expected).max() > 1e-3
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


# -- sampling -------------------------------------------------------------------------------------------


def test_uniform_schedule():
  T, eps, n = 0.994, 0.006, 8
  got = sampling.make_schedule("uniform", n, OT, eps, T)
  i = np.arange(n, -1, -1)  # t_N ... t_0
  expected = T + ((n - i) / n) * (eps - T)  # spec 4: t_i = T + ((N - i)/N)(eps - T)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)
  assert got[0] == T and got[-1] == eps
  np.testing.assert_allclose(sampling.make_schedule("default", 4, OT, 0.0, T), np.linspace(T, 0.0, 5))


@pytest.mark.parametrize("ip,T,eps", [(OT, 0.994, 0.006), (OT, 0.994, 0.0), (COS, 0.996, 0.006)],
                         ids=["ot", "ot-eps0", "cos"])
def test_edm_schedule(ip, T, eps):
  n, rho = 6, 7.0
  got = sampling.make_schedule("edm", n, ip, eps, T)
  e_max, e_min = np_eta(ip.name, T), np_eta(ip.name, eps)
  i = np.arange(n, -1, -1)
  etas = (e_max ** (1 / rho) + ((n - i) / n) * (e_min ** (1 / rho) - e_max ** (1 / rho))) ** rho
  expected = np_eta_inv(ip.name, etas)
  np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
  assert got[0] == T and got[-1] == eps
  assert np.all(np.diff(got) < 0)


def test_two_step_schedule_midpoint():
  for kind, mids in (("explicit", [1.4]), ("default", None)):
    got = sampling.make_schedule(kind, 2, OT, 0.006, 0.994, mid_etas=mids)
    assert len(got) == 3
    assert got[0] == 0.994 and got[-1] == 0.006
    assert round(float(got[1]), 4) == 0.5833  # spec 4: t_1 = 0.5833 under OT-FM
    assert got[1] == pytest.approx(1.4 / 2.4, rel=1e-12)
  np.testing.assert_array_equal(sampling.make_schedule("default", 1, OT, 0.006, 0.994), [0.994, 0.006])


def _oracle_net(pc: Precond, x0: np.ndarray):
  """The G for which f_{s,t}(x) = DDIM(x, x0, s, t) exactly: the exact x-predictor of a point mass at x0.
  Inverts the preconditioning from the network's inputs (x = x_in / c_in(t), t = c_t/1000, s from c_s)."""
  name = pc.interpolant.name

  def apply(x_in, c_t, c_s, labels=None):
    t = c_t / 1000.0
    s = c_s / 1000.0 if pc.temb_type == "identity" else t - c_s / 1000.0
    tb, sb = t[:, None], s[:, None]
    if name == "ot_fm":
      a_t, s_t, a_s, s_s = 1 - tb, tb, 1 - sb, sb
    else:
      a_t, s_t = jnp.cos(jnp.pi * tb / 2), jnp.sin(jnp.pi * tb / 2)
      a_s, s_s = jnp.cos(jnp.pi * sb / 2), jnp.sin(jnp.pi * sb / 2)
    x = x_in * (SIGMA_D * jnp.sqrt(a_t**2 + s_t**2))
    ratio = s_s / s_t
    target = (a_s - ratio * a_t) * jnp.asarray(x0, jnp.float32) + ratio * x
    if pc.f_type == "identity":
      c_skip, c_out = ratio, a_s - ratio * a_t
    elif pc.f_type == "simple_edm":
      n2 = a_t**2 + s_t**2
      c_skip, c_out = (a_t * a_s + s_t * s_s) / n2, -(a_s * s_t - a_t * s_s) * SIGMA_D / jnp.sqrt(n2)
    else:
      c_skip, c_out = 1.0, -(tb - sb) * SIGMA_D
    return (target - c_skip * x) / c_out

  return apply


@pytest.mark.parametrize("f_type,name,temb", [(f, n, "identity") for f, n in F_FORMS]
                         + [("euler_fm", "ot_fm", "stride"), ("simple_edm", "vp_cosine", "stride")])
def test_pushforward_point_mass_oracle(f_type, name, temb):
  pc = Precond(Interpolant(name), f_type=f_type, temb_type=temb)
  T = 0.994 if name == "ot_fm" else 0.996
  d = 8
  rng = np.random.default_rng(12)
  x0 = rng.standard_normal((1, d))
  apply = _oracle_net(pc, x0)
  noise = SIGMA_D * rng.standard_normal((3, d))
  denoise_fn = lambda x, s, t: denoise(apply, pc, x, s, t)
  # 1 step T -> eps = 0 from any noise lands exactly on x0 (host float64 coefficients)
  out = np.asarray(denoise_fn(jnp.asarray(noise, jnp.float32), 0.0, T))
  np.testing.assert_allclose(out, np.broadcast_to(x0, out.shape), atol=2e-4)
  push = jax.jit(lambda x, times: sampling.pushforward(denoise_fn, x, times))
  # eps = 0: any number of steps lands exactly on x0
  times = sampling.make_schedule("uniform", 4, pc.interpolant, 0.0, T)
  out = np.asarray(push(jnp.asarray(noise, jnp.float32), times))
  np.testing.assert_allclose(out, np.broadcast_to(x0, out.shape), atol=2e-4)
  # eps > 0: the deterministic path keeps the implied noise e = (x_T - alpha_T x0) / sigma_T
  eps = 0.006
  e = (noise - np_alpha(name, T) * x0) / np_sigma(name, T)
  expected = np_alpha(name, eps) * x0 + np_sigma(name, eps) * e
  times = sampling.make_schedule("edm", 4, pc.interpolant, eps, T)
  out = np.asarray(push(jnp.asarray(noise, jnp.float32), times))
  np.testing.assert_allclose(out, expected, atol=2e-4)


def test_generate_with_a_flax_module_oracle():
  import flax.linen as nn

  pc = Precond(OT, f_type="euler_fm", temb_type="stride")
  x0 = np.array([[0.3, -1.2, 0.5, 2.0]])
  oracle = _oracle_net(pc, x0)

  class Oracle(nn.Module):
    @nn.compact
    def __call__(self, x, c_t, c_s, labels=None, train=False):
      z = self.param("z", nn.initializers.zeros, ())
      return oracle(x, c_t, c_s) + z

  net = Oracle()
  noise = sampling.prior_noise(jax.random.key(0), (5, 4), SIGMA_D)
  params = net.init(jax.random.key(1), noise, jnp.ones(5), jnp.ones(5))["params"]
  times = sampling.make_schedule("uniform", 4, OT, 0.0, 0.994)
  out = np.asarray(sampling.generate(net, params, pc, noise, times))
  np.testing.assert_allclose(out, np.broadcast_to(x0, out.shape), atol=2e-4)


def test_restart_jumps_to_eps_and_renoises():
  times = sampling.make_schedule("uniform", 4, OT, 0.006, 0.994)
  d = 20_000
  c0 = 0.37
  calls = []

  def denoise_fn(x, s, t):
    jax.debug.callback(lambda x, s, t: calls.append((np.asarray(x), float(s), float(t))), x, s, t)
    return jnp.zeros_like(x) + c0 + 10.0 * t  # x-independent "clean" estimate that encodes t

  x_init = sampling.prior_noise(jax.random.key(0), (1, d), SIGMA_D)
  assert abs(float(x_init.std()) - SIGMA_D) < 0.02 and abs(float(x_init.mean())) < 0.02  # N(0, sigma_d^2)
  out = np.asarray(sampling.restart(denoise_fn, x_init, times, jax.random.key(1), OT, SIGMA_D))
  # final output is the jump f_{eps, t_1}(x_{t_1}) with no re-noise
  np.testing.assert_allclose(out, c0 + 10.0 * np.float32(times[-2]), rtol=1e-6)
  assert len(calls) == 4
  for i, (x, s, t) in enumerate(calls):
    assert s == pytest.approx(0.006, abs=1e-7)       # every jump goes straight to eps
    assert t == pytest.approx(times[i], abs=1e-7)
    if i > 0:  # x = alpha_t x~ + sigma_t e~ with fresh e~ ~ N(0, sigma_d^2)
      x_tilde = c0 + 10.0 * times[i - 1]
      e = (x - (1 - times[i]) * x_tilde) / times[i]
      assert abs(e.mean()) < 0.02 and abs(e.std() - SIGMA_D) < 0.02
