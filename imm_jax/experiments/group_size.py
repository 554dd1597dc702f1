"""The paper's particle-count claim: at equal compute, M = 1 is worse than M = 4 (Fig. 5).

  python -m imm_jax.experiments.group_size --config toy2d --variant 8gaussians --num_steps 1000 \
      --ks 4,6 --seeds 0,1,2 --group_sizes 1,4 --tag 8g_k4_k6
  python -m imm_jax.experiments.group_size --config toy2d --variant checkerboard --out docs/results
  python -m imm_jax.experiments.group_size --config digits --num_steps 1500 --out docs/results
  python -m imm_jax.experiments.group_size --config toy2d --variant checkerboard --ks 12,18 \
      --group_sizes 1,2,4,8 --seeds 0,1 --set optim.lr=3e-3 --tag lr3e-3

Trains IMM with the same global batch B and number of steps for each M (so B / M groups with M
particles each: the same network evaluations per step), then reports the energy distance of 1, 2 and
4-step samples to fresh true samples, next to the energy distance between two independent true sets
of the same size (the floor set by finite samples). The first command shows the claim on the toy
(M = 1 collapses at large gaps; at the configs' k = 12 the two are level; docs/group_size.md).
``--ks`` repeats the comparison for several gap sizes k of the eta-decrement mapping (spec section
3.2; larger k = smaller t - r), ``--seeds`` for several seeds, and ``--set key=value`` changes any
other config value for every run. A run whose
training metrics become non-finite is reported as diverged (NaN) rather than stopping the sweep.
Each run trains in `<workdir>/<config>_<variant>_<steps>steps[_<overrides>]_k<k>_M<M>_s<seed>`; a finished
run found there is only re-evaluated, so reports over overlapping sweeps cost no extra training.
Writes `<out>/group_size_<name>.json`, the final 1-step samples of each run (one row per k and seed,
one column per M: `<out>/group_size_<name>.png`) and prints a Markdown table.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re

from absl import app, flags
from absl import logging as absl_logging

from imm_jax.configs_loader import config_lookup, load_config
from imm_jax.io_utils import atomic_open, fail

FLAGS = flags.FLAGS
FLOOR_DRAWS = 5  # independent true-vs-true energy distances averaged for the floor


def define_flags():
  """Command-line flags, defined only when run as a program: importing this module as a library
  (tests, other tools) must not define flags that clash with other executables' (--workdir, --out)."""
  flags.DEFINE_enum("config", "toy2d", ["toy2d", "digits"], "Which built-in data (configs/<config>.py).")
  flags.DEFINE_string("variant", "", "Config variant, e.g. the toy: checkerboard, 8gaussians, moons.")
  flags.DEFINE_list("group_sizes", ["1", "4"], "Values of M to compare.")
  flags.DEFINE_list("ks", [], "Gap exponents k (config.imm.k) to sweep; empty = the config's own k.")
  flags.DEFINE_integer("num_steps", 4000, "Training steps for every M.")
  flags.DEFINE_list("seeds", ["0"], "Seeds; every (k, M) is trained once per seed.")
  flags.DEFINE_multi_string("set", [], "Config override KEY=VALUE for every run (repeatable), e.g. "
                            "--set optim.lr=3e-3 --set imm.kernel=rbf. VALUE is a Python literal or a string.")
  flags.DEFINE_string("tag", "", "Suffix of the result name (the JSON and PNG files), to keep reports apart.")
  flags.DEFINE_string("out", "docs/results", "Output folder for the JSON summary and the plot.")
  flags.DEFINE_string("workdir", "workdirs/group_size", "Parent folder of the training workdirs.")


