"""Sample a trained (or converted) model with its EMA parameters.

  python -m imm_jax.sample --workdir DIR --steps 2 --num 64 --out samples.npz
  python -m imm_jax.sample --workdir DIR --noise Z.npy --labels Y.npy --cfg-scale 1.5 \\
      --schedule uniform --steps 4 --out S.npz
  python -m imm_jax.sample --workdir DIR --steps 2 --num 50000 --out samples/      # sharded, resumable

Flags may be spelled with dashes or underscores (--cfg-scale / --cfg_scale). --schedule, --mid-etas and
--cfg-scale default to the workdir config's ``sample`` section (a converted ImageNet checkpoint: uniform,
w = 1.5). The .npz holds ``samples`` (float32, model space, before any decoding or clipping), ``labels``
and, for image data, ``images`` (uint8 NHWC); a PNG grid is written beside it (same name, .png) for image
and 2-D point data. Latent models (data kind 'latent', e.g. ImageNet SD-VAE latents) are decoded with the
SD-VAE given by --vae (or the one recorded with the data); without one they write the latents only.

An --out that does not end in .npz is a folder: the samples go to ``shard_NNNNN.npz`` files of
--shard-size examples (the same arrays as above plus ``index``), every image also as
``images/NNNNNNNN.png`` (the folder layout other FID tools read; --nopng to skip), and ``grid.png``.
Each batch is split over all local devices, hosts take shards in turn, and a killed run started again
skips the finished shards. Example ``i`` is drawn from noise seeded by (--seed, i), so its pushforward
sample is the same in a single file, in any shard layout and on any number of devices.
"""

from __future__ import annotations

import os

from absl import app, flags
from absl import logging as absl_logging

from imm_jax.io_utils import fail

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A workdir written by imm_jax.train or imm_jax.convert.")
flags.DEFINE_string("out", None, "Output .npz path (a PNG grid is written beside it), or a folder for "
                    "sharded sampling.")
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
flags.DEFINE_integer("batch_size", 256, "Samples per device in one sampler call.")
flags.DEFINE_integer("shard_size", 1000, "Sharded sampling (--out is a folder): samples per shard file.")
flags.DEFINE_bool("png", True, "Sharded sampling: also write every image as images/NNNNNNNN.png.")
flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step to load (default: latest).")
flags.DEFINE_bool("overwrite", False, "Replace --out if it exists (single .npz only).")
flags.DEFINE_string("vae", None, "Latent models: the SD-VAE folder (config.json + "
                    "diffusion_pytorch_model.safetensors) that decodes the samples to images. Default: "
                    "config.data.vae, else the VAE that imm_jax.encode recorded for the training data.")
flags.mark_flags_as_required(["workdir", "out"])


def _load_array(path: str, flag: str):
  import numpy as np
  if not os.path.exists(path):
    fail(f"--{flag}={path}: file not found")
  try:
    return np.load(path, allow_pickle=False)
  except Exception as e:  # a corrupt or non-.npy file
    fail(f"--{flag}={path}: not a readable .npy array ({e})")


def _check_labels(generator, labels, num: int):
  import numpy as np
  model = generator.model
  if model.null_label is None:
    if labels is not None and np.any(np.asarray(labels) != 0):
      raise ValueError("--labels given but the model is unconditional (config.model.class_conditional=False)")
    return None
  labels = np.asarray(labels)
  if labels.shape != (num,) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"--labels must be integer class ids of shape ({num},), got {labels.dtype} {labels.shape}")
  if labels.min() < 0 or labels.max() > model.num_classes:
    raise ValueError(f"--labels must lie in [0, {model.num_classes}] ({model.num_classes} = unconditional)")
  return labels.astype(np.int32)


