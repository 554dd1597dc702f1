"""The trainer end to end on tiny configs: outputs, resume, sampling executable."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from imm_jax import checkpoints
from imm_jax.builder import build_model
from imm_jax.evaluation import distances
from imm_jax.trainer import generate_samples, sample_grid_noise, sample_quality, train_and_evaluate
from imm_jax.writers import read_metrics

from imm_jax.configs_loader import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _final_params(workdir):
  config = checkpoints.read_config(workdir)
  model = build_model(config)
  params, step = checkpoints.restore_ema_params(workdir, model.abstract_params())
  return jax.device_get(params), step


def test_train_writes_checkpoints_metrics_events_and_grids(tmp_path, tiny_digits):
  workdir = str(tmp_path / "run")
  figures = train_and_evaluate(tiny_digits(), workdir)
  assert set(figures) == {"energy_1step", "energy_2step", "mmd_1step", "mmd_2step"}
  assert all(np.isfinite(v) for v in figures.values())
  assert sorted(os.listdir(checkpoints.checkpoint_dir(workdir))) == ["3", "6"]
  rows = read_metrics(workdir)
  train_steps = [r["step"] for r in rows if "train/loss" in r]
  assert train_steps == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
  assert any("eval/energy_1step" in r for r in rows)
  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  pngs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(workdir, "samples", "*.png")))
  assert pngs == ["step0000003_1step.png", "step0000003_2step.png",
                  "step0000006_1step.png", "step0000006_2step.png"]
  cfg = json.load(open(os.path.join(workdir, "config.json")))
  assert cfg["model"]["hidden_size"] == 32


def test_resume_continues_exactly(tmp_path, tiny_digits):
  straight = str(tmp_path / "straight")
  resumed = str(tmp_path / "resumed")
  train_and_evaluate(tiny_digits(6), straight)
  train_and_evaluate(tiny_digits(3), resumed)
  train_and_evaluate(tiny_digits(6), resumed)
  p1, s1 = _final_params(straight)
  p2, s2 = _final_params(resumed)
  assert s1 == s2 == 6
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(a, b)
  loss = lambda d: {r["step"]: r["train/loss"] for r in read_metrics(d) if "train/loss" in r}
  assert loss(straight) == loss(resumed)


def test_nan_loss_stops_without_overwriting_checkpoint(tmp_path, tiny_digits):
  workdir = str(tmp_path / "run")
  train_and_evaluate(tiny_digits(3), workdir)
  c = tiny_digits(6)
  c.optim.lr = float("nan")
  with pytest.raises(FloatingPointError, match="non-finite"):
    train_and_evaluate(c, workdir)
  assert sorted(os.listdir(checkpoints.checkpoint_dir(workdir))) == ["3"]
  params, _ = _final_params(workdir)
  assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


def test_sample_quality_scores_config_eval_samples_generated_batch_at_a_time():
  # config.eval.samples samples (here more than the held-out set), generated at most config.eval.batch
  # at a time (3 chunks of 100 for 290 samples, the last 10 dropped): the figures of the same noise
  # sampled at once and scored by the distances directly.
  c = load_config("toy2d", "moons")
  c.eval.update(samples=290, batch=128)
  model = build_model(c)
  params = model.init_params(jax.random.key(0))
  eval_x = np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32)
  figures = sample_quality(model, params, c, eval_x, (1, 2))
  noise, labels = sample_grid_noise(model, 300, int(c.seed) + 1)
  for steps in (1, 2):
    whole = generate_samples(model, params, noise, labels, steps, c)[:290]
    assert whole.shape == (290, 2)
    assert figures[f"energy_{steps}step"] == pytest.approx(distances.energy_distance(whole, eval_x), rel=1e-5)
    assert figures[f"mmd_{steps}step"] == pytest.approx(distances.mmd_rbf(whole, eval_x), rel=1e-5, abs=1e-8)
  c.eval.samples = 0  # as many samples as held-out examples
  first = generate_samples(model, params, *sample_grid_noise(model, 50, int(c.seed) + 1), 1, c)
  assert sample_quality(model, params, c, eval_x, (1,))["energy_1step"] == pytest.approx(
      distances.energy_distance(first, eval_x), rel=1e-5)


@pytest.mark.parametrize("overrides,message", [
    (["--config.batch_size=30"], "config.batch_size / config.grad_accum_steps = 30 must be a multiple of "
                                 "devices (8) x config.imm.group_size (4) so each device holds whole groups"),
    (["--config.batch_size=16"], "= 16 must be a multiple of devices (8) x config.imm.group_size (4)"),
    (["--config.batch_size=0"], "config.batch_size=0 and config.grad_accum_steps=1 must be positive"),
    (["--config.eval.samples=1"], "config.eval.samples=1: give 0 (as many samples as config.eval.num"),
    (["--config.eval.batch=0"], "config.eval.batch=0: give the number of samples generated at a time"),
    (["--config.model.name=transformer"], "unknown network 'transformer' (config.model.name): choose one of"),
    (["--config.data.name=cifar"], "config.data.name='cifar' is not valid; choose one of digits, toy2d, images"),
    (["--config.data.name=images", "--config.data.path=/no/such/dir"],
     "config.data.path='/no/such/dir': /no/such/dir does not exist; expected a folder of images"),
])
def test_bad_input_stops_before_training_in_one_line(tmp_path, overrides, message):
  """Issue 2's bad inputs, from the command line on 8 simulated devices: one line naming the option and
  what is expected, exit status 2, and no workdir."""
  workdir = tmp_path / "run"
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  r = subprocess.run([sys.executable, "-m", "imm_jax.train", "--config", "configs/digits.py",
                      f"--workdir={workdir}", *overrides], capture_output=True, text=True, cwd=REPO, env=env,
                     timeout=300)
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
  assert r.stderr.startswith("error: ") and message in r.stderr, r.stderr
  assert not workdir.exists()


def test_a_workdir_of_another_run_is_refused_and_left_as_it_was(tmp_path, tiny_digits):
  """Resuming needs the same network, data, objective, preconditioning and optimizer (checkpoints.
  RUN_IDENTITY); the schedule and compute options may change. A refused run writes nothing."""
  workdir = str(tmp_path / "run")
  train_and_evaluate(tiny_digits(3), workdir)
  saved = open(os.path.join(workdir, "config.json")).read()
  deeper = tiny_digits(6)
  deeper.model.depth = 2
  with pytest.raises(ValueError, match=r"holds checkpoints of another run: config.model.depth is 1 there, "
                                       r"2 here\. Use a new --workdir, or resume with that run's config"):
    train_and_evaluate(deeper, workdir)
  other_data = tiny_digits(6)
  other_data.data.x_flip = True
  with pytest.raises(ValueError, match="config.data.x_flip is False there, True here"):
    train_and_evaluate(other_data, workdir)
  assert open(os.path.join(workdir, "config.json")).read() == saved
  assert sorted(os.listdir(checkpoints.checkpoint_dir(workdir))) == ["3"]
  # From the command line: one line, nothing written.
  r = _run(["-m", "imm_jax.train", "--config", "configs/digits.py", f"--workdir={workdir}"], timeout=300)
  assert r.returncode != 0 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
  assert r.stderr.startswith(f"error: --workdir {workdir} holds checkpoints of another run: config.data.image_size")
  assert open(os.path.join(workdir, "config.json")).read() == saved
  # Schedule changes resume, and 0 turns periodic grids and logs off (only the final ones).
  c = tiny_digits(6)
  c.update(sample_every=0, log_every=0)
  c.optim.lr = 3e-4
  train_and_evaluate(c, workdir)
  pngs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(workdir, "samples", "*_1step.png")))
  assert pngs == ["step0000003_1step.png", "step0000006_1step.png"]
  assert [r["step"] for r in read_metrics(workdir) if "train/loss" in r] == [1, 2, 3, 6]
  assert json.load(open(os.path.join(workdir, "config.json")))["optim"]["lr"] == 3e-4


def _run(args, **kw):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, **kw)


def test_sample_executable_reproduces_from_noise_file(tmp_path, tiny_digits):
  workdir = str(tmp_path / "run")
  train_and_evaluate(tiny_digits(3), workdir)
  noise = 0.5 * np.random.default_rng(0).standard_normal((5, 8, 8, 1)).astype(np.float32)
  np.save(tmp_path / "z.npy", noise)
  outs = []
  for name in ("a", "b"):
    out = str(tmp_path / f"{name}.npz")
    r = _run(["-m", "imm_jax.sample", f"--workdir={workdir}", "--steps=2", f"--noise={tmp_path / 'z.npy'}",
              f"--out={out}"])
    assert r.returncode == 0, r.stderr
    outs.append(np.load(out))
    assert os.path.exists(out[:-4] + ".png")
  a, b = outs
  assert a["samples"].shape == (5, 8, 8, 1) and a["samples"].dtype == np.float32
  assert a["images"].dtype == np.uint8 and a["images"].shape == (5, 8, 8, 1)
  np.testing.assert_array_equal(a["samples"], b["samples"])
  np.testing.assert_allclose(a["times"], [0.994, 1.4 / 2.4, 0.006])  # eta(t_1) = 1.4

  # The same run in-process through the library gives the same samples.
  from imm_jax import sampling
  config = checkpoints.read_config(workdir)
  model = build_model(config)
  params, _ = checkpoints.restore_ema_params(workdir, model.abstract_params())
  times = sampling.make_schedule("default", 2, model.precond.interpolant, 0.006, 0.994)
  direct = sampling.generate(model.net, params, model.precond, noise, times)
  np.testing.assert_allclose(np.asarray(direct), a["samples"], atol=1e-6)

  # Bad input: one line naming the option, nothing overwritten.
  r = _run(["-m", "imm_jax.sample", f"--workdir={workdir}", f"--out={tmp_path / 'a.npz'}"])
  assert r.returncode == 2 and "--overwrite" in r.stderr
  np.save(tmp_path / "bad.npy", noise[:, :4])
  r = _run(["-m", "imm_jax.sample", f"--workdir={workdir}", f"--noise={tmp_path / 'bad.npy'}",
            f"--out={tmp_path / 'c.npz'}"])
  assert r.returncode == 2 and "--noise" in r.stderr
  assert not os.path.exists(tmp_path / "c.npz")


def test_toy2d_trains(tmp_path):
  c = load_config("toy2d", "8gaussians")
  c.num_steps = 4
  c.batch_size = 64
  c.log_every = 2
  c.sample_every = 4
  c.checkpoint.every = 4
  c.model.update(hidden=32, depth=1)
  c.sample.num = 64
  c.eval.update(num=64, at_start=False)
  figures = train_and_evaluate(c, str(tmp_path / "toy"))
  assert np.isfinite(figures["energy_1step"])
  assert os.path.exists(tmp_path / "toy" / "samples" / "step0000004_4step.png")
