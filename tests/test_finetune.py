"""``config.init``: a new run starts from another run's EMA parameters (trainer.load_start_params).

The truth here is the source checkpoint itself: with the learning rate at 0 one training step leaves
the parameters where they started, so the new run's checkpoint must hold the source's EMA parameters
where the source has them and the fresh initialisation (``Model.init_params`` at the run's seed) where
it does not. The released-checkpoint path uses a converted reference network (tests/testvectors).
"""

from __future__ import annotations

import os
import pathlib

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from imm_jax import checkpoints
from imm_jax.builder import build_model
from imm_jax.configs_loader import load_config
from imm_jax.convert import cli
from imm_jax.trainer import load_start_params, train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parent.parent


def _ema(workdir, step=None):
  model = build_model(checkpoints.read_config(workdir))
  params, _ = checkpoints.restore_ema_params(workdir, model.abstract_params(), step)
  return flatten_dict(jax.device_get(params))


def _frozen(config):
  """``config`` turned into a run that does not move its parameters: one step at learning rate 0."""
  config.num_steps = 1
  config.optim.update(lr=0.0, warmup_steps=0)
  config.update(sample_every=0, log_every=0)
  config.sample.steps = ()
  config.eval.num = 0
  return config


def _assert_started_from(workdir, config, source: dict, fresh_keys: set):
  """The run in ``workdir`` holds ``source`` where it has a key, else the fresh initialisation."""
  started = _ema(workdir)
  fresh = flatten_dict(jax.device_get(build_model(config).init_params(jax.random.key(int(config.seed)))))
  assert set(started) == set(fresh) and set(started) - set(source) == fresh_keys
  moved = 0
  for key, value in started.items():
    want = source.get(key, fresh[key])
    np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-7, err_msg="/".join(key))
    if key in source:
      moved += int(np.max(np.abs(source[key] - fresh[key])) > 1e-5)
  assert moved > len(source) // 2  # the loaded parameters are not what a fresh start would have had


def _augmented(config):
  """``config`` with EDM's augmentation and the network given its labels (a new input, augment_dim)."""
  config.augment.update(p=0.12, xflip=True)
  config.model.augment_dim = 9
  return config


@pytest.mark.slow
def test_a_new_run_starts_from_the_source_and_adds_fresh_parameters(tmp_path, tiny_digits):
  source = str(tmp_path / "source")
  c = tiny_digits(6)  # checkpoints at steps 3 and 6
  c.update(seed=7, sample_every=0)
  c.sample.steps = ()
  c.eval.num = 0
  train_and_evaluate(c, source)
  # The network with an augmentation input on the one without: its embedding is new.
  target = str(tmp_path / "target")
  t = _augmented(_frozen(tiny_digits()))
  t.init.workdir = source
  train_and_evaluate(t, target)
  _assert_started_from(target, t, _ema(source), {("augment_embedder", "kernel")})
  # An older checkpoint by config.init.step.
  o = tiny_digits()
  o.init.update(workdir=source, step=3)
  older = flatten_dict(load_start_params(o, build_model(o)))
  kernel = ("final_layer", "linear", "kernel")
  np.testing.assert_array_equal(older[kernel], _ema(source, 3)[kernel])
  assert np.max(np.abs(_ema(source, 3)[kernel] - _ema(source)[kernel])) > 1e-4
  # Resuming never reads config.init: the source may be gone.
  t.num_steps = 2
  t.init.workdir = str(tmp_path / "gone")
  train_and_evaluate(t, target)
  assert checkpoints.saved_steps(target) == [1, 2]


