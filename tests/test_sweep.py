"""The ablation sweep (imm_jax.experiments.sweep): config overrides and grids, run naming, the report
table and the command line's checks. Training itself is exercised by the trainer tests; here only the
one slow test trains (two steps), for the figures drawn with --eval_num."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from imm_jax.configs_loader import load_config
from imm_jax.experiments import sweep


def test_overrides_parse_literals_and_strings():
  out = sweep.parse_overrides(["optim.lr=3e-3", "imm.kernel=rbf", "imm.k = 18"])
  assert out == {"optim.lr": 0.003, "imm.kernel": "rbf", "imm.k": 18}
  with pytest.raises(ValueError, match="KEY=VALUE"):
    sweep.parse_overrides(["optim.lr"])


def test_grid_parses_values_and_rejects_repeats_and_empties():
  assert sweep.parse_grid(["imm.mapping=eta,t", "imm.k=10, 12"]) == [(("imm.mapping",), [("eta",), ("t",)]),
                                                                     (("imm.k",), [(10,), (12,)])]
  assert sweep.parse_grid(["imm.mapping,imm.k=eta:12,t:6"]) == [(("imm.mapping", "imm.k"), [("eta", 12), ("t", 6)])]
  for bad in (["imm.k"], ["imm.k="], ["=1,2"], ["imm.mapping,imm.k=eta:12,t"], ["imm.mapping,=eta:1"]):
    with pytest.raises(ValueError, match="KEY=v1,v2"):
      sweep.parse_grid(bad)
  with pytest.raises(ValueError, match="given twice"):
    sweep.parse_grid(["imm.k=10", "imm.mapping,imm.k=t:12"])


def test_apply_overrides_sets_keys_and_rejects_typos():
  c = sweep.apply_overrides(load_config("toy2d", "moons"), {"optim.lr": 0.003, "imm.k": 18})
  assert (c.optim.lr, c.imm.k) == (0.003, 18)
  with pytest.raises(KeyError, match="no such config key"):
    sweep.apply_overrides(load_config("toy2d"), {"imm.kk": 3})


def test_runs_are_every_combination_once():
  combos = sweep._combinations(sweep.parse_grid(["imm.mapping=eta,t", "imm.k=10,12,14"]))
  assert len(combos) == 6 and len({tuple(c.items()) for c in combos}) == 6
  assert combos[0] == {"imm.mapping": "eta", "imm.k": 10} and combos[-1] == {"imm.mapping": "t", "imm.k": 14}
  zipped = sweep.parse_grid(["imm.mapping,imm.k=eta:12,t:6", "imm.kernel=laplace,rbf"])
  assert sweep._combinations(zipped) == [
      {"imm.mapping": "eta", "imm.k": 12, "imm.kernel": "laplace"}, {"imm.mapping": "eta", "imm.k": 12, "imm.kernel": "rbf"},
      {"imm.mapping": "t", "imm.k": 6, "imm.kernel": "laplace"}, {"imm.mapping": "t", "imm.k": 6, "imm.kernel": "rbf"}]
  assert sweep.grid_keys([keys for keys, _ in zipped]) == ["imm.mapping", "imm.k", "imm.kernel"]


def test_run_names_encode_every_setting():
  # group_size's runs keep their short names (docs/group_size.md's workdirs and JSON keys)
  key = sweep.run_key({"imm.k": 16, "imm.group_size": 4}, 1)
  assert key == "k16_M4_s1"
  assert sweep.run_dir_name("toy2d", "moons", 1500, {}, key) == "toy2d_moons_1500steps_k16_M4_s1"
  assert (sweep.run_dir_name("digits", "", 800, {"optim.lr": 0.003, "imm.kernel": "rbf"}, key)
          == "digits_800steps_imm.kernel=rbf_optim.lr=0.003_k16_M4_s1")
  key = sweep.run_key({"imm.mapping": "inv_eta", "optim.lr": 0.001}, 0)
  assert key == "mapping=inv_eta_lr=0.001_s0"
  assert sweep.run_dir_name("toy2d", "", 10, {}, key) == "toy2d_10steps_mapping=inv_eta_lr=0.001_s0"


def test_table_has_a_row_per_run_and_marks_divergence():
  runs = {}
  for mapping, e in [("eta", 0.004), ("t", 0.008), ("logsnr", math.nan)]:
    settings = {"imm.mapping": mapping, "imm.k": 10}
    runs[sweep.run_key(settings, 0)] = dict(settings=settings, seed=0, groups=256, diverged=math.isnan(e),
                                            energy_1step=e, energy_2step=e, energy_4step=e)
  res = {"name": "toy", "num_steps": 10, "overrides": {"imm.eps": 0.001}, "runs": runs,
         "grid_axes": [["imm.mapping", "imm.k"]],
         "true_vs_true_energy": 0.0001, "true_vs_true_energy_draws": [0.0, 0.0002]}
  lines = sweep.markdown_table(res).splitlines()
  assert "`imm.eps=0.001`" in lines[0] and "0.00010 mean of 2, range 0.00000 to 0.00020" in lines[0]
  assert lines[2] == "| mapping | k | seed | groups per batch | 1 step | 2 steps | 4 steps |"
  assert "| t | 10 | 0 | 256 | 0.00800 | 0.00800 | 0.00800 |" in lines
  assert "| logsnr | 10 | 0 | 256 | diverged | diverged | diverged |" in lines


def test_table_has_a_column_per_evaluated_step_count_and_names_the_sample_count():
  settings = {"imm.weight_a": 2.0}
  runs = {"weight_a=2.0_s0": dict(settings=settings, seed=0, groups=32, energy_1step=0.12, energy_8step=0.031)}
  res = {"name": "digits_weight_a", "num_steps": 1500, "runs": runs, "grid_axes": [["imm.weight_a"]],
         "eval_steps": [1, 8], "eval_num": 2000, "true_vs_true_energy": 0.002}
  lines = sweep.markdown_table(res).splitlines()
  assert "energy distance of 2000 samples per step count to held-out true samples" in lines[0]
  assert lines[2:] == ["| weight_a | seed | groups per batch | 1 step | 8 steps |", "|---|---|---|---|---|",
                       "| 2.0 | 0 | 32 | 0.12000 | 0.03100 |"]


@pytest.mark.slow
def test_eval_num_reports_the_distance_of_that_many_fresh_samples(tmp_path):
  # The figures with --eval_num are those of imm_jax.evaluate's N samples (sampling seed 0) against N
  # held-out points, not the trainer's config.eval.num: recomputed here from the run's checkpoint
  # through the Generator, the held-out set and the energy distance directly.
  import numpy as np

  from imm_jax.data import pipeline
  from imm_jax.evaluation import distances
  from imm_jax.generation import Generator

  grid = sweep.parse_grid(["imm.mapping=eta"])
  res = sweep.run_sweep("toy2d", "moons", grid, 2, workdir=str(tmp_path), eval_num=96, eval_steps=(1, 8))
  run = res["runs"]["mapping=eta_s0"]
  assert (res["eval_num"], res["eval_steps"]) == (96, [1, 8])
  assert sorted(k for k in run if k.startswith("energy")) == ["energy_1step", "energy_8step"]
  assert (tmp_path / run["workdir"] / run["grid_8step"]).is_file()  # the picture of those samples
  gen = Generator(str(tmp_path / run["workdir"]))
  held_out, _ = pipeline.load_eval_set(gen.config.data, 96, seed=int(gen.config.seed))
  assert held_out.shape == (96, 2)
  for n in (1, 8):
    x = gen.sample(gen.setting(n), gen.noise(0, 0, 96), None)
    assert run[f"energy_{n}step"] == pytest.approx(distances.energy_distance(x, held_out), rel=1e-6)
  # the floor compares the same sizes: 96 training points against the 96 held-out ones
  assert len(res["true_vs_true_energy_draws"]) == sweep.FLOOR_DRAWS
  assert np.all(np.abs(res["true_vs_true_energy_draws"]) < 0.2)


def test_floor_draws_distinct_training_examples_at_most_the_whole_training_set():
  # Against the held-out set: FLOOR_DRAWS different subsets of `num` training points, or, when `num`
  # is more than there are, the whole training set once (a set with repeats would score worse than
  # samples from a perfect model, which never repeat).
  import numpy as np

  from imm_jax.data import sources
  from imm_jax.evaluation import distances

  data_cfg = load_config("toy2d", "moons").data
  data_cfg.update(toy_size=60, holdout=40)
  resolved = sources.resolve(data_cfg, need_train=True, need_eval=True)
  train = resolved.train.gather(np.arange(60))["x"]
  held_out = resolved.holdout.gather(np.arange(40))["x"]
  draws, size = sweep.floor_draws(data_cfg, held_out, 30, seed=1)
  assert size == 30 and len(draws) == sweep.FLOOR_DRAWS and len(set(draws)) == sweep.FLOOR_DRAWS
  for num in (96, 60):  # more than, and exactly, the training set
    draws, size = sweep.floor_draws(data_cfg, held_out, num, seed=1)
    assert size == 60 and draws == [pytest.approx(distances.energy_distance(train, held_out))]


def _run_cli(tmp_path, *args):
  return subprocess.run([sys.executable, "-m", "imm_jax.experiments.sweep", *args,
                         f"--workdir={tmp_path / 'w'}", f"--out={tmp_path / 'o'}"],
                        capture_output=True, text=True, timeout=120)


def test_a_bad_grid_value_stops_in_one_line_before_training(tmp_path):
  # Each run's config goes through the objective's checks before the first run trains: the logsnr
  # mapping at the toy's eps = 0 is refused, naming the option and the fix.
  r = _run_cli(tmp_path, "--grid", "imm.mapping=eta,logsnr")
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      "error: --set/--grid: config.imm.mapping='logsnr' needs config.imm.eps > 0: its step is a fraction of "
      "the range over [eps, T], infinite at eps = 0 (the paper used eps=0.001)"]
  assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()
  r = _run_cli(tmp_path)
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --grid: give at least one")
  r = _run_cli(tmp_path, "--grid", "imm.k=10", "--eval_steps", "1,eight")
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == ["error: --eval_steps: '1,eight' is not a list of step counts, e.g. 1,2,4,8"]
  r = _run_cli(tmp_path, "--grid", "imm.k=10", "--eval_steps", "0,2")
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --eval_steps/--eval_num: give")
  assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def test_plot_has_a_column_per_value_of_the_last_grid_and_a_row_per_seed(tmp_path):
  import numpy as np
  from PIL import Image

  from imm_jax import images as images_lib

  grid = sweep.parse_grid(["imm.mapping,imm.k=eta:12,t:6,logsnr:6"])
  runs = {}
  for settings in sweep._combinations(grid):
    for seed in (0, 1):
      key = sweep.run_key(settings, seed)
      shade = 40 * seed + 10 * settings["imm.k"]
      images_lib.save_png(tmp_path / key / "samples" / "000100_1step.png", np.full((20, 30, 3), shade, np.uint8))
      runs[key] = dict(settings=settings, seed=seed, workdir=key, energy_1step=0.001)
  res = {"grid_axes": [list(k) for k, _ in grid], "runs": runs}
  sweep.plot(res, str(tmp_path), str(tmp_path / "out.png"))
  got = np.asarray(Image.open(tmp_path / "out.png").convert("RGB"))
  strip = images_lib.side_by_side([np.zeros((20, 30, 3), np.uint8)] * 3, ["mapping=eta k=12, seed 0: 0.00100"] * 3)
  assert got.shape == (2 * (strip.shape[0] + 8), strip.shape[1], 3)


def test_plot_shows_the_samples_the_figure_was_computed_from(tmp_path):
  # With --eval_num a run's 1-step figure comes from imm_jax.evaluate's samples: the plot shows their
  # picture (grid_1step), not the trainer's sample grid of other noise.
  import numpy as np
  from PIL import Image

  from imm_jax import images as images_lib

  images_lib.save_png(tmp_path / "r" / "samples" / "000100_1step.png", np.zeros((20, 30, 3), np.uint8))
  images_lib.save_png(tmp_path / "r" / "eval" / "ckpt100_1step.png", np.full((24, 36, 3), 200, np.uint8))
  run = dict(settings={"imm.k": 12}, seed=0, workdir="r", energy_1step=0.001)
  for grid_1step, shape, value in ((None, (20, 30), 0), ("eval/ckpt100_1step.png", (24, 36), 200)):
    res = {"grid_axes": [["imm.k"]], "runs": {"k12_s0": dict(run, grid_1step=grid_1step)}}
    sweep.plot(res, str(tmp_path), str(tmp_path / "out.png"))
    got = np.asarray(Image.open(tmp_path / "out.png").convert("RGB"))
    strip = images_lib.side_by_side([np.full(shape + (3,), value, np.uint8)], ["k=12, seed 0: 0.00100"])
    np.testing.assert_array_equal(got[:strip.shape[0]], strip)
