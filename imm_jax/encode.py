"""Pre-encode an image dataset into SD-VAE latents (EDM2-style) for ``config.data.name='latents'``.

  python -m imm_jax.encode --data /data/imagenet/train --vae /models/sd-vae-ft-ema --out /data/in256_latents
  python -m imm_jax.encode --data tfds:imagenet2012 --tfds-data-dir ~/tensorflow_datasets --vae VAE_DIR \\
      --out OUT_DIR

Input: a folder of images (recursive; >= 2 top-level class subfolders holding all the images give the
labels, sorted by name; otherwise every label is 0), or ``tfds:NAME`` (``tfds.data_source``, features
``image`` and ``label``; ``--split``). Each image is converted to RGB and center-cropped/resized to
``--resolution`` as EDM2's ``dataset_tool.py --transform=center-crop-dhariwal`` does (ADM's crop: halve
with BOX while the short side is >= 2x the target, BICUBIC to the target short side, center crop), mapped
to [-1, 1] (pixel / 127.5 - 1) and encoded by the VAE (jit, the batch sharded over all local devices).

Output (``--out``): ``latents.json`` (metadata), and ArrayRecord shards ``latents-SSSSS-of-NNNNN.array_record``
of ``--shard-size`` records each: (posterior mean, posterior std, label), NHWC, ``--dtype``; beside each
shard ``<shard>.stats.json`` holds per-channel sums for the dataset's latent statistics. A shard is written
under a temporary name and renamed when complete, so a finished shard is never recomputed: rerunning the
same command resumes. With several processes (``jax.distributed``; see imm_jax.distributed) process ``i``
encodes shards ``i, i + n, ...``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from imm_jax.data import latents as latents_lib
from imm_jax.data import sources
from imm_jax.io_utils import atomic_open, fail

DEFAULT_SHARD_SIZE = 10_000


def center_crop_dhariwal(image: Image.Image, size: int) -> np.ndarray:
  """ADM's / EDM2's ``center-crop-dhariwal``: uint8 RGB (size, size, 3)."""
  image = image.convert("RGB")
  while min(*image.size) >= 2 * size:
    image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
  scale = size / min(*image.size)
  image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BICUBIC)
  arr = np.asarray(image, np.uint8)
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return np.ascontiguousarray(arr[top:top + size, left:left + size])


# ----------------------------------------------------------------------------------------------------------
# Inputs


class FolderImages:
  def __init__(self, root: str):
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
      raise FileNotFoundError(f"--data={root}: not a folder (expected a folder of images or tfds:NAME)")
    files, labels, class_names = sources._list_image_folder(root, root)  # pylint: disable=protected-access
    self.files = files
    self.labels = labels
    self.class_names = class_names
    self.num_classes = len(class_names)
    self.description = root

  def __len__(self) -> int:
    return len(self.files)

  def load(self, index: int, size: int) -> tuple[np.ndarray, int]:
    path = self.files[index]
    try:
      with Image.open(path) as image:
        x = center_crop_dhariwal(image, size)
    except OSError as e:
      raise ValueError(f"cannot read image {path}: {e}") from e
    return x, 0 if self.labels is None else int(self.labels[index])


class TfdsImages:
  def __init__(self, name: str, split: str, data_dir: str | None):
    self._source = sources._open_tfds(name, split, data_dir, "split")  # pylint: disable=protected-access
    features = self._source.dataset_info.features
    if "image" not in features:
      raise ValueError(f"TFDS dataset {name!r} has no 'image' feature (features: {list(features)})")
    self._has_label = "label" in features
    self.num_classes = int(getattr(features["label"], "num_classes", 0) or 0) if self._has_label else 0
    names = getattr(features["label"], "names", None) if self._has_label else None
    self.class_names = list(names or [])
    self.description = f"tfds:{name}/{split}"

  def __len__(self) -> int:
    return len(self._source)

  def load(self, index: int, size: int) -> tuple[np.ndarray, int]:
    record = self._source[index]
    x = np.asarray(record["image"], np.uint8)
    if x.ndim == 3 and x.shape[-1] == 1:
      x = x[..., 0]
    return center_crop_dhariwal(Image.fromarray(x), size), int(record["label"]) if self._has_label else 0


def open_images(data: str, split: str = "train", tfds_data_dir: str | None = None):
  if data.startswith("tfds:"):
    return TfdsImages(data[len("tfds:"):], split, tfds_data_dir)
  return FolderImages(data)


# ----------------------------------------------------------------------------------------------------------
# Encoding


class _Encoder:
  """The VAE encoder jitted over a 1-D mesh of this process' devices: uint8 (B, H, W, 3) -> (mean, std)."""

  def __init__(self, vae, batch_size: int):
    import jax  # pylint: disable=import-outside-toplevel
    from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel

    devices = tuple(jax.local_devices())
    self.batch_size = -(-batch_size // len(devices)) * len(devices)
    self._fn, mesh = _encode_fn(vae.module, devices)
    self._sharding = NamedSharding(mesh, P("data"))
    self._params = jax.device_put(vae.params, NamedSharding(mesh, P()))
    self._jax = jax

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(images)
    if n < self.batch_size:
      images = np.concatenate([images, np.zeros((self.batch_size - n,) + images.shape[1:], images.dtype)])
    mean, std = self._fn(self._params, self._jax.device_put(images, self._sharding))
    mean, std = self._jax.device_get((mean, std))
    return np.asarray(mean, np.float32)[:n], np.asarray(std, np.float32)[:n]


@functools.lru_cache(maxsize=4)
def _encode_fn(module, devices: tuple):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel

  mesh = Mesh(np.array(devices), ("data",))
  batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

  def encode(params, images):
    x = images.astype(jnp.float32) / 127.5 - 1.0
    mean, logvar = module.apply({"params": params}, x, method=type(module).encode)
    return mean, jnp.exp(0.5 * logvar)

  return jax.jit(encode, in_shardings=(replicated, batch), out_shardings=(batch, batch)), mesh


def shard_name(i: int, n: int) -> str:
  return f"latents-{i:05d}-of-{n:05d}.array_record"


def _plan(images, out: str, *, resolution: int, shard_size: int, dtype: str, vae, data: str) -> dict[str, Any]:
  n = len(images)
  if n == 0:
    raise ValueError(f"--data={data}: no images")
  factor = vae.config.downsample_factor
  if resolution % factor:
    raise ValueError(f"--resolution={resolution} must be a multiple of the VAE's downsampling factor {factor}")
  num_shards = -(-n // shard_size)
  shards = [{"file": shard_name(i, num_shards), "start": i * shard_size,
             "count": min(shard_size, n - i * shard_size)} for i in range(num_shards)]
  side = resolution // factor
  return {
      "format": latents_lib.FORMAT, "version": latents_lib.VERSION,
      "source": images.description, "resolution": resolution,
      "crop": "center-crop-dhariwal", "pixel_range": [-1.0, 1.0],
      "latent_shape": [side, side, vae.config.latent_channels], "dtype": dtype,
      "record": "int32 label, then posterior mean and std (H, W, C) little-endian",
      "num_records": n, "num_classes": int(images.num_classes), "class_names": list(images.class_names),
      "shard_size": shard_size, "shards": shards,
      "vae": {"source": vae.source, "config": vae.config.to_dict()},
  }


_IDENTITY_KEYS = ("source", "resolution", "latent_shape", "dtype", "num_records", "num_classes", "shard_size")


def _write_metadata(out: str, meta: dict[str, Any], is_main: bool) -> None:
  path = os.path.join(out, latents_lib.METADATA)
  if os.path.isfile(path):
    with open(path) as f:
      old = json.load(f)
    diff = [k for k in _IDENTITY_KEYS if old.get(k) != meta.get(k)]
    if old.get("vae", {}).get("config") != meta["vae"]["config"]:
      diff.append("vae config")
    if diff:
      raise ValueError(f"--out={out} already holds a different encoding ({', '.join(diff)} differ from "
                       f"{path}); choose another --out or delete it")
    return
  if is_main:
    with atomic_open(path, "w") as f:
      json.dump(meta, f, indent=1)


def encode_dataset(data: str, vae, out: str, *, resolution: int = 256, batch_size: int = 64,
                   shard_size: int = DEFAULT_SHARD_SIZE, dtype: str = "float32", split: str = "train",
                   tfds_data_dir: str | None = None, max_images: int | None = None, workers: int = 8,
                   process_index: int | None = None, process_count: int | None = None,
                   progress: bool = True) -> dict[str, Any]:
  """Encodes ``data`` (a folder or ``tfds:NAME``) with ``vae`` (an :class:`imm_jax.vae.VAE`) into ``out``.

  Returns ``{'metadata': ..., 'encoded': [shard files written now], 'skipped': [already finished]}``."""
  import jax  # pylint: disable=import-outside-toplevel
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  if dtype not in ("float32", "float16"):
    raise ValueError(f"--dtype={dtype}: choose float32 or float16")
  if shard_size <= 0 or batch_size <= 0 or resolution <= 0:
    raise ValueError("--shard-size, --batch-size and --resolution must be positive")
  process_index = jax.process_index() if process_index is None else int(process_index)
  process_count = jax.process_count() if process_count is None else int(process_count)
  images = open_images(data, split, tfds_data_dir)
  if max_images is not None and max_images < len(images):
    images = _Truncated(images, max_images)
  os.makedirs(out, exist_ok=True)
  meta = _plan(images, out, resolution=resolution, shard_size=shard_size, dtype=dtype, vae=vae, data=data)
  _write_metadata(out, meta, process_index == 0)

  mine = [s for i, s in enumerate(meta["shards"]) if i % process_count == process_index]
  todo = [s for s in mine if not os.path.isfile(os.path.join(out, s["file"]))]
  skipped = [s["file"] for s in mine if s not in todo]
  encoded = []
  if not todo:
    return {"metadata": meta, "encoded": encoded, "skipped": skipped}
  encoder = _Encoder(vae, batch_size)
  store = np.dtype(dtype).newbyteorder("<")
  bar = tqdm(total=sum(s["count"] for s in todo), desc=f"encoding {len(todo)} shard(s)", unit="img",
             disable=not progress, dynamic_ncols=True, mininterval=1.0)
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    for shard in todo:
      final = os.path.join(out, shard["file"])
      tmp = f"{final}.tmp-{process_index}"
      stats_sum = None
      writer = ArrayRecordWriter(tmp, "group_size:1,uncompressed")
      try:
        start, stop = shard["start"], shard["start"] + shard["count"]
        for b in range(start, stop, encoder.batch_size):
          ids = range(b, min(b + encoder.batch_size, stop))
          loaded = list(pool.map(lambda i: images.load(i, resolution), ids))
          pixels = np.stack([x for x, _ in loaded])
          mean, std = encoder(pixels)
          mean, std = mean.astype(store), std.astype(store)
          for j, (_, label) in enumerate(loaded):
            writer.write(latents_lib.encode_record(mean[j], std[j], label))
          part = latents_lib.shard_stats(mean.astype(np.float32), std.astype(np.float32))
          stats_sum = part if stats_sum is None else {
              "count": stats_sum["count"] + part["count"],
              "sum": (np.add(stats_sum["sum"], part["sum"])).tolist(),
              "sum_sq": (np.add(stats_sum["sum_sq"], part["sum_sq"])).tolist()}
          bar.update(len(ids))
      finally:
        writer.close()
      with open(final + latents_lib.STATS_SUFFIX + ".tmp", "w") as f:
        json.dump(stats_sum, f)
      os.replace(final + latents_lib.STATS_SUFFIX + ".tmp", final + latents_lib.STATS_SUFFIX)
      os.replace(tmp, final)  # the shard exists only once it is complete (its stats are written first)
      encoded.append(shard["file"])
  bar.close()
  return {"metadata": meta, "encoded": encoded, "skipped": skipped}


class _Truncated:
  def __init__(self, images, n: int):
    self._images, self._n = images, int(n)
    self.num_classes, self.class_names = images.num_classes, images.class_names
    self.description = f"{images.description}[:{n}]"

  def __len__(self) -> int:
    return self._n

  def load(self, index: int, size: int):
    return self._images.load(index, size)


# ----------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m imm_jax.encode", description=__doc__.split("\n\n")[0])
  p.add_argument("--data", required=True, help="image folder (class subfolders) or tfds:NAME")
  p.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder (config.json + "
                 "diffusion_pytorch_model.safetensors), e.g. a download of stabilityai/sd-vae-ft-ema")
  p.add_argument("--out", required=True, help="output folder (resumable)")
  p.add_argument("--resolution", type=int, default=256)
  p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=64,
                 help="images per encoder call over all local devices")
  p.add_argument("--shard-size", "--shard_size", dest="shard_size", type=int, default=DEFAULT_SHARD_SIZE)
  p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored dtype")
  p.add_argument("--split", default="train", help="TFDS split")
  p.add_argument("--tfds-data-dir", "--tfds_data_dir", dest="tfds_data_dir", default=None)
  p.add_argument("--max-images", "--max_images", dest="max_images", type=int, default=None)
  p.add_argument("--workers", type=int, default=8, help="image decoding threads")
  p.add_argument("--download", action="store_true",
                 help="--vae is a Hugging Face repo id to download (needs huggingface_hub and internet)")
  p.add_argument("--no-progress", "--no_progress", dest="progress", action="store_false")
  return p.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from imm_jax import distributed  # pylint: disable=import-outside-toplevel
  from imm_jax import vae as vae_lib  # pylint: disable=import-outside-toplevel

  distributed.initialize()
  try:
    vae = vae_lib.load_vae(args.vae, download=args.download, option="--vae")
    t0 = time.perf_counter()
    result = encode_dataset(args.data, vae, args.out, resolution=args.resolution, batch_size=args.batch_size,
                            shard_size=args.shard_size, dtype=args.dtype, split=args.split,
                            tfds_data_dir=args.tfds_data_dir, max_images=args.max_images,
                            workers=args.workers, progress=args.progress)
  except (ValueError, FileNotFoundError) as e:
    fail(str(e))
  meta = result["metadata"]
  print(f"{args.out}: encoded {len(result['encoded'])} shard(s) in {time.perf_counter() - t0:.1f} s, "
        f"{len(result['skipped'])} already done; {meta['num_records']} records of {meta['latent_shape']} "
        f"latents, {meta['num_classes']} classes")
  return 0


if __name__ == "__main__":
  sys.exit(main())
