"""Evaluate a workdir: FID and Inception Score per sampling setting, and a metric that needs no download.

  python -m imm_jax.evaluate --workdir DIR --steps 1 2 4 8 --num 50000 --ref cifar10-32x32.npz
  python -m imm_jax.evaluate --workdir DIR --steps 1 2 4 8 --cfg-scale 1.5 --num 50000 \\
      --ref VIRTUAL_imagenet256_labeled.npz --vae sd-vae-ft-ema        # latent models: decoded images
  python -m imm_jax.evaluate --workdir workdirs/digits --steps 1 2 4 --num 2000   # no download
  python -m imm_jax.evaluate --workdir DIR --checkpoint-step all --steps 1 2 --num 10000 --ref REF.npz
  python -m imm_jax.evaluate ref --data configs/cifar10.py --out refs/cifar10-train.npz

Metrics (``--metrics``; default ``fid`` when ``--ref`` is given, else ``distance``):

* ``fid``: FID against ``--ref`` (EDM / ADM reference ``.npz`` with ``mu`` and ``sigma``) and the
  Inception Score, from the Flax FID Inception-v3 (imm_jax/evaluation/inception.py) with the
  ``pt_inception-2015-12-05`` weights given by ``--inception`` (a .pth or converted .npz), found at
  the default location, or fetched with ``--download``.
* ``distance``: for data where Inception makes no sense or cannot be had offline (the built-in
  digits, toy2d): the energy distance and RBF MMD^2 (imm_jax/evaluation/distances.py, unbiased, 0 for
  equal distributions) between the first ``--distance-num`` samples and the workdir dataset's held-out
  examples, on flattened model-space values; the same figures the trainer logs as ``eval/energy_*``.

Every (steps, guidance) setting is sampled into ``DIR/eval/<tag>/shard_NNNNN.npz`` (imm_jax/generation.py:
all local devices, hosts in turn, resumable: a finished shard is never recomputed; each shard keeps the
Inception features and logits or the samples the metrics need), then reported in ``DIR/eval/<tag>.json``
with a sample grid ``DIR/eval/<tag>.png``. ``<tag>`` names the checkpoint step, the setting and N, so a
rerun of the same command reuses the shards and reports the same numbers.

Over training: a report computed for the first time also goes to TensorBoard and ``metrics.jsonl`` in
``DIR/eval`` at its checkpoint's training step, and ``DIR/eval/curves.png`` plots FID and energy
distance against the training step. ``--checkpoint-step all`` evaluates every checkpoint the workdir
keeps, oldest first; ``--watch`` then follows a running training until the checkpoint at its last step.

``ref`` computes reference statistics in the EDM format for any dataset the trainer reads: ``--data``
is a workdir (its training data), a config file (``configs/cifar10.py[:variant]``), or a folder /
``.npy`` / ``.npz`` of images (with ``--image-size``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from typing import Sequence

import numpy as np

from imm_jax.io_utils import fail

METRICS = ("fid", "distance")

__all__ = ["evaluate", "evaluate_checkpoints", "log_results", "write_curves", "best_checkpoints",
           "compute_reference", "main", "METRICS"]


class _UsageError(ValueError):
  """Bad command-line input (reported as one line)."""


def _eval_dir(workdir: str, out_dir: str | None) -> str:
  return out_dir or os.path.join(workdir, "eval")


def _inception_fingerprint(variables) -> str:
  import jax
  leaves = jax.tree.leaves(variables)
  return f"{len(leaves)}:{float(np.sum(np.asarray(leaves[0], np.float64))):.9e}"


def _resolve_metrics(metrics: Sequence[str] | None, ref: str | None) -> tuple[str, ...]:
  metrics = tuple(metrics or (("fid",) if ref else ("distance",)))
  unknown = sorted(set(metrics) - set(METRICS))
  if unknown:
    raise _UsageError(f"--metrics {' '.join(unknown)}: unknown; choose from {' '.join(METRICS)}")
  if "fid" in metrics and not ref:
    raise _UsageError("--metrics fid needs --ref REF.npz (reference statistics: EDM's fid-refs, ADM's "
                      "reference batches, or python -m imm_jax.evaluate ref --data ... --out REF.npz)")
  return metrics


def evaluate(workdir: str, steps: Sequence[int] = (1, 2, 4, 8), *, num: int = 50_000, ref: str | None = None,
             metrics: Sequence[str] | None = None, cfg_scales: Sequence[float | None] = (None,),
             schedule: str | None = None, mid_etas=None, sampler: str | None = None, seed: int = 0,
             batch_size: int = 256, shard_size: int = 1000, checkpoint_step: int | None = None,
             inception: str | None = None, download: bool = False, extractor=None, distance_num: int = 5000,
             vae: str | None = None, out_dir: str | None = None, progress: bool = True) -> list[dict]:
  """Sample ``num`` examples per (steps, cfg scale) and report ``metrics``; returns one dict per setting
  (also written to ``<out_dir>/<tag>.json`` by process 0). ``extractor``: an
  :class:`~imm_jax.evaluation.fid.InceptionExtractor` to use instead of loading ``inception``.

  A report written for the first time also goes to TensorBoard and ``<out_dir>/metrics.jsonl`` at the
  checkpoint's training step (:func:`log_results`), and ``<out_dir>/curves.png`` is drawn again
  (:func:`write_curves`)."""
  import jax

  from imm_jax import images as images_lib
  from imm_jax.data import pipeline as pipeline_lib
  from imm_jax.evaluation import distances, fid as fid_lib
  from imm_jax.generation import Generator, read_shards, write_shards
  from imm_jax.io_utils import atomic_open

  metrics = _resolve_metrics(metrics, ref)
  # Everything that can fail without sampling fails first: workdir, reference, weights, held-out data.
  generator = Generator(workdir, checkpoint_step=checkpoint_step, vae=vae, require_images="fid" in metrics)
  model = generator.model
  ref_stats, eval_x, fingerprint = None, None, None
  if "fid" in metrics:
    if model.kind == "points":
      raise _UsageError(f"{workdir} models 2-D points: FID needs images; use --metrics distance")
    ref_stats = fid_lib.load_statistics(ref)
    if extractor is None:
      extractor = fid_lib.InceptionExtractor(weights=inception, allow_download=download,
                                             batch_size=min(fid_lib.BATCH_SIZE, shard_size),
                                             devices=generator.devices)
    fingerprint = _inception_fingerprint(extractor.variables)
  if "distance" in metrics:
    if generator.config.data.name == "none":
      raise _UsageError(f"{workdir} has no dataset to hold out (a converted checkpoint): use --metrics fid "
                        "--ref REF.npz")
    eval_x, _ = pipeline_lib.load_eval_set(generator.config.data, distance_num, seed=int(generator.config.seed))
  distance_num = min(distance_num, num)

  out_dir = _eval_dir(workdir, out_dir)
  results, new = [], []
  for scale in cfg_scales:
    for n_steps in steps:
      setting = generator.setting(int(n_steps), schedule=schedule, mid_etas=mid_etas, sampler=sampler,
                                  cfg_scale=scale, seed=seed)
      tag = f"ckpt{generator.step}_{setting.name()}_n{num}"
      shard_dir = os.path.join(out_dir, tag)
      grid_path = os.path.join(out_dir, tag + ".png")

      def contents(start, samples, labels, setting=setting, grid_path=grid_path):
        arrays = {} if labels is None else {"labels": labels}
        if "distance" in metrics:  # only the samples the distance uses
          arrays["samples"] = samples[:max(0, distance_num - start)]
        images = generator.to_images(samples) if "fid" in metrics or start == 0 else None
        if "fid" in metrics:
          arrays["features"], arrays["logits"] = extractor(images)
        if start == 0:
          picture = generator.picture(samples, images)
          if picture is not None:
            images_lib.save_png(grid_path, picture)
        return arrays

      t0 = time.time()
      record_extra = dict(metrics=sorted(metrics), inception=fingerprint,
                          distance_num=distance_num if "distance" in metrics else None)
      paths = write_shards(generator, setting, shard_dir, num, shard_size=shard_size, batch_size=batch_size,
                           contents=contents, progress=progress, description=f"{tag}",
                           extra_settings=record_extra)
      if jax.process_index() != 0:
        continue
      figures = {}
      if "fid" in metrics:
        stats = fid_lib.RunningStatistics(None)
        logits = []
        for path in paths:  # one shard at a time: 50k x 2048 features never all in memory
          part = read_shards([path], ("features", "logits"))
          stats.update(part["features"])
          logits.append(part["logits"])
        mu, sigma = stats.statistics()
        figures["fid"] = fid_lib.fid_from_statistics(mu, sigma, *ref_stats)
        figures["is_mean"], figures["is_std"] = fid_lib.inception_score(np.concatenate(logits),
                                                                        splits=min(10, num))
      if "distance" in metrics:
        flat = read_shards(paths, ("samples",))["samples"].reshape(distance_num, -1)
        ref_flat = eval_x.reshape(eval_x.shape[0], -1)
        figures["energy_distance"] = distances.energy_distance(flat, ref_flat)
        figures["mmd_rbf"] = distances.mmd_rbf(flat, ref_flat)
      result = dict(
          tag=tag, workdir=os.path.abspath(workdir), checkpoint_step=int(generator.step), num=int(num),
          setting=dict(dataclasses.asdict(setting), mid_etas=list(setting.mid_etas),
                       times=[float(t) for t in generator.times(setting)]),
          metrics=figures, ref=os.path.abspath(ref) if ref else None,
          distance=(dict(num_samples=distance_num, num_reference=int(eval_x.shape[0]),
                         space="model space, flattened") if eval_x is not None else None),
          shards=len(paths), grid=grid_path if os.path.exists(grid_path) else None,
          seconds=round(time.time() - t0, 1), date=datetime.datetime.now().isoformat(timespec="seconds"))
      report = os.path.join(out_dir, tag + ".json")
      if not os.path.exists(report):
        new.append(result)
      with atomic_open(report, "w") as f:
        json.dump(result, f, indent=1)
      results.append(result)
  if new:
    log_results(out_dir, new)
    write_curves(out_dir)
  return results


def _label(tag: str) -> str:
  """A report's tag without its checkpoint: ``ckpt400000_2step_..._n50000`` -> ``2step_..._n50000``."""
  return tag.split("_", 1)[1]


