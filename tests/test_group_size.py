"""The particle-count experiment (imm_jax.experiments.group_size): its command line and the mechanism
behind its result. The sweep it runs is tested in test_sweep.py; here no network is trained."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_a_bad_set_stops_in_one_line_before_training(tmp_path):
  r = subprocess.run([sys.executable, "-m", "imm_jax.experiments.group_size", "--set", "imm.kk=3",
                      f"--workdir={tmp_path / 'w'}", f"--out={tmp_path / 'o'}"],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      "error: --set/--ks/--group_sizes: no such config key 'imm.kk' (config.imm has: T, eps, eta_max, eta_min, group_size, k, kernel, "
      "kernel_c, label_dropout, mapping, min_gap, weight_a, weight_b, weighting)"]
  assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("m", [1, 4])
def test_single_particle_mmd_collapses_a_spread_target_to_a_point(m):
  """Why M = 1 fails at large gaps (docs/group_size.md): when the target is a draw from a spread
  distribution (the base case r = s), the M = 1 group MMD is a per-pair regression whose minimiser is
  one point, while M >= 2 adds the self term that keeps the outputs spread like the targets.

  Free outputs start exactly at the target distribution (U(-1, 1), standard deviation 1/sqrt(3)) and
  are trained on the expected group MMD against fresh uniform targets. Closed form for M = 1: the
  loss is 2 - 2 E_z exp(-|y - z|) = 2 - 2 (1 - cosh(y) / e), smallest at y = 0, so every output
  contracts to 0. For M = 4 the outputs stay spread.
  """
  import jax
  import jax.numpy as jnp
  import optax

  from imm_jax.objectives.imm import group_mmd

  n = 64
  g = n // m
  y = jnp.linspace(-1.0, 1.0, n).reshape(g, m, 1)
  opt = optax.adam(0.02)

  def loss(y, z):
    return jnp.mean(jax.vmap(lambda zz: group_mmd(y, zz, jnp.ones((g,))))(z))

  @jax.jit
  def run(y, key):
    def step(carry, k):
      y, st = carry
      z = jax.random.uniform(k, (256, g, m, 1), minval=-1.0, maxval=1.0)
      u, st = opt.update(jax.grad(loss)(y, z), st)
      return (optax.apply_updates(y, u), st), None
    (y, _), _ = jax.lax.scan(step, (y, opt.init(y)), jax.random.split(key, 300))
    return y

  spread = float(jnp.std(run(y, jax.random.PRNGKey(0))))
  target = 1.0 / 3 ** 0.5
  if m == 1:
    assert spread < 0.1 * target  # measured 0.030 from 0.58
  else:
    assert abs(spread - target) < 0.1 * target  # measured 0.557
