"""The paper's particle-count claim on toy 2-D data: at equal compute, M = 1 is clearly worse than M = 4.

  python -m imm_jax.experiments.group_size --toy checkerboard --out docs/results

Trains IMM with the same global batch B and number of steps for each M (so B / M groups with M
particles each: the same network evaluations per step), then reports the energy distance of 1, 2 and
4-step samples to fresh true samples, next to the energy distance between two independent true sets
of the same size (the floor set by finite samples). Writes `<out>/group_size_<toy>.json`, a scatter
plot per M (`<out>/group_size_<toy>.png`) and prints a Markdown table.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from absl import logging as absl_logging

FLAGS = flags.FLAGS
flags.DEFINE_enum("toy", "checkerboard", ["checkerboard", "8gaussians", "moons"], "Toy distribution.")
flags.DEFINE_list("group_sizes", ["1", "4"], "Values of M to compare.")
flags.DEFINE_integer("num_steps", 4000, "Training steps for every M.")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_string("out", "docs/results", "Output folder for the JSON summary and the plot.")
flags.DEFINE_string("workdir", "workdirs/group_size", "Parent folder of the training workdirs.")


def run_group_size(toy: str, group_sizes, num_steps: int, seed: int, workdir: str) -> dict:
  import numpy as np

  from imm_jax import checkpoints, sampling
  from imm_jax.builder import build_model
  from imm_jax.configs_loader import load_config
  from imm_jax.data import sample_toy2d
  from imm_jax.evaluation import distances
  from imm_jax.trainer import train_and_evaluate

  results = {"toy": toy, "num_steps": num_steps, "runs": {}}
  n_eval = None
  for m in group_sizes:
    c = load_config("toy2d", toy)
    c.seed = seed
    c.num_steps = num_steps
    c.imm.group_size = int(m)
    c.sample_every = num_steps
    c.checkpoint.every = num_steps
    c.eval.at_start = False
    n_eval = int(c.eval.num)
    figures = train_and_evaluate(c, os.path.join(workdir, f"{toy}_M{m}"))
    results["runs"][str(m)] = {"batch_size": int(c.batch_size), "groups": int(c.batch_size) // int(m),
                               **{k: float(v) for k, v in figures.items()}}
  a, b = sample_toy2d(toy, n_eval, seed + 101), sample_toy2d(toy, n_eval, seed + 202)
  results["true_vs_true_energy"] = float(distances.energy_distance(a, b))
  return results


def markdown_table(results: dict) -> str:
  lines = [f"IMM on `{results['toy']}`, {results['num_steps']} steps at equal batch (energy distance to "
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
  results = run_group_size(FLAGS.toy, FLAGS.group_sizes, FLAGS.num_steps, FLAGS.seed, FLAGS.workdir)
  os.makedirs(FLAGS.out, exist_ok=True)
  path = os.path.join(FLAGS.out, f"group_size_{FLAGS.toy}.json")
  with open(path + ".tmp", "w") as f:
    json.dump(results, f, indent=2)
  os.replace(path + ".tmp", path)
  _plot(results, FLAGS.workdir, os.path.join(FLAGS.out, f"group_size_{FLAGS.toy}.png"))
  print(markdown_table(results))


def _plot(results: dict, workdir: str, path: str):
  """Side-by-side scatter plots of each M's final 1-step samples (from its sample grids)."""
  import glob

  import numpy as np
  from PIL import Image

  from imm_jax import images as images_lib

  panels, labels = [], []
  for m in results["runs"]:
    pngs = sorted(glob.glob(os.path.join(workdir, f"{results['toy']}_M{m}", "samples", "*_1step.png")))
    if pngs:
      panels.append(np.asarray(Image.open(pngs[-1]).convert("RGB")))
      labels.append(f"M = {m}, 1 step")
  if panels:
    images_lib.save_png(path, images_lib.side_by_side(panels, labels))


if __name__ == "__main__":
  app.run(main)
