"""Does the augmentation leak into samples? Rotations with and without their labels, on horizontal bars.

  python -m imm_jax.experiments.augment_leak --workdir workdirs/augment_leak --out docs --train_steps 2400

Generates 2048 horizontal bars (16x16, random position, length and sub-pixel offset; one orientation)
as an ``images`` .npz in the workdir and trains configs/digits.py's network on them three times through
the one trainer: without augmentation, and with rotations by U(-pi, pi) on a share ``--p`` of the images
(``config.augment``, transforms ('rotate',)) once with ``config.model.augment_dim=9`` (the network is
told each angle; the samplers ask for angle 0) and once with 0 (it is not). For every checkpoint the runs
keep it draws ``--num`` samples at 2 steps and measures the share tilted by more than 20 degrees (the
orientation of each sample's second image moments). A model that learned the rotated bars as data gives
about p x 140/180 plus its own errors; the data give 0.

Writes ``<out>/results/augment_leak.json`` and ``<out>/results/augment_leak.png`` (data, augmented data
and each run's samples after its last step) and prints the table. Finished runs are only re-sampled.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from imm_jax.io_utils import atomic_open

FLAGS = flags.FLAGS
RUNS = {  # name: (augment.p multiplier, model.augment_dim)
    "no augmentation": (0.0, 0),
    "rotations, augment_dim=9": (1.0, 9),
    "rotations, augment_dim=0": (1.0, 0),
}
TILT_DEGREES = 20.0
SAMPLE_STEPS = 2


def define_flags():
  """Flags, defined only when run as a program (importing the module must not define them)."""
  flags.DEFINE_integer("train_steps", 2400, "Training steps of each run.")
  flags.DEFINE_integer("checkpoint_every", 800, "Checkpoint (and measurement) interval.")
  flags.DEFINE_float("p", 0.5, "Share of training images rotated (config.augment.p).")
  flags.DEFINE_integer("num", 1000, "Samples per measurement.")
  flags.DEFINE_integer("seed", 0, "Seed of the data, every run and the samples.")
  flags.DEFINE_string("out", "docs", "JSON and PNG go to <out>/results.")
  flags.DEFINE_string("workdir", "workdirs/augment_leak", "Parent folder of the data and training workdirs.")


def bars(n: int = 2048, size: int = 16, seed: int = 0) -> np.ndarray:
  """(n, size, size, 1) uint8 soft-edged horizontal bars: centre row U(5.5, 9.5), column U(6.5, 8.5),
  half-length U(4, 5.5) pixels, Gaussian profile across (std 1 pixel)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
  out = np.zeros((n, size, size, 1), np.uint8)
  for i in range(n):
    cy, cx, half = rng.uniform(5.5, 9.5), rng.uniform(6.5, 8.5), rng.uniform(4.0, 5.5)
    along = np.clip(half + 0.5 - np.abs(xx - cx), 0, 1)
    across = np.exp(-0.5 * (yy - cy) ** 2)
    out[i, ..., 0] = np.round(255 * along * across)
  return out


def orientation_degrees(images: np.ndarray) -> np.ndarray:
  """The angle in (-90, 90] of each image's principal axis from the horizontal (counter-clockwise on
  screen positive), from the second moments of its non-negative intensities; uint8 or [-1, 1] images."""
  x = np.asarray(images, np.float64)
  x = x / 255.0 if images.dtype == np.uint8 else (x + 1.0) / 2.0
  x = np.clip(x.reshape(x.shape[0], x.shape[1], x.shape[2], -1).mean(-1), 0, None)
  yy, xx = np.mgrid[0:x.shape[1], 0:x.shape[2]].astype(np.float64)
  mass = x.sum((1, 2)) + 1e-12
  cy, cx = (x * yy).sum((1, 2)) / mass, (x * xx).sum((1, 2)) / mass
  dy, dx = yy[None] - cy[:, None, None], xx[None] - cx[:, None, None]
  myy, mxx, mxy = ((x * a * b).sum((1, 2)) / mass for a, b in ((dy, dy), (dx, dx), (dx, dy)))
  return np.degrees(0.5 * np.arctan2(-2 * mxy, mxx - myy))  # rows grow downwards: flip the sign


def tilted_share(images: np.ndarray, degrees: float = TILT_DEGREES) -> float:
  return float(np.mean(np.abs(orientation_degrees(images)) > degrees))


