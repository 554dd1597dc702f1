"""Sampling a workdir at scale: what ``imm_jax.sample`` and ``imm_jax.evaluate`` share.

* :class:`Generator`: a workdir's EMA network (trained, or converted from the authors' checkpoints) on
  this host's devices: the batch of every sampler call is split over the local devices, the parameters
  are replicated.
* :class:`Setting`: one sampling setting (steps, schedule, sampler, guidance, seed), with the defaults
  of the workdir config's ``sample`` section filled in.
* Per-example randomness: the prior noise and random label of example ``i`` come from
  ``fold_in(key(seed), i)``, so an example's pushforward sample is the same whatever the batch size,
  shard size, device or host count, and a resumed run continues the exact same stream. (The restart and
  ancestral samplers draw fresh noise per batch from ``fold_in(key, first index of the batch)``: their
  samples depend on the batch layout, which a shard folder's ``settings.json`` pins.)
* :func:`write_shards`: N samples as numbered ``.npz`` shards written atomically, resumable: a shard
  whose file exists is never recomputed; hosts take shards round-robin; a folder made with other
  settings is refused rather than mixed.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from imm_jax import checkpoints, images as images_lib, sampling
from imm_jax import data as data_lib
from imm_jax.builder import build_model
from imm_jax.io_utils import atomic_open
from imm_jax.objectives import time_range

SETTINGS_FILE = "settings.json"
SHARD_PATTERN = "shard_{:05d}.npz"

__all__ = ["Generator", "Setting", "write_shards", "read_shards", "shard_paths", "save_npz",
           "SETTINGS_FILE"]


@dataclasses.dataclass(frozen=True)
class Setting:
  """One way of sampling: ``schedule`` / ``mid_etas`` / ``sampler`` / ``cfg_scale`` are resolved
  (never None) by :meth:`Generator.setting`."""
  steps: int
  schedule: str
  mid_etas: tuple[float, ...]
  sampler: str
  cfg_scale: float
  seed: int

  def name(self) -> str:
    """A file-name-safe label, e.g. ``2step_default_pushforward_cfg1.5_seed0``."""
    etas = ("-" + "-".join(f"{e:g}" for e in self.mid_etas)) if self.mid_etas else ""
    return (f"{self.steps}step_{self.schedule}{etas}_{self.sampler}_cfg{self.cfg_scale:g}_"
            f"seed{self.seed}")


def save_npz(path: str, arrays: dict):
  """``np.savez`` written atomically (a crash never leaves a truncated file under ``path``)."""
  with atomic_open(path, "wb") as f:
    np.savez(f, **arrays)


class Generator:
  """The EMA network of ``workdir`` (checkpoint ``checkpoint_step``, default latest), ready to sample.

  ``vae``: latent models only: the SD-VAE folder that decodes samples to images (default: the one the
  data config or the encoded dataset records). Without one, :meth:`to_images` returns None for latents;
  ``require_images=True`` makes a missing VAE a one-line error instead.
  """

  def __init__(self, workdir: str, *, checkpoint_step: int | None = None, vae: str | None = None,
               require_images: bool = False, devices: Sequence[Any] | None = None):
    self.workdir = workdir
    self.config = checkpoints.read_config(workdir)
    self.model = build_model(self.config)
    self.decoder = None
    if self.model.kind == "latent":
      from imm_jax.data import latents as latents_lib
      if require_images or latents_lib.vae_path_for(self.config.data, vae):
        self.decoder = latents_lib.latent_decoder(self.config.data, vae_path=vae, option="--vae")
    variables, self.step = checkpoints.restore_ema_variables(workdir, self.model.abstract_params(),
                                                             checkpoint_step)
    self.devices = list(devices) if devices is not None else jax.local_devices()
    mesh = Mesh(np.array(self.devices), ("batch",))
    self._batch_sharding = NamedSharding(mesh, PartitionSpec("batch"))
    replicated = NamedSharding(mesh, PartitionSpec())
    variables = jax.device_put(variables, replicated)
    self.params = variables.pop("params")
    self.extra_variables = variables or None
    self.eps, self.T = time_range(self.config)

  # ----------------------------------------------------------------------------------------------
  # Settings

  def setting(self, steps: int, *, schedule: str | None = None, mid_etas=None, sampler: str | None = None,
              cfg_scale: float | None = None, seed: int = 0) -> Setting:
    """A :class:`Setting` with the config's ``sample`` defaults for what is None (``mid_etas`` from the
    config only when the schedule is too); the schedule is checked here (one-line errors)."""
    cfg = self.config.sample
    if sampler is None:
      sampler = str(cfg.get("sampler", "pushforward"))
    if sampler not in sampling.SAMPLER_CHOICES:
      raise ValueError(f"unknown sampler {sampler!r} (--sampler): choose one of {sampling.SAMPLER_CHOICES}")
    if schedule is None:
      schedule = str(cfg.get("schedule", "default"))
      if mid_etas is None:
        mid_etas = cfg.get("mid_etas", ())
    scale = float(cfg.get("cfg_scale", 1.0) if cfg_scale is None else cfg_scale)
    if self.model.null_label is None:
      scale = 1.0  # unconditional: guidance has no meaning
    setting = Setting(int(steps), schedule, tuple(float(e) for e in (mid_etas or ())), sampler, scale, int(seed))
    self.times(setting)
    return setting

  def times(self, setting: Setting) -> np.ndarray:
    return sampling.make_schedule(setting.schedule, setting.steps, self.model.precond.interpolant, self.eps,
                                  self.T, mid_etas=list(setting.mid_etas) or None)

  # ----------------------------------------------------------------------------------------------
  # Per-example randomness

  def _keys(self, seed: int):
    return jax.random.split(jax.random.key(seed), 3)  # noise, labels, sampler noise

  def noise(self, seed: int, start: int, count: int) -> np.ndarray:
    """Prior noise of examples ``start .. start + count - 1`` (float32, model space)."""
    return np.asarray(_example_noise(self._keys(seed)[0], start, count, self.model.input_shape,
                                     float(self.model.precond.sigma_d)))

  def labels(self, seed: int, start: int, count: int) -> np.ndarray | None:
    """Random class ids of examples ``start ..`` (None for unconditional models)."""
    if self.model.null_label is None:
      return None
    return np.asarray(_example_labels(self._keys(seed)[1], start, count, self.model.num_classes))

  def sampler_rng(self, seed: int, start: int):
    return jax.random.fold_in(self._keys(seed)[2], start)

  # ----------------------------------------------------------------------------------------------
  # Sampling

  def sample(self, setting: Setting, noise: np.ndarray, labels: np.ndarray | None, *, start: int = 0,
             batch_size: int | None = None) -> np.ndarray:
    """float32 model-space samples from ``noise``, ``batch_size`` (default: all) at a time, each batch
    padded to a multiple of the local device count and split over the devices."""
    times = self.times(setting)
    guided = self.model.guided(setting.cfg_scale)
    n = noise.shape[0]
    ndev = len(self.devices)
    batch_size = n if batch_size is None else batch_size
    out = []
    for b in range(0, n, batch_size):
      x = np.asarray(noise[b:b + batch_size], np.float32)
      y = None if labels is None else np.asarray(labels[b:b + batch_size], np.int32)
      m = x.shape[0]
      pad = (-m) % ndev
      if pad:
        x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
        y = None if y is None else np.concatenate([y, np.zeros((pad,), y.dtype)])
      x = jax.device_put(x, self._batch_sharding)
      y = None if y is None else jax.device_put(y, self._batch_sharding)
      result = sampling.run_sampler(setting.sampler, self.model.net, self.params, self.model.precond, x, times,
                                    y, setting.cfg_scale, self.sampler_rng(setting.seed, start + b),
                                    guided=guided, null_label=self.model.null_label,
                                    extra_variables=self.extra_variables)
      out.append(np.asarray(jax.device_get(result), np.float32)[:m])
    return np.concatenate(out) if out else np.zeros((0,) + self.model.input_shape, np.float32)

  def to_images(self, samples: np.ndarray) -> np.ndarray | None:
    """uint8 NHWC images of model-space samples (pixels, or decoded latents); None for points and for
    latents without a VAE."""
    if self.model.kind == "image":
      return data_lib.to_uint8(samples)
    if self.decoder is not None:
      return self.decoder(samples)
    return None

  def arrays(self, samples: np.ndarray, labels: np.ndarray | None) -> dict[str, np.ndarray]:
    """What a sample file holds: ``samples`` (float32, model space), ``labels`` (conditional models),
    ``images`` (uint8 NHWC, when :meth:`to_images` gives them)."""
    arrays = {"samples": samples}
    if labels is not None:
      arrays["labels"] = labels
    images = self.to_images(samples)
    if images is not None:
      arrays["images"] = images
    return arrays

  def picture(self, samples: np.ndarray, images: np.ndarray | None = None) -> np.ndarray | None:
    """A PNG-ready picture: a grid of the first 64 images (small ones enlarged), or a scatter plot of
    up to 4096 points; None for latents without a VAE."""
    from imm_jax.trainer import render
    if self.model.kind == "points":
      return render(self.model, samples[:4096])
    if self.model.kind == "image":
      return render(self.model, samples[:64])
    return None if images is None else images_lib.make_grid(images[:64])


@functools.partial(jax.jit, static_argnames=("count", "shape"))
def _example_noise(key, start, count: int, shape: tuple[int, ...], sigma_d: float):
  idx = start + jnp.arange(count, dtype=jnp.uint32)
  return jax.vmap(lambda i: sampling.prior_noise(jax.random.fold_in(key, i), shape, sigma_d))(idx)


@functools.partial(jax.jit, static_argnames=("count", "num_classes"))
def _example_labels(key, start, count: int, num_classes: int):
  idx = start + jnp.arange(count, dtype=jnp.uint32)
  return jax.vmap(lambda i: jax.random.randint(jax.random.fold_in(key, i), (), 0, num_classes))(idx).astype(
      jnp.int32)


# --------------------------------------------------------------------------------------------------
# Shards


def shard_paths(out_dir: str) -> list[str]:
  """The finished shards in ``out_dir``, in order."""
  return sorted(glob.glob(os.path.join(out_dir, SHARD_PATTERN.replace("{:05d}", "[0-9]" * 5))))


def _check_settings(out_dir: str, record: dict):
  """Write ``settings.json`` (first run) or check that the folder was made with the same settings."""
  path = os.path.join(out_dir, SETTINGS_FILE)
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    if previous != record:
      diff = sorted(k for k in set(previous) | set(record) if previous.get(k) != record.get(k))
      raise ValueError(f"{out_dir} holds shards made with other settings ({', '.join(diff)} differ): "
                       "choose another output folder, or delete that one to start over")
  elif jax.process_index() == 0:
    with atomic_open(path, "w") as f:
      json.dump(record, f, indent=1, sort_keys=True)


def write_shards(generator: Generator, setting: Setting, out_dir: str, num: int, *, shard_size: int,
                 batch_size: int, contents: Callable[[int, np.ndarray, np.ndarray | None], dict] | None = None,
                 progress: bool = True, description: str = "sampling",
                 extra_settings: dict | None = None) -> list[str]:
  """Sample examples ``0 .. num - 1`` into ``out_dir/shard_NNNNN.npz`` (``shard_size`` each) and return
  all shard paths.

  A shard holds ``contents(start, samples, labels)`` (default: ``samples``, ``labels``, and ``images``
  for image data) plus ``index`` (the example numbers). Existing shards are skipped, so a killed run
  resumes where it stopped; ``settings.json`` pins what the shards were made with. With several
  processes, shard ``i`` is made by process ``i % process_count`` and all processes wait for each other
  at the end (the folder must be on a shared filesystem). ``batch_size`` is per device.
  ``extra_settings``: more of what the shards depend on (e.g. the feature extractor), pinned likewise.
  """
  from tqdm import tqdm

  if num < 1 or shard_size < 1 or batch_size < 1:
    raise ValueError(f"--num ({num}), the shard size ({shard_size}) and --batch-size ({batch_size}) must be >= 1")
  os.makedirs(out_dir, exist_ok=True)
  record = dict(dataclasses.asdict(setting), mid_etas=list(setting.mid_etas), num=int(num),
                shard_size=int(shard_size), batch=int(batch_size) * len(generator.devices),
                checkpoint_step=int(generator.step), workdir=os.path.abspath(generator.workdir))
  if setting.sampler == "pushforward":
    del record["batch"]  # per-example noise: the batch layout does not change the samples
  record.update(extra_settings or {})
  _check_settings(out_dir, record)
  if contents is None:
    contents = lambda start, samples, labels: generator.arrays(samples, labels)
  num_shards = -(-num // shard_size)
  mine = [i for i in range(num_shards) if i % jax.process_count() == jax.process_index()]
  todo = [i for i in mine if not os.path.exists(os.path.join(out_dir, SHARD_PATTERN.format(i)))]
  per_call = int(batch_size) * len(generator.devices)
  with tqdm(total=sum(min(shard_size, num - i * shard_size) for i in mine), unit="img", desc=description,
            disable=not progress or not todo) as bar:
    bar.update(sum(min(shard_size, num - i * shard_size) for i in mine if i not in todo))
    for i in todo:
      start, count = i * shard_size, min(shard_size, num - i * shard_size)
      noise = generator.noise(setting.seed, start, count)
      labels = generator.labels(setting.seed, start, count)
      samples = generator.sample(setting, noise, labels, start=start, batch_size=per_call)
      arrays = dict(contents(start, samples, labels))
      arrays["index"] = np.arange(start, start + count, dtype=np.int64)
      save_npz(os.path.join(out_dir, SHARD_PATTERN.format(i)), arrays)
      bar.update(count)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"imm_jax shards {out_dir}")
  paths = shard_paths(out_dir)
  if len(paths) != num_shards:
    raise RuntimeError(f"{out_dir}: expected {num_shards} shards, found {len(paths)} (is the folder shared "
                       "by all hosts?)")
  return paths


def read_shards(paths: Sequence[str], keys: Sequence[str]) -> dict[str, np.ndarray]:
  """Concatenate ``keys`` over shard files (in the given order)."""
  parts = {k: [] for k in keys}
  for path in paths:
    with np.load(path, allow_pickle=False) as f:
      for k in keys:
        parts[k].append(f[k])
  return {k: np.concatenate(v) for k, v in parts.items()}
