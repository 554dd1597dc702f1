"""imm_jax/experiments/augment_leak.py: its orientation measure against rotations of known angle, and
the whole experiment at a few steps."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from imm_jax import augment as A
from imm_jax.experiments import augment_leak as L


def test_bars_are_horizontal_and_rotations_measure_their_angle():
  data = L.bars(n=64, seed=1)
  assert data.shape == (64, 16, 16, 1) and data.dtype == np.uint8
  assert np.all(np.abs(L.orientation_degrees(data)) < 1.0) and L.tilted_share(data) == 0.0
  x = jnp.asarray(data, jnp.float32) / 127.5 - 1.0
  for degrees in (-60.0, -25.0, 30.0, 75.0):
    params = {k: jnp.zeros(64) for k in ("xflip", "yflip", "log2_scale", "log2_stretch", "direction")}
    params.update(angle=jnp.full(64, np.radians(degrees)), shift=jnp.zeros((64, 2)))
    rotated = np.asarray(A.apply(x, params))
    measured = L.orientation_degrees(rotated)  # counter-clockwise on screen is positive
    assert np.all(np.abs(measured - degrees) < 4.0), (degrees, measured[:4])
    assert L.tilted_share(rotated) == 1.0


@pytest.mark.slow
def test_experiment_writes_its_table_json_and_figure(tmp_path, monkeypatch):
  config_of = L.run_config

  def tiny(*args, **kwargs):  # the experiment's runs with a one-block network and batch 16
    c = config_of(*args, **kwargs)
    c.batch_size = 16
    c.model.update(hidden_size=32, depth=1, num_heads=2)
    return c

  monkeypatch.setattr(L, "run_config", tiny)
  results = L.run(str(tmp_path / "work"), str(tmp_path / "out"), train_steps=4, checkpoint_every=2, p=0.5,
                  num=16, seed=0, command="test")
  assert set(results["runs"]) == set(L.RUNS)
  for shares in results["runs"].values():
    assert set(shares) == {"2", "4"} and all(0.0 <= v <= 1.0 for v in shares.values())
  assert results["data_tilted"] == 0.0
  saved = json.load(open(tmp_path / "out" / "results" / "augment_leak.json"))
  assert saved == json.loads(json.dumps(results))
  assert os.path.getsize(tmp_path / "out" / "results" / "augment_leak.png") > 1000
  table = L.markdown_table(results).splitlines()
  assert table[0] == "| checkpoint | " + " | ".join(L.RUNS) + " |" and len(table) == 4