def run_config(data_path: str, name: str, *, train_steps: int, checkpoint_every: int, p: float, seed: int):
  from imm_jax.configs_loader import load_config

  share, dim = RUNS[name]
  c = load_config("digits")
  c.seed = seed
  c.num_steps = train_steps
  c.sample_every = checkpoint_every
  c.checkpoint.every = checkpoint_every
  c.checkpoint.keep = max(3, train_steps // checkpoint_every)
  c.data.update(name="images", path=data_path)
  c.eval.num = 0
  c.augment.update(p=p * share, transforms=("rotate",))
  c.model.augment_dim = dim
  return c


def measure(c, workdir: str, num: int, seed: int) -> dict[int, tuple[float, np.ndarray]]:
  """{checkpoint step: (tilted share, uint8 samples)} at SAMPLE_STEPS steps, the same noise for all."""
  import jax

  from imm_jax import checkpoints, sampling
  from imm_jax.builder import build_model
  from imm_jax.data.pipeline import to_uint8
  from imm_jax.trainer import generate_samples

  model = build_model(c)
  noise = sampling.prior_noise(jax.random.key(seed + 1), (num,) + model.input_shape, model.precond.sigma_d)
  out = {}
  for step in checkpoints.saved_steps(workdir):
    params, _ = checkpoints.restore_ema_params(workdir, model.abstract_params(), step)
    images = to_uint8(generate_samples(model, params, noise, None, SAMPLE_STEPS, c))
    out[int(step)] = (tilted_share(images), images)
  return out


def figure(data: np.ndarray, augmented: np.ndarray, samples: dict[str, np.ndarray], path: str, n: int = 32):
  from imm_jax import images as images_lib

  def grid(u8):
    return images_lib.upscale_nearest(images_lib.make_grid(u8[:n], ncols=4), 3)

  panels = [grid(data), grid(augmented)] + [grid(v) for v in samples.values()]
  labels = ["data", "augmented (rotations)"] + [
      "baseline" if k == "no augmentation" else k for k in samples]
  images_lib.save_png(path, images_lib.side_by_side(panels, labels))


def markdown_table(results: dict) -> str:
  names = list(results["runs"])
  steps = sorted({int(s) for v in results["runs"].values() for s in v})
  lines = ["| checkpoint | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
  for s in steps:
    lines.append(f"| {s} | " + " | ".join(f"{results['runs'][k].get(str(s), float('nan')):.3f}" for k in names)
                 + " |")
  return "\n".join(lines)


def run(workdir: str, out: str, *, train_steps: int, checkpoint_every: int, p: float, num: int,
        seed: int, command: str = "") -> dict:
  import jax
  import jax.numpy as jnp

  from imm_jax.augment import Augment
  from imm_jax.data.pipeline import to_uint8
  from imm_jax.trainer import train_and_evaluate

  os.makedirs(workdir, exist_ok=True)
  data_path = os.path.join(workdir, "bars.npz")
  data = bars(seed=seed)
  with atomic_open(data_path, "wb") as f:
    np.savez(f, images=data)
  results = {"command": command, "data_tilted": tilted_share(data), "p": p, "train_steps": train_steps,
             "sample_steps": SAMPLE_STEPS, "tilt_degrees": TILT_DEGREES, "num": num, "runs": {}}
  last, augment = {}, None
  for name in RUNS:
    c = run_config(data_path, name, train_steps=train_steps, checkpoint_every=checkpoint_every, p=p, seed=seed)
    augment = augment or Augment.from_config(c.augment)  # the rotations the augmented runs train with
    run_dir = os.path.join(workdir, name.replace(", ", "_").replace(" ", "_").replace("=", ""))
    train_and_evaluate(c, run_dir)
    measured = measure(c, run_dir, num, seed)
    results["runs"][name] = {str(s): share for s, (share, _) in measured.items()}
    last[name] = measured[max(measured)][1]
  x = jnp.asarray(data[:32], jnp.float32) / 127.5 - 1.0
  augmented, _ = augment(jax.random.key(seed), x)
  os.makedirs(os.path.join(out, "results"), exist_ok=True)
  figure(data, to_uint8(np.asarray(augmented)), last, os.path.join(out, "results", "augment_leak.png"))
  with atomic_open(os.path.join(out, "results", "augment_leak.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  results = run(FLAGS.workdir, FLAGS.out, train_steps=FLAGS.train_steps, checkpoint_every=FLAGS.checkpoint_every,
                p=FLAGS.p, num=FLAGS.num, seed=FLAGS.seed,
                command="python -m imm_jax.experiments.augment_leak " + " ".join(sys.argv[1:]))
  print(f"data: {results['data_tilted']:.3f} tilted by more than {TILT_DEGREES:.0f} degrees")
  print(markdown_table(results), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