def parse_overrides(items) -> dict:
  """['optim.lr=3e-3', 'imm.kernel=rbf'] -> {'optim.lr': 0.003, 'imm.kernel': 'rbf'}."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
      raise ValueError(f"config override {item!r} is not KEY=VALUE")
    try:
      out[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[key.strip()] = value.strip()
  return out


def apply_overrides(config, overrides: dict):
  """Set dotted keys of a ConfigDict; an unknown key is an error (a typo must not pass silently)."""
  for key, value in overrides.items():
    parent, name = config_lookup(config, key)
    parent[name] = value
  return config


def run_key(k, m, seed) -> str:
  return f"k{k}_M{m}_s{seed}"


def run_dir_name(config_name: str, variant: str, num_steps: int, overrides: dict, key: str) -> str:
  """A run's workdir name: everything that defines the run, so a finished run is reused (it only
  re-evaluates) by exactly the same settings and never by different ones (the trainer resumes)."""
  parts = [config_name] + ([variant] if variant else []) + [f"{num_steps}steps"]
  parts += [re.sub(r"[^A-Za-z0-9.=+-]", "-", f"{k}={v}") for k, v in sorted(overrides.items())]
  return "_".join(parts + [key])


def run_group_size(config_name: str, variant: str, group_sizes, num_steps: int, seed=0,
                   workdir: str = "workdirs/group_size", ks=(), seeds=None, overrides=None,
                   tag: str = "") -> dict:
  """Trains every (k, M, seed) at the same batch and steps; returns figures per run and the floor.

  ``results['runs']`` maps ``run_key(k, M, seed)`` to the run's settings and its energy distances
  (NaN, with ``diverged`` true, when training stopped on non-finite metrics).
  """
  from imm_jax import data as data_lib
  from imm_jax.evaluation import distances
  from imm_jax.trainer import train_and_evaluate

  seeds = [int(s) for s in (seeds if seeds else [seed])]
  overrides = dict(overrides or {})
  name = f"{config_name}_{variant}" if variant else config_name
  if tag:
    name = f"{name}_{tag}"
  base = apply_overrides(load_config(config_name, variant), overrides)
  ks = [int(k) for k in ks] or [int(base.imm.k)]
  results = {"name": name, "num_steps": num_steps, "batch_size": int(base.batch_size),
             "overrides": overrides, "ks": ks, "group_sizes": [int(m) for m in group_sizes],
             "seeds": seeds, "runs": {}}
  for k in ks:
    for sd in seeds:
      for m in group_sizes:
        c = apply_overrides(load_config(config_name, variant), overrides)
        c.seed = sd
        c.num_steps = num_steps
        c.imm.k = int(k)
        c.imm.group_size = int(m)
        c.sample_every = num_steps
        c.checkpoint.every = num_steps
        c.eval.at_start = False
        key = run_key(k, m, sd)
        run_dir = run_dir_name(config_name, variant, num_steps, overrides, key)
        run = {"k": int(k), "M": int(m), "seed": sd, "batch_size": int(c.batch_size),
               "groups": int(c.batch_size) // int(m), "workdir": run_dir}
        try:
          figures = train_and_evaluate(c, os.path.join(workdir, run_dir))
          run.update(diverged=False, **{f: float(v) for f, v in figures.items()})
        except FloatingPointError as e:
          absl_logging.warning("%s diverged: %s", key, e)
          run.update(diverged=True, **{f"energy_{n}step": math.nan for n in c.eval.steps})
        results["runs"][key] = run
        print(f"{key}: " + ", ".join(f"{f}={v:.5f}" for f, v in run.items() if f.startswith("energy")),
              flush=True)
  # The floor: held-out data against as many training examples (two independent real sets), for
  # FLOOR_DRAWS independent training draws: their spread is the noise level of every figure above.
  held_out, _ = data_lib.load_eval_set(base.data, int(base.eval.num))
  draws = []
  for i in range(FLOOR_DRAWS):
    real = next(data_lib.create_train_iterator(base.data, local_batch_size=len(held_out), seed=seeds[0] + 1 + i))["x"]
    draws.append(float(distances.energy_distance(real.reshape(len(real), -1), held_out.reshape(len(held_out), -1))))
  results["true_vs_true_energy"] = float(sum(draws) / len(draws))
  results["true_vs_true_energy_draws"] = draws
  return results


def _fmt(v) -> str:
  return "diverged" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.5f}"


def _floor_text(results: dict) -> str:
  draws = results.get("true_vs_true_energy_draws")
  if not draws:
    return f"{results['true_vs_true_energy']:.5f}"
  return f"{results['true_vs_true_energy']:.5f} mean of {len(draws)}, range {min(draws):.5f} to {max(draws):.5f}"


def markdown_table(results: dict) -> str:
  over = results.get("overrides") or {}
  over_txt = (", overrides " + ", ".join(f"`{k}={v}`" for k, v in over.items())) if over else ""
  lines = [f"IMM on `{results['name']}`, {results['num_steps']} steps at equal batch{over_txt} (energy "
           f"distance to fresh true samples, lower is better; two independent true sets: "
           f"{_floor_text(results)})", "",
           "| k | M | seed | groups per batch | 1 step | 2 steps | 4 steps |",
           "|---|---|---|---|---|---|---|"]
  for r in results["runs"].values():
    lines.append(f"| {r.get('k', '')} | {r.get('M', '')} | {r.get('seed', '')} | {r['groups']} | "
                 f"{_fmt(r['energy_1step'])} | {_fmt(r['energy_2step'])} | {_fmt(r['energy_4step'])} |")
  return "\n".join(lines)


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  try:  # a bad --set stops here, in one line, before any run trains
    overrides = parse_overrides(FLAGS.set)
    apply_overrides(load_config(FLAGS.config, FLAGS.variant), overrides)
  except (KeyError, ValueError) as e:
    fail(f"--set: {e.args[0]}")
  results = run_group_size(FLAGS.config, FLAGS.variant, FLAGS.group_sizes, FLAGS.num_steps,
                           workdir=FLAGS.workdir, ks=FLAGS.ks, seeds=FLAGS.seeds,
                           overrides=overrides, tag=FLAGS.tag)
  name = results["name"]
  with atomic_open(os.path.join(FLAGS.out, f"group_size_{name}.json"), "w") as f:
    json.dump(results, f, indent=2)
  _plot(results, FLAGS.workdir, os.path.join(FLAGS.out, f"group_size_{name}.png"))
  print(markdown_table(results))


def _plot(results: dict, workdir: str, path: str):
  """Each run's final 1-step samples (from its sample grids): a row per (k, seed), a column per M."""
  import glob

  import numpy as np
  from PIL import Image

  from imm_jax import images as images_lib

  rows = {}
  for key, r in results["runs"].items():
    pngs = sorted(glob.glob(os.path.join(workdir, r["workdir"], "samples", "*_1step.png")))
    if pngs:
      label = f"k={r['k']} M={r['M']} s={r['seed']}: {_fmt(r['energy_1step'])}"
      rows.setdefault((r["k"], r["seed"]), []).append((np.asarray(Image.open(pngs[-1]).convert("RGB")), label))
  if not rows:
    return
  strips = [images_lib.side_by_side([p for p, _ in row], [l for _, l in row]) for row in rows.values()]
  width = max(s.shape[1] for s in strips)
  padded = [np.pad(s, ((0, 8), (0, width - s.shape[1]), (0, 0)), constant_values=255) for s in strips]
  images_lib.save_png(path, np.concatenate(padded, axis=0))


if __name__ == "__main__":
  define_flags()
  app.run(main)
