"""The authors' three released IMM checkpoints: where they live and what network each one is.

Files (https://huggingface.co/lumaai/imm, listed in the README of github.com/lumalabs/imm):
  cifar10.pt              CIFAR-10, DDPM++ (SongUNet) 55.7M, simple_edm, second time input s
  imagenet256_ts_a2.pkl   ImageNet 256 (32x32x4 SD-VAE latents), DiT-XL/2, euler_fm, t - s, a = 2
  imagenet256_s_a1.pkl    ImageNet 256, DiT-XL/2, euler_fm, second time input s, a = 1

``NETWORKS`` restates the ``network:`` sections (plus resolution / channels / label_dim) of the authors'
``cifar10_generate_images.yaml`` and ``im256_generate_images.yaml`` (the latter with
``network.temb_type=identity`` for the ``s_a1`` file, as the authors' README says), so that a released
checkpoint converts without its YAML. ``SAMPLING`` holds the authors' sampling presets: ImageNet 1/2/4/8
uniform steps with guidance 1.5; CIFAR-10 1 step and 2 steps through eta = 1.4 (the paper's FID 1.98).
"""

from __future__ import annotations

import copy
import os
import sys
import urllib.error
import urllib.request

REPO_URL = "https://huggingface.co/lumaai/imm/resolve/main/"
YAML_URL = "https://github.com/lumalabs/imm/tree/main/configs"

FILES = {
    "cifar10": "cifar10.pt",
    "imagenet256_ts_a2": "imagenet256_ts_a2.pkl",
    "imagenet256_s_a1": "imagenet256_s_a1.pkl",
}
YAMLS = {
    "cifar10": "cifar10_generate_images.yaml",
    "imagenet256_ts_a2": "im256_generate_images.yaml",
    "imagenet256_s_a1": "im256_generate_images.yaml (with network.temb_type=identity)",
}

_CIFAR10 = {
    "precond": dict(img_resolution=32, img_channels=3, label_dim=0, model_type="SongUNet",
                    noise_schedule="fm", f_type="simple_edm", temb_type="identity", time_scale=1000.0,
                    sigma_data=0.5, eps=0.006, T=0.994),
    "model": dict(model_channels=128, channel_mult=[2, 2, 2], channel_mult_emb=4, num_blocks=4,
                  attn_resolutions=[16], dropout=0.2, embedding_type="positional", channel_mult_noise=1,
                  encoder_type="standard", decoder_type="standard", resample_filter=[1, 1], s_embed=True),
}
_IMAGENET = {
    "precond": dict(img_resolution=32, img_channels=4, label_dim=1000, model_type="DiT_XL_2",
                    noise_schedule="fm", f_type="euler_fm", temb_type="stride", time_scale=1000.0,
                    sigma_data=0.5, eps=0.0, T=0.994),
    "model": dict(s_embed=True),
}
SAMPLING = {
    "cifar10": dict(steps=(1, 2), schedule="default", cfg_scale=1.0),
    "imagenet256_ts_a2": dict(steps=(1, 2, 4, 8), schedule="uniform", cfg_scale=1.5),
    "imagenet256_s_a1": dict(steps=(1, 2, 4, 8), schedule="uniform", cfg_scale=1.5),
}
NAMES = tuple(FILES)


def network_meta(name: str) -> dict:
  """The reference meta (precond + model kwargs + sampling defaults) of a released checkpoint."""
  if name not in FILES:
    raise ValueError(f"unknown released checkpoint {name!r}: choose one of {NAMES}")
  meta = copy.deepcopy(_CIFAR10 if name == "cifar10" else _IMAGENET)
  if name == "imagenet256_s_a1":
    meta["precond"]["temb_type"] = "identity"
  meta["sample"] = dict(SAMPLING[name])
  return meta


def released_config(name: str):
  """The imm_jax sampling config of a released checkpoint (what ``imm_jax.convert --name`` writes,
  up to the label table size, which the converter reads off the checkpoint)."""
  from imm_jax.convert.workdir import config_from_reference
  return config_from_reference(network_meta(name), source=f"{REPO_URL}{FILES[name]}")


def default_download_dir() -> str:
  return os.environ.get("IMM_JAX_CHECKPOINT_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "imm_jax", "released")


class FetchError(RuntimeError):
  pass


def fetch(name: str, download_dir: str | None = None, *, timeout: float = 30.0, progress: bool = True) -> str:
  """The local path of a released checkpoint: ``download_dir/FILE`` if it is there, else downloaded
  from Hugging Face into it. Offline or on failure: a FetchError whose one-line message says which file
  to download from which URL, where to put it, and how to rerun."""
  if name not in FILES:
    raise ValueError(f"unknown released checkpoint {name!r}: choose one of {NAMES}")
  download_dir = download_dir or default_download_dir()
  filename = FILES[name]
  path = os.path.join(download_dir, filename)
  if os.path.exists(path):
    return path
  url = REPO_URL + filename
  part = path + ".part"
  try:
    os.makedirs(download_dir, exist_ok=True)
    with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
      total = int(response.headers.get("Content-Length") or 0)
      _copy_with_progress(response, f, total, filename if progress else None)
    os.replace(part, path)
  except (urllib.error.URLError, OSError, TimeoutError) as e:
    if os.path.exists(part):
      os.remove(part)
    reason = getattr(e, "reason", None) or e
    raise FetchError(
        f"could not download {filename} ({reason}): download {url} to {path} and rerun "
        f"python -m imm_jax.convert --name {name} --out DIR, or run python -m imm_jax.convert "
        f"--pickle FILE --name {name} --out DIR (or --pickle FILE --yaml {YAMLS[name].split()[0]} from "
        f"{YAML_URL}) on the downloaded FILE") from None
  return path


def _copy_with_progress(src, dst, total: int, label: str | None):
  from tqdm import tqdm

  with tqdm(total=total or None, unit="B", unit_scale=True, desc=label, disable=label is None,
            file=sys.stderr) as bar:
    while True:
      chunk = src.read(1 << 22)
      if not chunk:
        break
      dst.write(chunk)
      bar.update(len(chunk))

