"""The paper's particle-count claim: at equal compute, M = 1 is worse than M = 4 (Fig. 5).

  python -m imm_jax.experiments.group_size --config toy2d --variant checkerboard --out docs/results
  python -m imm_jax.experiments.group_size --config digits --num_steps 1500 --out docs/results

Trains IMM with the same global batch B and number of steps for each M (so B / M groups with M
particles each: the same network evaluations per step), then reports the energy distance of 1, 2 and
4-step samples to fresh true samples, next to the energy distance between two independent true sets
of the same size (the floor set by finite samples). Writes `<out>/group_size_<name>.json`, the final
1-step samples of each M side by side (`<out>/group_size_<name>.png`) and prints a Markdown table.
"""

from __future__ import annotations

import json
import os

from absl import app, flags
from absl import logging as absl_logging

from imm_jax.io_utils import atomic_open

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags, defined only when run as a program: importing this module as a library
  (tests, other tools) must not define flags that clash with other executables' (--workdir, --out)."""
  flags.DEFINE_enum("config", "toy2d", ["toy2d", "digits"], "Which built-in data (configs/<config>.py).")
  flags.DEFINE_string("variant", "", "Config variant, e.g. the toy: checkerboard, 8gaussians, moons.")
  flags.DEFINE_list("group_sizes", ["1", "4"], "Values of M to compare.")
  flags.DEFINE_integer("num_steps", 4000, "Training steps for every M.")
  flags.DEFINE_integer("seed", 0, "Seed.")
  flags.DEFINE_string("out", "docs/results", "Output folder for the JSON summary and the plot.")
  flags.DEFINE_string("workdir", "workdirs/group_size", "Parent folder of the training workdirs.")


def run_group_size(config_name: str, variant: str, group_sizes, num_steps: int, seed: int,
                   workdir: str) -> dict:
  import numpy as np

  from imm_jax import checkpoints, sampling
  from imm_jax.builder import build_model
  from imm_jax.configs_loader import load_config
  from imm_jax import data as data_lib
  from imm_jax.evaluation import distances
  from imm_jax.trainer import train_and_evaluate

  name = f"{config_name}_{variant}" if variant else config_name
  results = {"name": name, "num_steps": num_steps, "runs": {}}
  for m in group_sizes:
    c = load_config(config_name, variant)
    c.seed = seed
    c.num_steps = num_steps
    c.imm.group_size = int(m)
    c.sample_every = num_steps
    c.checkpoint.every = num_steps
    c.eval.at_start = False
    figures = train_and_evaluate(c, os.path.join(workdir, f"{name}_M{m}"))
    results["runs"][str(m)] = {"batch_size": int(c.batch_size), "groups": int(c.batch_size) // int(m),
                               **{k: float(v) for k, v in figures.items()}}
  # The floor: held-out data against as many training examples (two independent real sets).
  held_out, _ = data_lib.load_eval_set(c.data, int(c.eval.num))
  real = next(data_lib.create_train_iterator(c.data, local_batch_size=len(held_out), seed=seed + 1))["x"]
  results["true_vs_true_energy"] = float(distances.energy_distance(
      real.reshape(len(real), -1), held_out.reshape(len(held_out), -1)))
  return results


def markdown_table(results: dict) -> str:
  lines = [f"IMM on `{results['name']}`, {results['num_steps']} steps at equal batch (energy distance to "
           f"fresh true samples, lower is better; two independent true sets: "
           f"{results['true_vs_true_energy']:.5f})", "",
           "| M | groups per batch | 1 step | 2 steps | 4 steps |", "|---|---|---|---|---|"]
  for m, r in results["runs"].items():
    lines.append(f"| {m} | {r['groups']} | {r['energy_1step']:.5f} | {r['energy_2step']:.5f} | "
                 f"{r['energy_4step']:.5f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  results = run_group_size(FLAGS.config, FLAGS.variant, FLAGS.group_sizes, FLAGS.num_steps, FLAGS.seed,
                           FLAGS.workdir)
  name = results["name"]
  with atomic_open(os.path.join(FLAGS.out, f"group_size_{name}.json"), "w") as f:
    json.dump(results, f, indent=2)
  _plot(results, FLAGS.workdir, os.path.join(FLAGS.out, f"group_size_{name}.png"))
  print(markdown_table(results))


def _plot(results: dict, workdir: str, path: str):
  """Side-by-side scatter plots of each M's final 1-step samples (from its sample grids)."""
  import glob

  import numpy as np
  from PIL import Image

  from imm_jax import images as images_lib

  panels, labels = [], []
  for m in results["runs"]:
    pngs = sorted(glob.glob(os.path.join(workdir, f"{results['name']}_M{m}", "samples", "*_1step.png")))
    if pngs:
      panels.append(np.asarray(Image.open(pngs[-1]).convert("RGB")))
      labels.append(f"M = {m}, 1 step")
  if panels:
    images_lib.save_png(path, images_lib.side_by_side(panels, labels))


if __name__ == "__main__":
  define_flags()
  app.run(main)
