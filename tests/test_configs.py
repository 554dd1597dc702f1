"""Every shipped config loads, builds its network on its data's shape, and (tiny) trains through the
real trainer; TFDS configs run on tfds.testing.mock_data (no download). A bad --config or override stops
the executables with one line."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from imm_jax.aot import config_data_info
from imm_jax.builder import build_model
from imm_jax.data import get_info
from imm_jax.configs_loader import CONFIG_DIR, check_config_argv, load_config
from imm_jax.models import count_params
from imm_jax.writers import read_metrics
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
  c.eval.update(num=8, samples=0, steps=(1,), every=0, at_start=False)
  if name == "cifar10":  # the paper's network, shrunk
    c.model.update(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(16,))
  else:
    c.model.update(preset="", patch_size=4, hidden_size=32, depth=1, num_heads=2)
  workdir = str(tmp_path / name)
  with tfds.testing.mock_data(num_examples=16):
    figures = train_and_evaluate(c, workdir)
    # imm_jax.aot, which reads no data, compiles the network the data gives.
    data, assumed = get_info(c.data), config_data_info(c)
    shapes = [jax.tree.map(lambda a: a.shape, build_model(c, info).abstract_params()) for info in (data, assumed)]
    assert (assumed.shape, assumed.kind) == (data.shape, data.kind) and shapes[0] == shapes[1]
  assert np.isfinite(figures["energy_1step"])
  losses = {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}
  assert sorted(losses) == [1, 2] and all(np.isfinite(list(losses.values())))
  samples = sorted(os.listdir(os.path.join(workdir, "samples")))
  # configs/cifar10.py augments (EDM's pipeline, its labels into the network): a grid of augmented batches.
  assert samples == (["augmented.png"] if name == "cifar10" else []) + ["step0000002_1step.png"]


DIGITS = os.path.join(CONFIG_DIR, "digits.py")


@pytest.mark.parametrize("argv,message", [
    (["--config", "configs/nope.py"], "--config: no config file 'configs/nope.py'; give a path such as"),
    ([f"--config={DIGITS}:zzz"], "ValueError: unknown variant 'zzz' for configs/digits.py"),
    (["--config", DIGITS, "--config.model.hiden_size=3"],
     f"--config.model.hiden_size: {DIGITS}: no such config key 'model.hiden_size' (config.model has: "),
    (["--config", DIGITS, "--config.optim.lr.x", "1"], "(config.optim.lr is a value, not a group)"),
    (["--config", DIGITS, "--noconfig.ema.warmupp"], "no such config key 'ema.warmupp' (config.ema has: "),
])
def test_bad_config_arguments_stop_with_one_line(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    check_config_argv(["imm_jax.train", *argv, "--workdir", "w"])
  text = capsys.readouterr().err
  assert e.value.code == 2 and text.startswith("error: ") and message in text and text.count("\n") == 1
  if "hiden_size" in message:
    assert "hidden_size" in text  # the options list shows the right spelling


def test_good_config_arguments_pass():
  check_config_argv(["x", "--config", f"{DIGITS}:cond", "--config.model.hidden_size=64", "--config.ema.warmup",
                     "--noconfig.ema.warmup", "--config.optim.lr", "1e-3", "--workdir", "w"])
  check_config_argv(["x", "--workdir", "w"])  # no --config: absl reports the missing required flag


def test_train_stops_on_a_misspelt_override_before_touching_the_workdir(tmp_path):
  workdir = tmp_path / "w"
  r = subprocess.run([sys.executable, "-m", "imm_jax.train", "--config", DIGITS, "--config.modle.depth=2",
                      f"--workdir={workdir}"], capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith(f"error: --config.modle.depth: {DIGITS}: no such config key 'modle.depth' (config has: ")
  assert " model, " in lines[0] and not workdir.exists()
