"""The particle-count experiment's plumbing (imm_jax.experiments.group_size): config overrides and
the report table. Training itself is exercised by the trainer tests; here no network is trained."""

from __future__ import annotations

import math

import pytest

from imm_jax.configs_loader import load_config
from imm_jax.experiments import group_size


def test_overrides_parse_literals_and_strings():
  out = group_size.parse_overrides(["optim.lr=3e-3", "imm.kernel=rbf", "imm.k = 18"])
  assert out == {"optim.lr": 0.003, "imm.kernel": "rbf", "imm.k": 18}
  with pytest.raises(ValueError, match="KEY=VALUE"):
    group_size.parse_overrides(["optim.lr"])


def test_apply_overrides_sets_keys_and_rejects_typos():
  c = group_size.apply_overrides(load_config("toy2d", "moons"), {"optim.lr": 0.003, "imm.k": 18})
  assert (c.optim.lr, c.imm.k) == (0.003, 18)
  with pytest.raises(KeyError, match="no such config key"):
    group_size.apply_overrides(load_config("toy2d"), {"imm.kk": 3})


def test_table_has_a_row_per_run_and_marks_divergence():
  runs = {}
  for k, m, e in [(16, 1, 0.008), (16, 4, 0.004), (20, 1, math.nan)]:
    runs[group_size.run_key(k, m, 0)] = dict(k=k, M=m, seed=0, groups=1024 // m, diverged=math.isnan(e),
                                             energy_1step=e, energy_2step=e, energy_4step=e)
  res = {"name": "toy", "num_steps": 10, "overrides": {"optim.lr": 0.003}, "runs": runs,
         "true_vs_true_energy": 0.0001, "true_vs_true_energy_draws": [0.0, 0.0002]}
  lines = group_size.markdown_table(res).splitlines()
  assert "`optim.lr=0.003`" in lines[0] and "0.00010 mean of 2, range 0.00000 to 0.00020" in lines[0]
  assert "| 16 | 4 | 0 | 256 | 0.00400 | 0.00400 | 0.00400 |" in lines
  assert "| 20 | 1 | 0 | 1024 | diverged | diverged | diverged |" in lines


def test_run_dirs_encode_every_setting():
  key = group_size.run_key(16, 4, 1)
  assert group_size.run_dir_name("toy2d", "moons", 1500, {}, key) == "toy2d_moons_1500steps_k16_M4_s1"
  assert (group_size.run_dir_name("digits", "", 800, {"optim.lr": 0.003, "imm.kernel": "rbf"}, key)
          == "digits_800steps_imm.kernel=rbf_optim.lr=0.003_k16_M4_s1")
