"""Sharded sampling (imm_jax.generation, ``imm_jax.sample --out DIR``) and ``imm_jax.evaluate``.

The truths: pushforward samples are a function of the example index and seed alone (any batch, shard
or device layout gives the same numbers); a killed evaluation resumes without recomputing finished
shards and reports exactly the numbers of an uninterrupted run; the reported figures are the library's
FID / IS / energy distance of the same samples recomputed here; bad input is a one-line error.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from imm_jax import evaluate as evaluate_lib
from imm_jax import generation
from imm_jax.evaluation import distances, fid, inception
from imm_jax.sample import sample_to_file, sample_to_shards
from imm_jax.trainer import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  from conftest import make_tiny_digits
  path = str(tmp_path_factory.mktemp("evaluate") / "run")
  train_and_evaluate(make_tiny_digits(3), path)
  return path


@pytest.fixture(scope="module")
def small_extractor():
  # Random weights at a small input size: the pipeline is the same as FID's, just fast.
  return fid.InceptionExtractor(inception.init_variables(seed=0), batch_size=8, size=75)


def _mtimes(folder):
  return {p: os.stat(p).st_mtime_ns for p in generation.shard_paths(folder)}


def test_shards_equal_single_file_and_resume_skips_finished(workdir, tmp_path):
  single = sample_to_file(workdir, str(tmp_path / "a.npz"), steps=2, num=10, batch_size=7, progress=False)
  out = str(tmp_path / "shards")
  paths = sample_to_shards(workdir, out, steps=2, num=10, shard_size=4, batch_size=3, progress=False)
  assert [os.path.basename(p) for p in paths] == ["shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]
  arrays = generation.read_shards(paths, ("samples", "images", "index"))
  np.testing.assert_array_equal(arrays["index"], np.arange(10))
  np.testing.assert_allclose(arrays["samples"], single["samples"], atol=1e-6)
  np.testing.assert_array_equal(arrays["images"], single["images"])
  assert sorted(os.listdir(os.path.join(out, "images"))) == [f"{i:08d}.png" for i in range(10)]
  assert os.path.exists(os.path.join(out, "grid.png"))

  # A lost shard is redone; the others are not touched.
  before = _mtimes(out)
  os.remove(paths[1])
  sample_to_shards(workdir, out, steps=2, num=10, shard_size=4, batch_size=3, progress=False)
  after = _mtimes(out)
  assert after[paths[0]] == before[paths[0]] and after[paths[2]] == before[paths[2]]
  np.testing.assert_array_equal(generation.read_shards([paths[1]], ("samples",))["samples"],
                                arrays["samples"][4:8])
  # The same folder with other settings is refused instead of mixed.
  with pytest.raises(ValueError, match="other settings.*steps"):
    sample_to_shards(workdir, out, steps=1, num=10, shard_size=4, batch_size=3, progress=False)


def _run_two_hosts(command):
  """``command`` as processes 0 and 1 of a two-process jax.distributed job on localhost."""
  from test_scale import _env, _free_port
  port = _free_port()
  procs = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(1, IMM_COORDINATOR=f"127.0.0.1:{port}", IMM_NUM_PROCESSES="2",
                                     IMM_PROCESS_ID=str(i)))
           for i in range(2)]
  for proc in procs:
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]


@pytest.mark.slow
def test_two_hosts_share_the_shards(workdir, tmp_path):
  """Two processes (jax.distributed on localhost) take shards in turn and wait for each other; together
  they write exactly the single-process samples."""
  out = str(tmp_path / "two_hosts")
  command = [sys.executable, "-m", "imm_jax.sample", f"--workdir={workdir}", "--steps=2", "--num=10",
             "--shard-size=3", "--batch-size=2", "--nopng", f"--out={out}"]
  _run_two_hosts(command)
  paths = generation.shard_paths(out)
  assert len(paths) == 4
  single = sample_to_file(workdir, str(tmp_path / "one.npz"), steps=2, num=10, progress=False)
  np.testing.assert_allclose(generation.read_shards(paths, ("samples",))["samples"], single["samples"], atol=1e-6)


def test_evaluate_reports_library_figures(workdir, tmp_path, small_extractor):
  ref = str(tmp_path / "ref.npz")
  info = evaluate_lib.compute_reference(workdir, ref, num=64, extractor=small_extractor, progress=False)
  assert info["count"] == 64  # the first 64 training digits
  results = evaluate_lib.evaluate(workdir, [1, 2], num=24, ref=ref, metrics=["fid", "distance"],
                                  extractor=small_extractor, shard_size=10, batch_size=4, distance_num=20,
                                  progress=False)
  assert [r["setting"]["steps"] for r in results] == [1, 2]
  r = results[1]
  eval_dir = os.path.join(workdir, "eval")
  with open(os.path.join(eval_dir, r["tag"] + ".json")) as f:
    assert json.load(f)["metrics"] == r["metrics"]
  assert os.path.exists(os.path.join(eval_dir, r["tag"] + ".png"))

  # Recompute every figure from scratch: same seed -> same samples -> same numbers.
  single = sample_to_file(workdir, str(tmp_path / "s.npz"), steps=2, num=24, progress=False)
  feats, logits = small_extractor(single["images"])
  mu, sigma = fid.load_statistics(ref)
  np.testing.assert_allclose(r["metrics"]["fid"], fid.fid_from_statistics(*fid.compute_statistics(feats), mu, sigma),
                             rtol=1e-6)
  np.testing.assert_allclose(r["metrics"]["is_mean"], fid.inception_score(logits)[0], rtol=1e-6)
  from imm_jax.data import pipeline
  from imm_jax.checkpoints import read_config
  eval_x, _ = pipeline.load_eval_set(read_config(workdir).data, 20, seed=0)
  np.testing.assert_allclose(r["metrics"]["energy_distance"],
                             distances.energy_distance(single["samples"][:20], eval_x), rtol=1e-6)

  # The reference against itself: FID 0 (the statistics of the training digits vs themselves).
  assert abs(fid.fid_from_statistics(mu, sigma, mu, sigma)) < 1e-6


def test_evaluate_errors_are_one_line(workdir, tmp_path, capsys):
  """The command line once in a subprocess (the entry point's exit status and stderr), then its main()
  in this process: each bad input is exit status 2 and one ``error:`` line naming the option."""
  r = subprocess.run([sys.executable, "-m", "imm_jax.evaluate", "--workdir", workdir, "--ref",
                      str(tmp_path / "missing.npz"), "--num", "4"], capture_output=True, text=True, cwd=REPO)
  lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert r.returncode == 2 and len(lines) == 1 and "imm_jax.evaluate ref" in lines[0] and "fid-refs" in lines[0]

  def run(*args, argparse_error=False):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
      evaluate_lib.main(list(args))
    err = capsys.readouterr().err
    return exit_info.value.code, [err] if argparse_error else [l for l in err.splitlines() if l.startswith("error:")]

  mu = np.zeros(2048)
  fid.save_statistics(str(tmp_path / "ref.npz"), mu, np.eye(2048))
  code, lines = run("--workdir", workdir, "--ref", str(tmp_path / "ref.npz"), "--num", "4",
                    "--inception", str(tmp_path / "no_weights.pth"))
  assert code == 2 and len(lines) == 1 and inception.FID_WEIGHTS_FILE in lines[0] and "--download" in lines[0]
  code, lines = run("--workdir", workdir, "--metrics", "fid", "--num", "4")
  assert code == 2 and len(lines) == 1 and "--ref" in lines[0]
  code, lines = run("--workdir", str(tmp_path), "--num", "4")
  assert code == 2 and len(lines) == 1 and "--workdir" in lines[0]
  code, lines = run("ref", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "r.npz"))
  assert code == 2 and len(lines) == 1 and "--data" in lines[0]
  code, lines = run("--workdir", workdir, "--watch", "--checkpoint-step", "3", "--num", "4")
  assert code == 2 and len(lines) == 1 and "--checkpoint-step 3" in lines[0]
  code, lines = run("--workdir", str(tmp_path), "--checkpoint-step", "all", "--num", "4")
  assert code == 2 and len(lines) == 1 and "no checkpoint" in lines[0] and "imm_jax.train" in lines[0]
  code, (err,) = run("--workdir", workdir, "--checkpoint-step", "last", argparse_error=True)
  assert code == 2 and "--checkpoint-step: expected a step number or 'all'" in err
  assert not os.path.exists(os.path.join(workdir, "eval", "ckpt3_1step_default_pushforward_cfg1_seed0_n4"))


@pytest.mark.slow
def test_killed_evaluation_resumes_with_identical_numbers(workdir, tmp_path):
  """SIGKILL halfway through, start again: finished shards are kept as they are, and the report equals
  an uninterrupted run's; the batches are split over 2 simulated devices."""
  weights = inception.save_npz(inception.state_dict_from_variables(inception.init_variables(seed=0)),
                               str(tmp_path / "inception.npz"))
  ref = str(tmp_path / "ref.npz")
  rng = np.random.default_rng(0)
  fid.save_statistics(ref, rng.standard_normal(2048) * 0.01, np.eye(2048) * 1e-3)
  # The Inception network runs long enough here that XLA's backend optimisation (off in the suite,
  # conftest.py) pays for itself.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             JAX_DISABLE_MOST_OPTIMIZATIONS="0")

  def command(out_dir):
    return [sys.executable, "-m", "imm_jax.evaluate", "--workdir", workdir, "--steps", "2", "--num", "30",
            "--shard-size", "6", "--batch-size", "3", "--metrics", "fid", "distance", "--distance-num", "20",
            "--ref", ref, "--inception", weights, "--out-dir", out_dir]

  out = str(tmp_path / "eval")
  first_setting = os.path.join(out, "ckpt3_2step_default_pushforward_cfg1_seed0_n30")
  proc = subprocess.Popen(command(out), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 600
  while len(generation.shard_paths(first_setting)) < 2:
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    assert time.time() < deadline
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = _mtimes(first_setting)
  assert 2 <= len(done) < 5, "killed too late to test resumption"
  assert not any(name.endswith(".json") for name in os.listdir(out))

  r = subprocess.run(command(out), cwd=REPO, env=env, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  assert all(os.stat(p).st_mtime_ns == t for p, t in done.items()), "a finished shard was recomputed"
  assert len(generation.shard_paths(first_setting)) == 5

  straight = str(tmp_path / "eval_straight")
  r = subprocess.run(command(straight), cwd=REPO, env=env, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  tag = "ckpt3_2step_default_pushforward_cfg1_seed0_n30.json"
  with open(os.path.join(out, tag)) as f, open(os.path.join(straight, tag)) as g:
    resumed, uninterrupted = json.load(f)["metrics"], json.load(g)["metrics"]
  assert resumed == uninterrupted
  assert set(resumed) == {"fid", "is_mean", "is_std", "energy_distance", "mmd_rbf"}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
  """A 4-step run with checkpoints at steps 2 and 4."""
  from conftest import make_tiny_digits
  path = str(tmp_path_factory.mktemp("evaluate") / "run2")
  c = make_tiny_digits(4)
  c.checkpoint.every = 2
  train_and_evaluate(c, path)
  return path


def _over_training(workdir, out_dir, **kwargs):
  return evaluate_lib.evaluate_checkpoints(workdir, [1, 2], num=12, metrics=["distance"], distance_num=12,
                                           shard_size=6, batch_size=4, out_dir=out_dir, progress=False, **kwargs)


def test_evaluate_every_checkpoint_logs_figures_against_the_training_step(two_checkpoints, tmp_path):
  from tensorboard.backend.event_processing import event_accumulator
  from imm_jax.writers import read_metrics

  out = str(tmp_path / "eval")
  results = _over_training(two_checkpoints, out)
  assert [(r["checkpoint_step"], r["setting"]["steps"]) for r in results] == [(2, 1), (2, 2), (4, 1), (4, 2)]
  # Each checkpoint's figures are those of evaluating that checkpoint alone.
  alone = evaluate_lib.evaluate(two_checkpoints, [1, 2], num=12, metrics=["distance"], distance_num=12,
                                shard_size=6, batch_size=4, checkpoint_step=2, out_dir=str(tmp_path / "alone"),
                                progress=False)
  assert [r["metrics"] for r in alone] == [r["metrics"] for r in results[:2]]
  assert results[0]["metrics"] != results[2]["metrics"]  # two training steps apart: other weights

  label = "1step_default_pushforward_cfg1_seed0_n12"
  rows = read_metrics(out)
  assert [(row["step"], row[f"energy_distance/{label}"]) for row in rows if f"energy_distance/{label}" in row] == \
      [(2, results[0]["metrics"]["energy_distance"]), (4, results[2]["metrics"]["energy_distance"])]
  acc = event_accumulator.EventAccumulator(out, size_guidance={event_accumulator.SCALARS: 0,
                                                               event_accumulator.IMAGES: 0})
  acc.Reload()
  events = acc.Scalars(f"mmd_rbf/{label}")
  assert [(e.step, e.value) for e in events] == [
      (2, pytest.approx(results[0]["metrics"]["mmd_rbf"])), (4, pytest.approx(results[2]["metrics"]["mmd_rbf"]))]
  assert [e.step for e in acc.Images(f"samples/{label}")] == [2, 4]
  curves = os.path.join(out, evaluate_lib.CURVES_FILE)
  from PIL import Image
  with Image.open(curves) as picture:
    assert picture.mode == "RGB" and picture.size[0] >= 400

  # Again: the reports are read back from the shards, the same figures, and nothing is logged twice.
  again = _over_training(two_checkpoints, out)
  assert [r["metrics"] for r in again] == [r["metrics"] for r in results]
  assert read_metrics(out) == rows
  # One checkpoint is not a curve.
  assert evaluate_lib.write_curves(str(tmp_path / "alone")) is None
  assert not os.path.exists(os.path.join(str(tmp_path / "alone"), evaluate_lib.CURVES_FILE))


def test_best_checkpoint_per_setting():
  def report(step, steps, **metrics):
    return dict(tag=f"ckpt{step}_{steps}step_default_pushforward_cfg1_seed0_n100", checkpoint_step=step,
                metrics=metrics)

  results = [report(10, 1, fid=9.0, energy_distance=0.5), report(20, 1, fid=4.0, energy_distance=0.7),
             report(30, 1, fid=5.0, energy_distance=0.1),  # FID decides where there is one
             report(10, 2, energy_distance=0.3), report(20, 2, energy_distance=0.2),
             report(30, 2, energy_distance=0.4),
             report(30, 4, fid=2.0)]  # one checkpoint: nothing to choose
  assert evaluate_lib.best_checkpoints(results) == [
      "1step_default_pushforward_cfg1_seed0_n100: fid 4 at checkpoint 20 (of 3)",
      "2step_default_pushforward_cfg1_seed0_n100: energy_distance 0.2 at checkpoint 20 (of 3)"]


@pytest.mark.slow
def test_two_hosts_evaluate_every_checkpoint(two_checkpoints, tmp_path):
  """Two processes agree on the checkpoint list (process 0's), share each setting's shards, and report
  the single-process figures."""
  out = str(tmp_path / "eval")
  command = [sys.executable, "-m", "imm_jax.evaluate", f"--workdir={two_checkpoints}", "--checkpoint-step=all",
             "--steps", "2", "--num=12", "--distance-num=12", "--shard-size=5", "--batch-size=2", f"--out-dir={out}"]
  _run_two_hosts(command)
  single = _over_training(two_checkpoints, str(tmp_path / "single"))
  for r in single:
    if r["setting"]["steps"] == 2:
      with open(os.path.join(out, r["tag"] + ".json")) as f:
        assert json.load(f)["metrics"] == r["metrics"]


def test_watch_follows_training_until_its_last_step(two_checkpoints, tmp_path, monkeypatch):
  """Checkpoint 4 appears only while the watcher waits; it evaluates 2, waits once, evaluates 4 and
  stops (4 is the run's num_steps). A checkpoint deleted before its turn is skipped."""
  import shutil
  from imm_jax import checkpoints

  workdir = str(tmp_path / "run")
  shutil.copytree(two_checkpoints, workdir, ignore=shutil.ignore_patterns("eval"))
  held = str(tmp_path / "held_4")
  shutil.move(os.path.join(workdir, "checkpoints", "4"), held)
  os.makedirs(os.path.join(workdir, "checkpoints", "6.orbax-checkpoint-tmp-1"))  # a save in progress
  assert checkpoints.saved_steps(workdir) == [2]
  waits = []

  def wait(seconds):
    waits.append(seconds)
    shutil.move(held, os.path.join(workdir, "checkpoints", "4"))  # training writes step 4

  monkeypatch.setattr(evaluate_lib, "_wait", wait)
  results = _over_training(workdir, str(tmp_path / "eval"), watch=True, poll_seconds=7)
  assert waits == [7]
  assert sorted({r["checkpoint_step"] for r in results}) == [2, 4]

  # Without --watch, step 6 listed but gone by its turn (the trainer's retention): a note, no error.
  real = checkpoints.saved_steps
  calls = []

  def listed(path):
    calls.append(path)
    return real(path) + ([6] if len(calls) == 1 else [])

  monkeypatch.setattr(checkpoints, "saved_steps", listed)
  results = _over_training(workdir, str(tmp_path / "eval"))
  assert sorted({r["checkpoint_step"] for r in results}) == [2, 4]
  # A workdir without checkpoints: an error at once without --watch.
  monkeypatch.setattr(checkpoints, "saved_steps", real)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    _over_training(str(tmp_path / "empty"), str(tmp_path / "eval2"))


def test_reference_data_forms(workdir, tmp_path):
  """``evaluate ref --data``: a workdir, a config name or file, an image folder or array (any size)."""
  from imm_jax import images as images_lib
  x = np.random.default_rng(0).integers(0, 256, (5, 12, 10, 3), dtype=np.uint8)
  for i, image in enumerate(x):
    images_lib.save_png(str(tmp_path / "folder" / f"{i}.png"), image)
  np.save(tmp_path / "arr.npy", x)

  def first(data, **kw):
    return next(evaluate_lib.reference_images(evaluate_lib._data_config(data, kw.pop("image_size", None)), **kw))

  assert first(workdir).shape == (500, 8, 8, 1)  # the run's own data: its 8x8 digits
  assert first("digits", split="eval").shape == (297, 16, 16, 1)
  assert first(os.path.join(REPO, "configs", "digits.py"), num=7).shape == (7, 16, 16, 1)
  folder = first(str(tmp_path / "folder"), image_size=12)
  assert folder.shape == (5, 12, 12, 3) and folder.dtype == np.uint8
  np.testing.assert_array_equal(first(str(tmp_path / "arr.npy"), image_size=12), folder)
  with pytest.raises(ValueError, match="--image-size"):
    first(str(tmp_path / "arr.npy"))
  with pytest.raises(ValueError, match="2-D points"):
    first("toy2d")
