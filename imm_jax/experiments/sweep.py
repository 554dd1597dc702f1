"""Small-scale ablations: train IMM on the built-in data for every combination of config values, then
compare the runs' few-step samples with the energy distance to held-out data.

  python -m imm_jax.experiments.sweep --config toy2d --variant checkerboard --num_steps 1000 \
      --grid imm.mapping,imm.k=eta:12,t:6,logsnr:6,inv_eta:12 --set imm.eps=0.001 --seeds 0,1 --tag mapping
  python -m imm_jax.experiments.sweep --config toy2d --variant checkerboard --num_steps 1000 \
      --grid imm.weighting=none,elbo,elbo_alpha,full --seeds 0,1 --tag weighting
  python -m imm_jax.experiments.sweep --config digits --num_steps 800 --grid imm.kernel=laplace,rbf \
      --grid optim.lr=1e-3,3e-3 --eval_num 2000 --eval_steps 1,2,4,8

Every run has the same batch and number of steps. ``--grid KEY=v1,v2,...`` (repeatable) names the
values of one config key, ``--grid KEY1,KEY2=a1:b1,a2:b2`` values of keys that change together (each
mapping at its own k); the runs are all combinations of the grids, once per seed. ``--set
KEY=VALUE`` changes a config value for every run. A value is a Python literal or a string. Reported,
next to each run: the energy distance of its EMA model's samples (1, 2 and 4 steps, or
``--eval_steps``) to held-out true samples, and the floor (as many distinct training examples as
there are samples, at most the whole training set, against the same held-out ones). A run whose
training metrics become non-finite is reported as diverged (NaN) rather than stopping the sweep.

By default the figures are the trainer's own final evaluation: ``config.eval.samples`` samples against
``config.eval.num`` held-out examples (the toys: 4096 against 4096 fresh points; digits: 2000 against its
297 held-out images; from 297 samples one model's digits figure moved by ~0.014, standard deviation,
from one draw to the next, as much as many differences an ablation looks for: docs/ablations.md).
``--eval_num N`` samples N examples per step count instead, through ``imm_jax.evaluate`` (its shards
and reports land in the run's ``eval/`` folder; a setting sampled before is read back, not sampled
again), against the same held-out set; ``--eval_steps`` picks the step counts (e.g. 1,2,4,8 for Table
7's 8-step column).

Each run trains in `<workdir>/<config>_<variant>_<steps>steps[_<overrides>]_<grid values>_s<seed>`;
a finished run found there is only re-evaluated, so reports over overlapping sweeps cost no extra
training. Writes `<out>/sweep_<name>.json`, the final 1-step samples (a column per value of the last
grid, a row per combination of the other grids and seed: `<out>/sweep_<name>.png`) and prints a
Markdown table. ``imm_jax.experiments.group_size`` is this sweep over imm.k and
imm.group_size (docs/group_size.md); docs/ablations.md holds the mapping, weighting and kernel runs.
"""

from __future__ import annotations

import ast
import glob
import json
import math
import os
import re

import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from imm_jax.configs_loader import config_lookup, load_config
from imm_jax.io_utils import atomic_open, fail

FLAGS = flags.FLAGS
FLOOR_DRAWS = 5  # independent true-vs-true energy distances averaged for the floor
# Short names in run keys and tables (others use the key's last part: mapping=t).
SHORT = {"imm.k": "k", "imm.group_size": "M"}


def define_common_flags():
  """The flags every sweep program has; defined only when run as a program: importing this module as a
  library (tests, other tools) must not define flags that clash with other executables' (--workdir)."""
  flags.DEFINE_enum("config", "toy2d", ["toy2d", "digits"], "Which built-in data (configs/<config>.py).")
  flags.DEFINE_string("variant", "", "Config variant, e.g. the toy: checkerboard, 8gaussians, moons.")
  flags.DEFINE_integer("num_steps", 4000, "Training steps of every run.")
  flags.DEFINE_list("seeds", ["0"], "Seeds; every combination is trained once per seed.")
  flags.DEFINE_multi_string("set", [], "Config override KEY=VALUE for every run (repeatable), e.g. "
                            "--set optim.lr=3e-3 --set imm.kernel=rbf. VALUE is a Python literal or a string.")
  flags.DEFINE_string("tag", "", "Suffix of the result name (the JSON and PNG files), to keep reports apart.")
  flags.DEFINE_string("out", "docs/results", "Output folder for the JSON summary and the plot.")
  flags.DEFINE_integer("eval_num", 0, "Samples per step count for the reported energy distances, drawn by "
                       "imm_jax.evaluate; 0: the trainer's final evaluation (config.eval.samples samples).")
  flags.DEFINE_list("eval_steps", ["1", "2", "4"], "Sampling step counts reported for every run.")