@pytest.mark.slow
def test_fine_tuning_a_released_network_with_augmentation_labels(tmp_path):
  """The converted reference SongUNet (as `imm_jax.convert` writes the released CIFAR-10 one), trained
  on an image folder with EDM augmentation: its augmentation embedding is the only new parameter."""
  released = str(tmp_path / "released")
  assert cli.main(["--reference", str(REPO / "tests" / "testvectors" / "unet_small_identity.npz"),
                   "--out", released]) == 0
  ref = checkpoints.read_config(released)
  images = tmp_path / "images.npy"
  np.save(images, np.random.default_rng(0).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8))
  c = _frozen(load_config("digits"))
  c.data.update(name="images", path=str(images), image_size=16, holdout_fraction=0.0)
  c.model = ref.model
  c.model.augment_dim = 9
  c.precond = ref.precond
  c.imm.update(eps=ref.imm.eps, T=ref.imm.T)
  c.augment.update(p=0.12, xflip=True)
  c.batch_size = 8
  c.init.workdir = released
  train_and_evaluate(c, str(tmp_path / "finetuned"))
  _assert_started_from(str(tmp_path / "finetuned"), c, _ema(released), {("map_augment", "kernel")})


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  from conftest import make_tiny_digits
  workdir = str(tmp_path_factory.mktemp("init") / "source")
  train_and_evaluate(_augmented(make_tiny_digits(3)), workdir)
  return workdir


@pytest.mark.parametrize("change, expected", [
    (dict(workdir="{tmp}/nothing"), "config.init.workdir={tmp}/nothing: no config.json there; give a workdir"),
    (dict(step=2), "no EMA parameters at step 2 (its checkpoints: [3]); set config.init.step to one of"),
    (dict(augment_dim=0), "is another network (parameters this network lacks: augment_embedder/kernel): "
                          "set config.model to the source's network (its config.json), with additions only"),
    (dict(class_conditional=True), "is another network (other shapes: y_embedder/embedding_table (1, 32) "
                                   "there, (11, 32) here)"),
    (dict(objective="moment_matching"), "moment-matching distillation starts from its teacher"),
])
def test_bad_init_stops_in_one_line_before_writing(source, tmp_path, tiny_digits, change, expected):
  c = _augmented(tiny_digits())
  c.init.workdir = source
  for key, value in change.items():
    value = value.replace("{tmp}", str(tmp_path)) if isinstance(value, str) else value
    section = c.init if key in ("workdir", "step") else c.model if key in c.model else c
    section[key] = value
  if c.model.augment_dim == 0 or c.objective == "moment_matching":  # these take no augmentation
    c.augment.update(p=0.0, xflip=False)
  with pytest.raises((ValueError, FileNotFoundError)) as e:
    train_and_evaluate(c, str(tmp_path / "run"))
  message = str(e.value)
  assert getattr(e.value, "input_error", False) and "\n" not in message  # imm_jax.train: one line, exit 2
  assert expected.replace("{tmp}", str(tmp_path)) in message, message
  assert not (tmp_path / "run").exists()


def test_a_converted_dit_with_its_own_pos_embed_is_refused(tmp_path, tiny_digits):
  released = str(tmp_path / "released")
  assert cli.main(["--reference", str(REPO / "tests" / "testvectors" / "dit_small_stride.npz"),
                   "--out", released]) == 0
  ref = checkpoints.read_config(released)
  c = tiny_digits()
  c.model = ref.model
  c.init.workdir = released
  with pytest.raises(ValueError, match="carries a reference DiT pos_embed .* it can be sampled"):
    train_and_evaluate(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("paper, released, added", [
    (("cifar10", ""), "cifar10", {("map_augment", "kernel")}),
    (("imagenet256", "XL/2-ts-a2"), "imagenet256_ts_a2", set()),
])
def test_the_paper_configs_fine_tune_the_released_networks(paper, released, added):
  """What the README's fine-tuning example needs: each paper config's network is the released one,
  parameter for parameter, plus only the inputs it adds (shapes alone, nothing computed)."""
  from imm_jax.builder import data_info
  from imm_jax.data import DataInfo

  ref = load_config("released", released)
  ref_shapes = flatten_dict(build_model(ref).abstract_params())
  c = load_config(*paper)
  info = data_info(ref)  # the paper configs read datasets (TFDS, encoded latents); the same shapes
  ours = flatten_dict(build_model(c, DataInfo(info.shape, info.num_classes, info.kind, c.data.name))
                      .abstract_params())
  assert set(ours) - set(ref_shapes) == added and set(ref_shapes) <= set(ours)
  assert all(ours[k].shape == v.shape for k, v in ref_shapes.items())
