"""Every shipped config loads, builds its network on its data's shape, and (tiny) trains through the
real trainer; TFDS configs run on tfds.testing.mock_data (no download)."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from imm_jax.builder import build_model
from imm_jax.configs_loader import CONFIG_DIR, load_config
from imm_jax.models import count_params
from imm_jax.trainer import train_and_evaluate

CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, "*.py")))


def test_config_files_found():
  assert {"digits", "toy2d", "cifar10", "mnist"} <= set(CONFIGS)


@pytest.mark.parametrize("name,arg", [("digits", ""), ("digits", "cond"), ("toy2d", "checkerboard"),
                                      ("toy2d", "8gaussians"), ("toy2d", "moons")])
def test_offline_configs_build(name, arg):
  c = load_config(name, arg)
  model = build_model(c)
  n = count_params(model.abstract_params())
  assert n > 10_000
  assert model.null_label == (10 if arg == "cond" else None)


def test_unknown_variant_names_the_choices():
  with pytest.raises(ValueError, match="moons"):
    load_config("toy2d", "spiral")


def test_cifar10_config_is_the_papers():
  c = load_config("cifar10")
  assert (c.batch_size, c.imm.group_size, c.imm.k, c.imm.weight_a, c.imm.weight_b) == (4096, 4, 15, 1.0, 5.0)
  assert (c.precond.f_type, c.precond.temb_type, c.optim.name, c.optim.lr) == ("simple_edm", "identity",
                                                                               "radam", 1e-4)
  assert (c.imm.eps, c.imm.T, c.ema.decay, c.model.dropout, c.data.x_flip) == (0.006, 0.994, 0.9999, 0.2, True)


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_tfds_configs_train_on_mock_data(name, tmp_path):
  import tensorflow_datasets as tfds

  c = load_config(name)
  c.num_steps = 2
  c.batch_size = 8
  c.log_every = 1
  c.sample_every = 2
  c.checkpoint.update(every=2, async_save=False)
  c.data.worker_count = 0
  c.sample.update(num=4, steps=(1,))
  c.eval.update(num=8, steps=(1,), every=0, at_start=False)
  if name == "cifar10":  # the paper's network, shrunk
    c.model.update(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(16,))
  else:
    c.model.update(preset="", patch_size=4, hidden_size=32, depth=1, num_heads=2)
  with tfds.testing.mock_data(num_examples=16):
    figures = train_and_evaluate(c, str(tmp_path / name))
  assert np.isfinite(figures["energy_1step"])