def log_results(out_dir: str, results: Sequence[dict]):
  """Reports into TensorBoard and ``<out_dir>/metrics.jsonl``, at each one's checkpoint step: the
  figures as scalars ``<metric>/<setting>`` (e.g. ``fid/2step_default_pushforward_cfg1.5_seed0_n50000``),
  the sample grid as image ``samples/<setting>``."""
  from PIL import Image

  from imm_jax.writers import MetricWriter

  writer = MetricWriter(out_dir)
  try:
    for r in results:
      label, step = _label(r["tag"]), int(r["checkpoint_step"])
      writer.write_scalars(step, {f"{k}/{label}": v for k, v in r["metrics"].items()})
      if r.get("grid"):
        with Image.open(r["grid"]) as picture:
          writer.write_images(step, {f"samples/{label}": np.asarray(picture.convert("RGB"))})
  finally:
    writer.close()


CURVES_FILE = "curves.png"
_CURVE_METRICS = (("fid", "FID"), ("energy_distance", "energy distance"))


def write_curves(out_dir: str) -> str | None:
  """``<out_dir>/curves.png``: FID and energy distance against the training step, one line per setting
  (steps, schedule, sampler, guidance, seed, N), from every report in ``out_dir``. Returns its path, or
  None (nothing written) while no setting has been evaluated at two checkpoints."""
  import glob

  from imm_jax import images as images_lib

  series: dict[str, dict[str, dict[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(out_dir, "ckpt*_*.json"))):
    with open(path) as f:
      r = json.load(f)
    for key, _ in _CURVE_METRICS:
      value = r.get("metrics", {}).get(key)
      if value is not None and np.isfinite(value) and value > 0:
        series.setdefault(key, {}).setdefault(_label(r["tag"]), {})[int(r["checkpoint_step"])] = value
  panels = [images_lib.line_chart(series[key], title=f"{name} vs training step (y: log scale)")
            for key, name in _CURVE_METRICS
            if any(len(points) > 1 for points in series.get(key, {}).values())]
  if not panels:
    return None
  return images_lib.save_png(os.path.join(out_dir, CURVES_FILE), images_lib.side_by_side(panels))


def evaluate_checkpoints(workdir: str, steps: Sequence[int] = (1, 2, 4, 8), *, watch: bool = False,
                         poll_seconds: float = 60.0, ref: str | None = None, metrics: Sequence[str] | None = None,
                         inception: str | None = None, download: bool = False, extractor=None,
                         out_dir: str | None = None, progress: bool = True, **kwargs) -> list[dict]:
  """:func:`evaluate` at every checkpoint ``workdir`` keeps, oldest first: how the figures move over
  training (TensorBoard, ``<out_dir>/curves.png``). A checkpoint evaluated before costs only reading
  its shards back.

  ``watch``: then wait for the checkpoints a running training writes (looking every ``poll_seconds``)
  and evaluate each, until the one at the run's ``num_steps``; the workdir may not hold a checkpoint
  yet. Which checkpoints survive is ``config.checkpoint.keep`` / ``keep_period``; one deleted before its
  turn is skipped with a note. The reference statistics and Inception weights are loaded first, so
  they fail at once rather than at the first checkpoint.
  """
  import jax

  from imm_jax import checkpoints
  from imm_jax.evaluation import fid as fid_lib

  metrics = _resolve_metrics(metrics, ref)
  if "fid" in metrics:
    fid_lib.load_statistics(ref)
    if extractor is None:
      extractor = fid_lib.InceptionExtractor(
          weights=inception, allow_download=download, devices=jax.local_devices(),
          batch_size=min(fid_lib.BATCH_SIZE, int(kwargs.get("shard_size", fid_lib.BATCH_SIZE))))
  is_main = jax.process_index() == 0
  done: set[int] = set()
  results: list[dict] = []
  waiting = False  # said so already
  while True:
    available = _agree_on_steps(checkpoints.saved_steps(workdir))
    if not available and not watch:
      raise FileNotFoundError(checkpoints.no_checkpoint_message(workdir))
    todo = [step for step in available if step not in done]
    for step in todo:
      try:
        part = evaluate(workdir, steps, ref=ref, metrics=metrics, extractor=extractor, checkpoint_step=step,
                        out_dir=out_dir, progress=progress, **kwargs)
      except Exception:  # a checkpoint that vanished while it was read is the trainer's retention
        if step in checkpoints.saved_steps(workdir):
          raise
        if is_main:
          print(f"checkpoint {step} was deleted before its turn (config.checkpoint.keep / keep_period); "
                "skipped", flush=True)
        part = []
      done.add(step)
      results.extend(part)
      if part and progress:
        print(format_table(part), flush=True)
    if not watch:
      return results
    final = _final_step(workdir)
    if final is not None and any(step >= final for step in done):
      return results
    if todo:
      waiting = False
      continue
    if is_main and progress and not waiting:
      last = f"after step {max(done)} " if done else ""
      print(f"waiting for checkpoints of {workdir} {last}(looking every {poll_seconds:g} s; the run ends at "
            f"step {final if final is not None else '?'})", flush=True)
    waiting = True
    _wait(poll_seconds)


def _wait(seconds: float):
  time.sleep(seconds)


def _final_step(workdir: str) -> int | None:
  """The run's last step (``num_steps`` of its config.json; None before training has written it)."""
  from imm_jax import checkpoints

  if not os.path.exists(os.path.join(workdir, checkpoints.CONFIG_FILE)):
    return None
  return int(checkpoints.read_config(workdir).num_steps)


def _agree_on_steps(steps: list[int], limit: int = 1024) -> list[int]:
  """Process 0's list of checkpoint steps on every process (hosts may list a folder that is being
  written at slightly different moments); at most ``limit`` steps at a time."""
  import jax

  if jax.process_count() == 1:
    return steps
  from jax.experimental import multihost_utils

  buf = np.full(limit, -1, np.int32)
  buf[:min(len(steps), limit)] = steps[:limit]
  buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return [int(step) for step in buf if step >= 0]


def best_checkpoints(results: Sequence[dict]) -> list[str]:
  """One line per setting evaluated at two or more checkpoints: its lowest FID (energy distance when
  there is no FID) and the checkpoint that has it, e.g. ``2step_default_pushforward_cfg1_seed0_n10000:
  fid 3.21 at checkpoint 350000 (of 8)``."""
  by_setting: dict[str, list[dict]] = {}
  for r in results:
    by_setting.setdefault(_label(r["tag"]), []).append(r)
  lines = []
  for label, runs in by_setting.items():
    key = next((k for k, _ in _CURVE_METRICS if all(k in r["metrics"] for r in runs)), None)
    if key is None or len(runs) < 2:
      continue
    best = min(runs, key=lambda r: r["metrics"][key])
    lines.append(f"{label}: {key} {best['metrics'][key]:.4g} at checkpoint {best['checkpoint_step']} "
                 f"(of {len(runs)})")
  return lines


def format_table(results: Sequence[dict]) -> str:
  """The results as a Markdown table (one row per setting)."""
  keys = [k for k in ("fid", "is_mean", "energy_distance", "mmd_rbf") if any(k in r["metrics"] for r in results)]
  lines = ["| checkpoint | steps | cfg | sampler | schedule | N | " + " | ".join(keys) + " |",
           "|---" * (6 + len(keys)) + "|"]
  for r in results:
    s = r["setting"]
    values = " | ".join(f"{r['metrics'][k]:.4g}" if k in r["metrics"] else "" for k in keys)
    lines.append(f"| {r['checkpoint_step']} | {s['steps']} | {s['cfg_scale']:g} | {s['sampler']} | "
                 f"{s['schedule']} | {r['num']} | {values} |")
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Reference statistics


def _data_config(data: str, image_size: int | None):
  """The ``config.data`` a ``--data`` value names (see the module docstring)."""
  from imm_jax import checkpoints
  from imm_jax.config_base import base_config
  from imm_jax.configs_loader import CONFIG_DIR, load_config

  path = os.path.expanduser(data)
  if os.path.isdir(path) and os.path.exists(os.path.join(path, checkpoints.CONFIG_FILE)):
    return checkpoints.read_config(path).data
  spec, _, arg = data.partition(":")
  if spec.endswith(".py") or os.path.exists(os.path.join(CONFIG_DIR, spec + ".py")):
    return load_config(spec, arg).data
  if os.path.isdir(path) or path.endswith((".npy", ".npz")):
    if not os.path.exists(path):
      raise _UsageError(f"--data={data}: file not found")
    if image_size is None:
      raise _UsageError(f"--data={data} is a folder or array of images: give --image-size (e.g. 32 or 256)")
    cfg = base_config().data
    cfg.update(name="images", path=path, image_size=int(image_size), holdout_fraction=0.0)
    return cfg
  raise _UsageError(f"--data={data}: not a workdir (no {checkpoints.CONFIG_FILE}), config file, image folder "
                    "or .npy/.npz; see python -m imm_jax.evaluate ref --help")


def reference_images(data_cfg, *, split: str = "train", num: int | None = None, chunk: int = 500):
  """uint8 NHWC batches of a dataset's ``split`` ('train' or 'eval': the held-out part), first ``num``."""
  from imm_jax.data import pipeline as pipeline_lib
  from imm_jax.data import sources

  resolved = sources.resolve(data_cfg, need_train=split == "train", need_eval=split == "eval")
  if resolved.info.kind == "points":
    raise _UsageError(f"--data: {resolved.info.name} is 2-D points; FID needs images")
  if resolved.info.kind == "latent":
    raise _UsageError("--data: reference statistics come from images, not latents: give the image folder the "
                      "latents were encoded from (--data DIR --image-size 256) or use ADM's "
                      "VIRTUAL_imagenet256_labeled.npz")
  source = resolved.train if split == "train" else resolved.holdout
  total = len(source) if num is None else min(int(num), len(source))
  if total < 2:
    raise _UsageError(f"--data: {resolved.info.name} split {split!r} has {len(source)} examples; need >= 2")
  for start in range(0, total, chunk):
    batch = resolved.to_model_space(source.gather(np.arange(start, min(start + chunk, total))))
    yield pipeline_lib.to_uint8(batch["x"])


def compute_reference(data: str, out: str, *, split: str = "train", num: int | None = None,
                      image_size: int | None = None, inception: str | None = None, download: bool = False,
                      extractor=None, batch_size: int = 250, progress: bool = True) -> dict:
  """Reference statistics (EDM ``.npz``: ``mu``, ``sigma``, plus ``count``) of ``--data`` into ``out``."""
  from imm_jax.evaluation import fid as fid_lib

  if not out.endswith(".npz"):
    raise _UsageError(f"--out={out} must end with .npz")
  data_cfg = _data_config(data, image_size)
  if extractor is None:
    extractor = fid_lib.InceptionExtractor(weights=inception, allow_download=download, batch_size=batch_size)
  mu, sigma, logits = extractor.statistics(reference_images(data_cfg, split=split, num=num), progress=progress)
  fid_lib.save_statistics(out, mu, sigma, count=np.int64(logits.shape[0]))
  return dict(out=out, count=int(logits.shape[0]), is_mean=fid_lib.inception_score(logits, min(10, len(logits)))[0])


# --------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m imm_jax.evaluate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="A workdir written by imm_jax.train or imm_jax.convert.")
  p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8], help="Step counts to evaluate.")
  p.add_argument("--num", type=int, default=50_000, help="Samples per setting (FID-50K: 50000).")
  p.add_argument("--ref", help="Reference statistics .npz (mu, sigma), e.g. EDM's cifar10-32x32.npz.")
  p.add_argument("--metrics", nargs="+", choices=METRICS, help="Default: fid with --ref, else distance.")
  p.add_argument("--cfg-scale", type=float, nargs="+", default=[None],
                 help="Guidance scale(s) w (default: the config's sample.cfg_scale).")
  p.add_argument("--schedule", choices=["default", "uniform", "edm", "explicit"])
  p.add_argument("--mid-etas", type=float, nargs="*", help="Mid-point etas for --schedule explicit.")
  p.add_argument("--sampler", choices=["pushforward", "restart", "euler", "heun", "ancestral"])
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch-size", type=int, default=256, help="Samples per device in one sampler call.")
  p.add_argument("--shard-size", type=int, default=1000, help="Samples per shard (the unit of resumption).")
  p.add_argument("--checkpoint-step", type=_checkpoint_step, help="Checkpoint step (default: latest), or "
                 "'all': every checkpoint the workdir keeps, oldest first (figures over training: "
                 "TensorBoard and OUT_DIR/curves.png).")
  p.add_argument("--watch", action="store_true", help="--checkpoint-step all, then evaluate each checkpoint "
                 "a running training writes, until the one at its last step.")
  p.add_argument("--poll-seconds", type=float, default=60.0, help="--watch: how often to look for new "
                 "checkpoints.")
  p.add_argument("--inception", help="FID Inception weights (pt_inception-2015-12-05-6726825d.pth or .npz).")
  p.add_argument("--download", action="store_true", help="Fetch the Inception weights if missing.")
  p.add_argument("--distance-num", type=int, default=5000, help="Samples (and held-out examples) used by "
                 "the distance metric.")
  p.add_argument("--vae", help="Latent models: the SD-VAE folder that decodes samples to images.")
  p.add_argument("--out-dir", help="Where shards, JSON and grids go (default: WORKDIR/eval).")
  return p


