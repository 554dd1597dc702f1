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
import optax
import pytest
from flax.traverse_util import flatten_dict

from imm_jax import checkpoints
from imm_jax.builder import build_model
from imm_jax.configs_loader import load_config
from imm_jax.convert import cli
from imm_jax.trainer import _class_rows, init_state, load_start_params, train_and_evaluate

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
    (dict(patch_size=2), "is another network (other shapes: final_layer/linear/bias (16,) there, (4,) here; "
                         "final_layer/linear/kernel (32, 16) there, (32, 4) here; x_embedder/kernel (4, 4, 1, 32) "
                         "there, (2, 2, 1, 32) here)"),
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


def _labelled(config, net: str, num_classes: int):
  """``config`` (tiny digits) with a tiny DiT or SongUNet, class-conditional on ``num_classes`` (0: not)."""
  if net == "unet":
    config.model = type(config.model)(dict(name="unet", model_channels=16, channel_mult=[1], num_blocks=1,
                                           attn_resolutions=[], dropout=0.0, class_conditional=False))
  config.model.update(class_conditional=num_classes > 0, num_classes=num_classes)
  return config


def _outputs(model, params, labels):
  """The network's raw output on fixed inputs (labels None: the null class of a conditional model)."""
  x = jax.random.normal(jax.random.key(1), (3,) + model.input_shape)
  c_t, c_s = np.array([0.9, 0.5, 0.1], np.float32), np.array([0.3, 0.2, 0.0], np.float32)
  if labels is None and model.null_label is not None:
    labels = np.full((3,), model.null_label, np.int32)
  return np.asarray(model.net.apply({"params": params}, x, c_t, c_s, labels, train=False))


@pytest.mark.parametrize("net", ["dit", "unet"])
@pytest.mark.parametrize("source_classes, classes", [(0, 10), (10, 0), (10, 4)])
def test_a_new_number_of_classes_keeps_the_null_class_and_starts_the_classes_fresh(
    net, source_classes, classes, tmp_path, tiny_digits):
  """The truth is the source network itself: unguided (the null class), the fine-tuning run's network
  computes what the source's did, whatever the two numbers of classes; the class rows are the fresh
  initialisation's."""
  source = str(tmp_path / "source")
  s = _labelled(tiny_digits(), net, source_classes)
  source_model = build_model(s)
  # Every parameter away from its initialisation: DiT's zero adaLN and final layers would hide a wrong row.
  leaves, tree = jax.tree.flatten(source_model.init_params(jax.random.key(3)))
  noise = jax.random.split(jax.random.key(4), len(leaves))
  source_params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, noise)])
  checkpoints.save_params_only(source, source_params)
  checkpoints.write_config(source, s)

  c = _labelled(tiny_digits(), net, classes)
  c.init.workdir = source
  model = build_model(c)
  start = load_start_params(c, model)
  params = init_state(model, optax.sgd(0.1), int(c.seed), start_params=start).params
  np.testing.assert_allclose(_outputs(model, params, None), _outputs(source_model, source_params, None),
                             rtol=1e-5, atol=1e-5)
  fresh = flatten_dict(jax.device_get(model.init_params(jax.random.key(int(c.seed)))))
  got = flatten_dict(jax.device_get(params))
  label_param = ("y_embedder", "embedding_table") if net == "dit" else ("map_label", "kernel")
  if classes:
    np.testing.assert_array_equal(got[label_param][:classes], fresh[label_param][:classes])
    labels = np.array([0, classes - 1, 1], np.int32)
    assert np.abs(_outputs(model, params, labels) - _outputs(model, params, None)).max() > 1e-3
  elif net == "dit":  # the table is the null row alone
    np.testing.assert_array_equal(got[label_param], np.asarray(flatten_dict(source_params)[label_param])[[source_classes]])
  else:
    assert label_param not in got
  if net == "unet" and source_classes and not classes:  # map_label's bias now inside map_layer0's
    assert np.abs(got[("map_layer0", "bias")] - flatten_dict(source_params)[("map_layer0", "bias")]).max() > 1e-3


@pytest.mark.slow
def test_an_unconditional_dit_fine_tunes_class_conditionally(source, tmp_path, tiny_digits):
  """Through the trainer (the start parameters cross the jitted init): the source's null row lands on
  the new table's null row; its ten class rows are fresh."""
  c = _augmented(_frozen(tiny_digits()))
  c.model.class_conditional = True
  c.init.workdir = source
  train_and_evaluate(c, str(tmp_path / "run"))
  started, before = _ema(str(tmp_path / "run")), _ema(source)
  fresh = flatten_dict(jax.device_get(build_model(c).init_params(jax.random.key(int(c.seed)))))
  table = ("y_embedder", "embedding_table")
  assert before[table].shape == (1, 32) and started[table].shape == (11, 32)
  np.testing.assert_allclose(started[table][10], before[table][0], rtol=1e-6)
  np.testing.assert_allclose(started[table][:10], fresh[table][:10], rtol=1e-6)
  for key, value in before.items():
    if key != table:
      np.testing.assert_allclose(started[key], value, rtol=1e-6, atol=1e-7, err_msg="/".join(key))


def test_class_table_rows_follow_the_reference_layout():
  """DiT's table (spec: reference_networks.md): classes 0..C-1, the null class at row C, and with the
  reference's label dropout one unused row after it."""
  # ImageNet's table with the unused row, on 10 classes with and without it.
  assert _class_rows(1002, True, 12, True) == ((1000, 1001), (10, 11), 1000, 10)
  assert _class_rows(1002, True, 11, False) == ((1000,), (10,), 1000, 10)
  # Unconditional (the null row alone) to 10 classes; the same classes when only the unused row differs.
  assert _class_rows(1, False, 11, False) == ((0,), (10,), 0, 10)
  assert _class_rows(11, False, 12, True) == (tuple(range(11)), tuple(range(11)), 10, 10)