def define_flags():
  define_common_flags()
  flags.DEFINE_multi_string("grid", [], "KEY=v1,v2,... : the values of one config key to compare "
                            "(repeatable; the runs are all combinations), e.g. --grid imm.mapping=eta,t.")
  flags.DEFINE_string("workdir", "workdirs/sweep", "Parent folder of the training workdirs.")


def _literal(value: str):
  try:
    return ast.literal_eval(value.strip())
  except (ValueError, SyntaxError):
    return value.strip()


def parse_overrides(items) -> dict:
  """['optim.lr=3e-3', 'imm.kernel=rbf'] -> {'optim.lr': 0.003, 'imm.kernel': 'rbf'}."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
      raise ValueError(f"config override {item!r} is not KEY=VALUE")
    out[key.strip()] = _literal(value)
  return out


def parse_grid(items) -> list:
  """One axis per item, as (keys, [values per run]): 'imm.k=10,12' -> (('imm.k',), [(10,), (12,)]);
  keys that change together are zipped: 'imm.mapping,imm.k=eta:12,t:6' -> (('imm.mapping', 'imm.k'),
  [('eta', 12), ('t', 6)]). The runs are all combinations of the axes."""
  grid, seen = [], set()
  for item in items:
    lhs, sep, rhs = item.partition("=")
    keys = tuple(k.strip() for k in lhs.split(","))
    values = [tuple(_literal(p) for p in v.split(":")) for v in rhs.split(",") if v.strip()]
    if not sep or not all(keys) or not values or any(len(v) != len(keys) for v in values):
      form = ":".join(f"v{i}" for i in range(1, len(keys) + 1)) if len(keys) > 1 else "v1"
      raise ValueError(f"grid {item!r} is not KEY=v1,v2,... (or KEY1,KEY2={form},...)")
    if seen & set(keys):
      raise ValueError(f"grid key {sorted(seen & set(keys))[0]!r} is given twice: list all its values in one --grid")
    seen |= set(keys)
    grid.append((keys, values))
  return grid


def apply_overrides(config, overrides: dict):
  """Set dotted keys of a ConfigDict; an unknown key is an error (a typo must not pass silently)."""
  for key, value in overrides.items():
    parent, name = config_lookup(config, key)
    parent[name] = value
  return config


def short_name(key: str) -> str:
  return SHORT.get(key, key.rsplit(".", 1)[-1])


def run_key(settings: dict, seed) -> str:
  """{'imm.k': 16, 'imm.group_size': 4}, 1 -> 'k16_M4_s1'; {'imm.mapping': 't'}, 0 -> 'mapping=t_s0'."""
  parts = [f"{short_name(k)}{v}" if k in SHORT else f"{short_name(k)}={v}" for k, v in settings.items()]
  return "_".join(parts + [f"s{seed}"])


def run_dir_name(config_name: str, variant: str, num_steps: int, overrides: dict, key: str) -> str:
  """A run's workdir name: everything that defines the run, so a finished run is reused (it only
  re-evaluates) by exactly the same settings and never by different ones (the trainer resumes)."""
  parts = [config_name] + ([variant] if variant else []) + [f"{num_steps}steps"]
  parts += [re.sub(r"[^A-Za-z0-9.=+-]", "-", f"{k}={v}") for k, v in sorted(overrides.items())]
  return "_".join(parts + [re.sub(r"[^A-Za-z0-9.=+_-]", "-", key)])


def _combinations(grid):
  combos = [{}]
  for keys, values in grid:
    combos = [{**c, **dict(zip(keys, v))} for c in combos for v in values]
  return combos


def grid_keys(axes) -> list:
  """Every key of the grid's axes (results['grid_axes'] or parse_grid's keys), in order."""
  return [k for keys in axes for k in keys]


def run_config(config_name: str, variant: str, overrides: dict, settings: dict):
  """One run's config: the config file, then --set, then the run's grid values."""
  return apply_overrides(apply_overrides(load_config(config_name, variant), overrides), settings)


def check(config_name: str, variant: str, grid, overrides: dict):
  """Every run's config, built before any run trains, so a bad key or value stops the sweep at once
  (the objective's own checks included: an unknown mapping, eps = 0 with the logsnr mapping)."""
  from imm_jax.objectives.imm import IMMConfig

  for settings in _combinations(grid):
    c = run_config(config_name, variant, overrides, settings)
    if c.objective == "imm":
      IMMConfig.from_config(c.imm)


def resampled_figures(run_dir: str, steps, num: int) -> dict:
  """``energy_<n>step`` of a trained run from ``num`` fresh samples per step count (``imm_jax.evaluate``,
  sampling seed 0, against the run's held-out set), and ``grid_<n>step``: the picture of those samples,
  relative to ``run_dir``."""
  from imm_jax.evaluate import evaluate

  out = {}
  for r in evaluate(run_dir, steps, num=num, metrics=("distance",), distance_num=num, progress=False):
    n = r["setting"]["steps"]
    out[f"energy_{n}step"] = float(r["metrics"]["energy_distance"])
    if r["grid"]:
      out[f"grid_{n}step"] = os.path.relpath(r["grid"], os.path.abspath(run_dir))
  return out


def run_sweep(config_name: str, variant: str, grid, num_steps: int, seeds=(0,),
              workdir: str = "workdirs/sweep", overrides=None, tag: str = "", eval_num: int = 0,
              eval_steps=(1, 2, 4)) -> dict:
  """Trains every combination of ``grid`` (parse_grid's axes) once per seed at the same batch and
  steps; returns figures per run and the floor. ``results['runs']`` maps ``run_key`` to the run's
  settings and its energy distances at ``eval_steps`` (NaN, with ``diverged`` true, when training
  stopped on non-finite metrics): the trainer's final evaluation, or with ``eval_num`` > 0 that many
  samples per step count (:func:`resampled_figures`)."""
  from imm_jax.trainer import train_and_evaluate

  seeds = [int(s) for s in seeds]
  eval_steps = [int(n) for n in eval_steps]
  overrides = dict(overrides or {})
  name = f"{config_name}_{variant}" if variant else config_name
  if tag:
    name = f"{name}_{tag}"
  base = run_config(config_name, variant, overrides, {})
  results = {"name": name, "num_steps": num_steps, "batch_size": int(base.batch_size),
             "overrides": overrides, "grid_axes": [list(keys) for keys, _ in grid],
             "seeds": seeds, "eval_steps": eval_steps, "eval_num": int(eval_num), "runs": {}}
  for settings in _combinations(grid):
    for sd in seeds:
      c = run_config(config_name, variant, overrides, settings)
      c.seed = sd
      c.num_steps = num_steps
      c.sample_every = num_steps
      c.checkpoint.every = num_steps
      c.eval.at_start = False
      if eval_num:
        c.eval.num = 0  # scored by resampled_figures: the trainer's own evaluation would be thrown away
      else:
        c.eval.steps = tuple(eval_steps)
      key = run_key(settings, sd)
      run_dir = run_dir_name(config_name, variant, num_steps, overrides, key)
      run = {"settings": settings, "seed": sd, "batch_size": int(c.batch_size),
             "groups": int(c.batch_size) // int(c.imm.group_size), "workdir": run_dir}
      try:
        figures = train_and_evaluate(c, os.path.join(workdir, run_dir))
        if eval_num:
          figures = resampled_figures(os.path.join(workdir, run_dir), eval_steps, eval_num)
        run.update(diverged=False, **{f: float(v) for f, v in figures.items() if f.startswith("energy_")})
        run.update({f: v for f, v in figures.items() if f.startswith("grid_")})
      except FloatingPointError as e:
        absl_logging.warning("%s diverged: %s", key, e)
        run.update(diverged=True, **{f"energy_{n}step": math.nan for n in eval_steps})
      results["runs"][key] = run
      print(f"{key}: " + ", ".join(f"{f}={v:.5f}" for f, v in run.items() if f.startswith("energy")),
            flush=True)
  from imm_jax import data as data_lib

  held_out, _ = data_lib.load_eval_set(base.data, int(eval_num or base.eval.num))
  draws, _ = floor_draws(base.data, held_out, int(eval_num or base.eval.get("samples", 0) or len(held_out)),
                      seed=seeds[0] + 1)
  results["true_vs_true_energy"] = float(sum(draws) / len(draws))
  results["true_vs_true_energy_draws"] = draws
  return results


def floor_draws(data_cfg, held_out: np.ndarray, num: int, seed: int) -> tuple[list[float], int]:
  """The floor of sample-quality figures: energy distances of ``num`` distinct training examples (at
  most the whole training set) to the ``held_out`` examples the samples are scored against, for
  FLOOR_DRAWS independent draws (one when the draw is the whole training set; their spread is the
  noise of a figure near the floor), and the number of training examples drawn."""
  from imm_jax import data as data_lib
  from imm_jax.data import sources
  from imm_jax.evaluation import distances

  n_train = len(sources.resolve(data_cfg, need_train=True, need_eval=False).train)
  num = min(num, n_train)
  ref = held_out.reshape(len(held_out), -1)
  draws = []
  for i in range(1 if num == n_train else FLOOR_DRAWS):  # the whole training set: one draw
    real, _ = data_lib.load_train_examples(data_cfg, num, seed=seed + i)
    draws.append(float(distances.energy_distance(real.reshape(len(real), -1), ref)))
  return draws, num


def _fmt(v) -> str:
  return "diverged" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.5f}"


def _floor_text(results: dict) -> str:
  draws = results.get("true_vs_true_energy_draws")
  if not draws or len(draws) == 1:
    return f"{results['true_vs_true_energy']:.5f}"
  return f"{results['true_vs_true_energy']:.5f} mean of {len(draws)}, range {min(draws):.5f} to {max(draws):.5f}"


def markdown_table(results: dict) -> str:
  keys = grid_keys(results["grid_axes"])
  over = results.get("overrides") or {}
  over_txt = (", overrides " + ", ".join(f"`{k}={v}`" for k, v in over.items())) if over else ""
  steps = results.get("eval_steps", (1, 2, 4))
  samples = f"{results['eval_num']} samples per step count" if results.get("eval_num") else "the trainer's samples"
  lines = [f"IMM on `{results['name']}`, {results['num_steps']} steps at equal batch{over_txt} (energy "
           f"distance of {samples} to held-out true samples, lower is better; training examples against "
           f"the same held-out set: {_floor_text(results)})", "",
           "| " + " | ".join([short_name(k) for k in keys] + ["seed", "groups per batch"]
                             + [f"{n} step" + ("s" if n > 1 else "") for n in steps]) + " |",
           "|" + "---|" * (len(keys) + 2 + len(steps))]
  for r in results["runs"].values():
    cells = [str(r["settings"][k]) for k in keys] + [str(r["seed"]), str(r["groups"])]
    cells += [_fmt(r[f"energy_{n}step"]) for n in steps]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(results: dict, workdir: str, path: str):
  """Each run's final 1-step samples, those its 1-step figure was computed from where the run has their
  picture (``grid_1step``, with ``--eval_num``), else the trainer's last 1-step sample grid: a column per
  value of the last grid axis, a row per combination of the other axes and seed."""
  import numpy as np
  from PIL import Image

  from imm_jax import images as images_lib

  *row_axes, col_keys = results["grid_axes"]
  row_keys = grid_keys(row_axes)
  rows = {}
  for r in results["runs"].values():
    if r.get("grid_1step"):
      pngs = [os.path.join(workdir, r["workdir"], r["grid_1step"])]
    else:
      pngs = sorted(glob.glob(os.path.join(workdir, r["workdir"], "samples", "*_1step.png")))
    if pngs:
      label = (" ".join(f"{short_name(k)}={r['settings'][k]}" for k in col_keys)
               + f", seed {r['seed']}: {_fmt(r['energy_1step'])}")
      row = tuple(r["settings"][k] for k in row_keys) + (r["seed"],)
      rows.setdefault(row, []).append((np.asarray(Image.open(pngs[-1]).convert("RGB")), label))
  if not rows:
    return
  strips = [images_lib.side_by_side([p for p, _ in row], [l for _, l in row]) for row in rows.values()]
  width = max(s.shape[1] for s in strips)
  padded = [np.pad(s, ((0, 8), (0, width - s.shape[1]), (0, 0)), constant_values=255) for s in strips]
  images_lib.save_png(path, np.concatenate(padded, axis=0))


def run_and_report(prefix: str, grid, workdir: str):
  """The programs' main: checks every run's config (a bad --set or --grid stops here, in one line, before
  any run trains), runs the sweep, writes <out>/<prefix>_<name>.json and .png, prints the table."""
  try:
    overrides = parse_overrides(FLAGS.set)
    check(FLAGS.config, FLAGS.variant, grid, overrides)
  except (KeyError, ValueError) as e:
    fail(f"--set/--grid: {e.args[0]}")
  try:
    eval_steps = [int(n) for n in FLAGS.eval_steps]
  except ValueError:
    fail(f"--eval_steps: {','.join(FLAGS.eval_steps)!r} is not a list of step counts, e.g. 1,2,4,8")
  if not eval_steps or min(eval_steps) < 1 or FLAGS.eval_num < 0:
    fail("--eval_steps/--eval_num: give positive step counts (e.g. 1,2,4,8) and --eval_num >= 0 (0: the "
         "trainer's own evaluation)")
  results = run_sweep(FLAGS.config, FLAGS.variant, grid, FLAGS.num_steps, seeds=FLAGS.seeds,
                      workdir=workdir, overrides=overrides, tag=FLAGS.tag, eval_num=FLAGS.eval_num,
                      eval_steps=eval_steps)
  name = results["name"]
  with atomic_open(os.path.join(FLAGS.out, f"{prefix}_{name}.json"), "w") as f:
    json.dump(results, f, indent=2)
  plot(results, workdir, os.path.join(FLAGS.out, f"{prefix}_{name}.png"))
  print(markdown_table(results))


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  try:
    grid = parse_grid(FLAGS.grid)
  except ValueError as e:
    fail(f"--grid: {e.args[0]}")
  if not grid:
    fail("--grid: give at least one KEY=v1,v2,... to compare, e.g. --grid imm.mapping=eta,t")
  run_and_report("sweep", grid, FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