def _checkpoint_step(value: str):
  if value == "all":
    return value
  try:
    return int(value)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a step number or 'all', got {value!r}") from None


def _ref_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m imm_jax.evaluate ref",
                              description="Reference statistics (EDM .npz: mu, sigma) of a dataset.")
  p.add_argument("--data", required=True, help="A workdir, a config file (configs/X.py[:variant]) or a "
                 "folder / .npy / .npz of images.")
  p.add_argument("--out", required=True, help="Output .npz.")
  p.add_argument("--split", choices=["train", "eval"], default="train",
                 help="train (as EDM's refs), or eval: the held-out part.")
  p.add_argument("--num", type=int, help="Use the first N examples (default: all).")
  p.add_argument("--image-size", type=int, help="Image folders / arrays: the size to resize to.")
  p.add_argument("--inception", help="FID Inception weights (.pth or .npz).")
  p.add_argument("--download", action="store_true", help="Fetch the Inception weights if missing.")
  p.add_argument("--batch-size", type=int, default=250)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  from imm_jax.evaluation.fid import StatisticsError
  from imm_jax.evaluation.inception import InceptionWeightsError
  errors = (_UsageError, ValueError, FileNotFoundError, FileExistsError, StatisticsError, InceptionWeightsError)
  if argv[:1] == ["ref"]:
    args = _ref_parser().parse_args(argv[1:])
    try:
      info = compute_reference(args.data, args.out, split=args.split, num=args.num, image_size=args.image_size,
                               inception=args.inception, download=args.download, batch_size=args.batch_size)
    except errors as e:
      fail(str(e))
    print(f"wrote reference statistics of {info['count']} images to {info['out']} (IS {info['is_mean']:.3f})")
    return 0
  args = _parser().parse_args(argv)
  from imm_jax import distributed
  distributed.initialize()
  options = dict(num=args.num, ref=args.ref, metrics=args.metrics, cfg_scales=args.cfg_scale,
                 schedule=args.schedule, mid_etas=args.mid_etas, sampler=args.sampler, seed=args.seed,
                 batch_size=args.batch_size, shard_size=args.shard_size, inception=args.inception,
                 download=args.download, distance_num=args.distance_num, vae=args.vae, out_dir=args.out_dir)
  over_training = args.watch or args.checkpoint_step == "all"
  try:
    if args.watch and args.checkpoint_step not in (None, "all"):
      raise _UsageError(f"--watch evaluates every checkpoint: drop --checkpoint-step {args.checkpoint_step}")
    if args.poll_seconds <= 0:
      raise _UsageError(f"--poll-seconds={args.poll_seconds:g}: must be > 0")
    if over_training:
      results = evaluate_checkpoints(args.workdir, args.steps, watch=args.watch, poll_seconds=args.poll_seconds,
                                     **options)
    else:
      results = evaluate(args.workdir, args.steps, checkpoint_step=args.checkpoint_step, **options)
  except errors as e:
    fail(str(e))
  out_dir = _eval_dir(args.workdir, args.out_dir)
  if results:
    if not over_training:  # evaluate_checkpoints printed each checkpoint's table as it finished
      print(format_table(results))
    best = best_checkpoints(results)
    if best:
      print("best checkpoint per setting:\n  " + "\n  ".join(best))
    print(f"results in {out_dir}/<tag>.json and <tag>.png; TensorBoard: tensorboard --logdir {out_dir}")
    if os.path.exists(os.path.join(out_dir, CURVES_FILE)):
      print(f"figures against the training step: {os.path.join(out_dir, CURVES_FILE)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