def sample_to_file(workdir: str, out: str, *, steps: int, num: int, schedule: str | None = None,
                   mid_etas=None, sampler: str | None = None, cfg_scale: float | None = None, seed: int = 0,
                   noise=None, labels=None, batch_size: int = 256, checkpoint_step: int | None = None,
                   overwrite: bool = False, progress: bool = True, vae: str | None = None) -> dict:
  """Generate samples and write ``out`` (.npz) and, for image and point data, its PNG grid atomically.

  ``schedule`` / ``mid_etas`` / ``cfg_scale`` None: the config's ``sample`` section (mid_etas from the
  config only when the schedule is too). ``batch_size`` is per device. Returns the arrays.
  """
  import numpy as np
  from tqdm import tqdm

  from imm_jax import images as images_lib
  from imm_jax.generation import Generator, save_npz

  if not out.endswith(".npz"):
    raise ValueError(f"--out={out} must end with .npz")
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f"--out={out} exists; choose another path or pass --overwrite")
  generator = Generator(workdir, checkpoint_step=checkpoint_step, vae=vae)
  model = generator.model
  setting = generator.setting(steps, schedule=schedule, mid_etas=mid_etas, sampler=sampler,
                              cfg_scale=cfg_scale, seed=seed)
  if noise is not None:
    noise = np.asarray(noise, np.float32)
    if noise.shape[1:] != model.input_shape:
      raise ValueError(f"--noise has shape {noise.shape}; this model needs (N, {', '.join(map(str, model.input_shape))})"
                       f" (NHWC for images)")
    num = noise.shape[0]
  else:
    noise = generator.noise(seed, 0, num)
  labels = generator.labels(seed, 0, num) if labels is None else _check_labels(generator, labels, num)
  per_call = batch_size * len(generator.devices)
  chunks = []
  for start in tqdm(range(0, num, per_call), desc=f"sampling {steps} step(s)", unit="batch",
                    disable=not progress):
    sl = slice(start, min(start + per_call, num))
    chunks.append(generator.sample(setting, noise[sl], None if labels is None else labels[sl], start=start))
  samples = np.concatenate(chunks)
  result = {**generator.arrays(samples, labels), "times": generator.times(setting), "step": np.int64(generator.step)}
  save_npz(out, result)
  picture = generator.picture(samples, result.get("images"))
  if picture is not None:
    images_lib.save_png(out[:-4] + ".png", picture)
  return result


def sample_to_shards(workdir: str, out_dir: str, *, steps: int, num: int, schedule: str | None = None,
                     mid_etas=None, sampler: str | None = None, cfg_scale: float | None = None, seed: int = 0,
                     batch_size: int = 256, shard_size: int = 1000, png: bool = True,
                     checkpoint_step: int | None = None, progress: bool = True, vae: str | None = None) -> list[str]:
  """Sharded, resumable sampling of ``num`` examples into the folder ``out_dir`` (see the module
  docstring); returns the shard paths."""
  from imm_jax import images as images_lib
  from imm_jax.generation import Generator, write_shards

  generator = Generator(workdir, checkpoint_step=checkpoint_step, vae=vae)
  setting = generator.setting(steps, schedule=schedule, mid_etas=mid_etas, sampler=sampler,
                              cfg_scale=cfg_scale, seed=seed)

  def contents(start, samples, labels):
    arrays = generator.arrays(samples, labels)
    if png and "images" in arrays:  # before the shard file, which marks the shard finished
      for i, image in enumerate(arrays["images"]):
        images_lib.save_png(os.path.join(out_dir, "images", f"{start + i:08d}.png"), image)
    if start == 0:
      picture = generator.picture(samples, arrays.get("images"))
      if picture is not None:
        images_lib.save_png(os.path.join(out_dir, "grid.png"), picture)
    return arrays

  return write_shards(generator, setting, out_dir, num, shard_size=shard_size, batch_size=batch_size,
                      contents=contents, progress=progress, description=f"sampling {steps} step(s)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)
  sharded = not FLAGS.out.endswith(".npz")
  if sharded:  # several hosts share the shards (jax.distributed, as imm_jax.train starts it)
    from imm_jax import distributed
    distributed.initialize()
  if sharded and (FLAGS.noise or FLAGS.labels):
    fail(f"--noise / --labels need a single .npz --out (got the folder {FLAGS.out}): sharded sampling "
         "draws the noise from --seed")
  noise = _load_array(FLAGS.noise, "noise") if FLAGS.noise else None
  labels = _load_array(FLAGS.labels, "labels") if FLAGS.labels else None
  common = dict(steps=FLAGS.steps, num=FLAGS.num, schedule=FLAGS.schedule, mid_etas=FLAGS.mid_etas,
                sampler=FLAGS.sampler, cfg_scale=FLAGS.cfg_scale, seed=FLAGS.seed, batch_size=FLAGS.batch_size,
                checkpoint_step=FLAGS.checkpoint_step, vae=FLAGS.vae)
  try:
    if sharded:
      paths = sample_to_shards(FLAGS.workdir, FLAGS.out, shard_size=FLAGS.shard_size, png=FLAGS.png, **common)
      print(f"{FLAGS.num} samples in {len(paths)} shard(s) in {FLAGS.out}")
      return
    result = sample_to_file(FLAGS.workdir, FLAGS.out, noise=noise, labels=labels, overwrite=FLAGS.overwrite,
                            **common)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    fail(str(e))
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
