"""Sample a trained (or converted) model with its EMA parameters.

  python -m imm_jax.sample --workdir DIR --steps 2 --num 64 --out samples.npz
  python -m imm_jax.sample --workdir DIR --noise Z.npy --labels Y.npy --cfg-scale 1.5 \\
      --schedule uniform --steps 4 --out S.npz

Flags may be spelled with dashes or underscores (--cfg-scale / --cfg_scale). --schedule, --mid-etas and
--cfg-scale default to the workdir config's ``sample`` section (a converted ImageNet checkpoint: uniform,
w = 1.5). The .npz holds ``samples`` (float32, model space, before any decoding or clipping), ``labels``
and, for image data, ``images`` (uint8 NHWC); a PNG grid is written beside it (same name, .png) for image
and 2-D point data. Latent models (data kind 'latent', e.g. ImageNet SD-VAE latents) are decoded with the
SD-VAE given by --vae (or the one recorded with the data); without one they write the latents only.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from absl import logging as absl_logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A workdir written by imm_jax.train or imm_jax.convert.")
flags.DEFINE_string("out", None, "Output .npz path (a PNG grid is written beside it).")
flags.DEFINE_integer("steps", 1, "Number of sampling steps (network evaluations without guidance).")
flags.DEFINE_integer("num", 64, "Number of samples (ignored when --noise is given).")
flags.DEFINE_enum("schedule", None, ["default", "uniform", "edm", "explicit"],
                  "Time schedule: default = the paper's (1 step; 2 steps through eta=1.4; else uniform). "
                  "Default: the workdir config's sample.schedule ('default' for trained workdirs).")
flags.DEFINE_list("mid_etas", None, "Mid-point etas for --schedule=explicit (steps - 1 values), e.g. 1.4. "
                  "Default: the config's sample.mid_etas when --schedule is not given, else none.")
flags.DEFINE_enum("sampler", None, ["pushforward", "restart", "euler", "heun", "ancestral"],
                  "Sampler (default: the workdir config's sample.sampler): pushforward / restart for IMM, "
                  "euler / heun for flow matching, ancestral for moment-matching students.")
flags.DEFINE_float("cfg_scale", None, "Classifier-free guidance scale w (conditional models; 1 = none). "
                   "Default: the training config's sample.cfg_scale.")
flags.DEFINE_integer("seed", 0, "Seed for the prior noise, random labels and restart noise.")
flags.DEFINE_string("noise", None, "Initial noise, .npy of shape (N, *sample_shape) (NHWC), used as is.")
flags.DEFINE_string("labels", None, "Class ids, .npy of shape (N,); num_classes means unconditional.")
flags.DEFINE_integer("batch_size", 256, "Samples per device batch.")
flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step to load (default: latest).")
flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
flags.DEFINE_string("vae", None, "Latent models: the SD-VAE folder (config.json + "
                    "diffusion_pytorch_model.safetensors) that decodes the samples to images. Default: "
                    "config.data.vae, else the VAE that imm_jax.encode recorded for the training data.")
flags.mark_flags_as_required(["workdir", "out"])


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _load_array(path: str, flag: str):
  import numpy as np
  if not os.path.exists(path):
    _fail(f"--{flag}={path}: file not found")
  try:
    return np.load(path, allow_pickle=False)
  except Exception as e:  # a corrupt or non-.npy file
    _fail(f"--{flag}={path}: not a readable .npy array ({e})")


def sample_to_file(workdir: str, out: str, *, steps: int, num: int, schedule: str | None = None,
                   mid_etas=None, sampler: str | None = None, cfg_scale: float | None = None, seed: int = 0,
                   noise=None, labels=None, batch_size: int = 256, checkpoint_step: int | None = None,
                   overwrite: bool = False, progress: bool = True, vae: str | None = None) -> dict:
  """Generate samples and write ``out`` (.npz) and, for image and point data, its PNG grid atomically.

  ``schedule`` / ``mid_etas`` / ``cfg_scale`` None: the config's ``sample`` section (mid_etas from the
  config only when the schedule is too). Returns the arrays.
  """
  import jax
  import numpy as np
  from tqdm import tqdm

  from imm_jax import checkpoints, images as images_lib, sampling
  from imm_jax import data as data_lib
  from imm_jax.builder import build_model
  from imm_jax.objectives import time_range
  from imm_jax.trainer import render

  if not out.endswith(".npz"):
    raise ValueError(f"--out={out} must end with .npz")
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f"--out={out} exists; choose another path or pass --overwrite")
  config = checkpoints.read_config(workdir)
  model = build_model(config)
  decoder = None
  if model.kind == "latent":  # SD-VAE latents: decode when a VAE is known (missing weights: one-line error)
    from imm_jax.data import latents as latents_lib
    if latents_lib.vae_path_for(config.data, vae):
      decoder = latents_lib.latent_decoder(config.data, vae_path=vae, option="--vae")
  variables, ckpt_step = checkpoints.restore_ema_variables(workdir, model.abstract_params(), checkpoint_step)
  params = variables.pop("params")
  sigma_d = model.precond.sigma_d
  key = jax.random.key(seed)
  k_noise, k_labels, k_restart = jax.random.split(key, 3)

  if noise is not None:
    noise = np.asarray(noise, np.float32)
    if noise.shape[1:] != model.input_shape:
      raise ValueError(f"--noise has shape {noise.shape}; this model needs (N, {', '.join(map(str, model.input_shape))})"
                       f" (NHWC for images)")
    num = noise.shape[0]
  else:
    noise = np.asarray(sampling.prior_noise(k_noise, (num,) + model.input_shape, sigma_d))
  if model.null_label is None:
    if labels is not None and np.any(np.asarray(labels) != 0):
      raise ValueError("--labels given but the model is unconditional (config.model.class_conditional=False)")
    labels = None
  elif labels is not None:
    labels = np.asarray(labels)
    if labels.shape != (num,) or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"--labels must be integer class ids of shape ({num},), got {labels.dtype} {labels.shape}")
    if labels.min() < 0 or labels.max() > model.num_classes:
      raise ValueError(f"--labels must lie in [0, {model.num_classes}] ({model.num_classes} = unconditional)")
    labels = labels.astype(np.int32)
  else:
    labels = np.asarray(jax.random.randint(k_labels, (num,), 0, model.num_classes), np.int32)

  eps, T = time_range(config)
  if sampler is None:
    sampler = str(config.sample.get("sampler", "pushforward"))
  if schedule is None:
    schedule = str(config.sample.get("schedule", "default"))
    if mid_etas is None:
      mid_etas = config.sample.get("mid_etas", ())
  times = sampling.make_schedule(schedule, steps, model.precond.interpolant, eps, T,
                                 mid_etas=[float(e) for e in (mid_etas or ())] or None)
  scale = float(config.sample.get("cfg_scale", 1.0) if cfg_scale is None else cfg_scale)
  guided = model.null_label is not None and scale != 1.0
  chunks = []
  for start in tqdm(range(0, num, batch_size), desc=f"sampling {steps} step(s)", unit="batch",
                    disable=not progress):
    sl = slice(start, min(start + batch_size, num))
    out_chunk = sampling.run_sampler(sampler, model.net, params, model.precond, noise[sl], times,
                                     None if labels is None else labels[sl], scale,
                                     jax.random.fold_in(k_restart, start), guided=guided,
                                     null_label=model.null_label, extra_variables=variables or None)
    chunks.append(np.asarray(jax.device_get(out_chunk), np.float32))
  samples = np.concatenate(chunks)
  result = {"samples": samples, "times": times, "step": np.int64(ckpt_step)}
  if labels is not None:
    result["labels"] = labels
  if model.kind == "image":
    result["images"] = data_lib.to_uint8(samples)
  elif decoder is not None:
    result["images"] = decoder(samples)
  _save_npz_atomic(out, result)
  if model.kind in ("image", "points"):
    images_lib.save_png(out[:-4] + ".png", render(model, samples[:256]))
  elif "images" in result:
    images_lib.save_png(out[:-4] + ".png", images_lib.make_grid(result["images"][:256]))
  return result


def _save_npz_atomic(path: str, arrays: dict):
  import numpy as np

  from imm_jax.io_utils import atomic_open
  with atomic_open(path, "wb") as f:
    np.savez(f, **arrays)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)
  noise = _load_array(FLAGS.noise, "noise") if FLAGS.noise else None
  labels = _load_array(FLAGS.labels, "labels") if FLAGS.labels else None
  try:
    result = sample_to_file(FLAGS.workdir, FLAGS.out, steps=FLAGS.steps, num=FLAGS.num,
                            schedule=FLAGS.schedule, mid_etas=FLAGS.mid_etas, sampler=FLAGS.sampler,
                            cfg_scale=FLAGS.cfg_scale, seed=FLAGS.seed, noise=noise, labels=labels,
                            batch_size=FLAGS.batch_size, checkpoint_step=FLAGS.checkpoint_step,
                            overwrite=FLAGS.overwrite, vae=FLAGS.vae)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    _fail(str(e))
  png = f" (and {FLAGS.out[:-4]}.png)" if os.path.exists(FLAGS.out[:-4] + ".png") else ""
  print(f"wrote {result['samples'].shape[0]} samples to {FLAGS.out}{png} "
        f"from checkpoint step {int(result['step'])}")


def dashes_to_underscores(argv: list[str], flag_values=FLAGS) -> list[str]:
  """``--cfg-scale=1.5`` -> ``--cfg_scale=1.5`` for every defined flag (absl knows only underscores)."""
  out = []
  for arg in argv:
    if arg.startswith("--") and "-" in arg.split("=", 1)[0][2:]:
      name, sep, value = arg[2:].partition("=")
      fixed = name.replace("-", "_")
      if fixed not in flag_values and fixed.startswith("no_") and fixed[3:] in flag_values:
        fixed = "no" + fixed[3:]  # --no-overwrite -> --nooverwrite
      if fixed in flag_values or (fixed.startswith("no") and fixed[2:] in flag_values):
        arg = f"--{fixed}{sep}{value}"
    out.append(arg)
  return out


def parse_flags(argv):
  """absl's flag parser, also accepting dashed flag names."""
  return FLAGS(dashes_to_underscores(argv))


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
