"""The Stable Diffusion VAE (diffusers' ``AutoencoderKL``) in Flax, loading diffusers-format weights.

The ImageNet-256 models train on SD-VAE latents (``stabilityai/sd-vae-ft-ema``, spec section 1). This is a
faithful port of diffusers' ``AutoencoderKL`` forward pass (NHWC instead of NCHW):

* encoder: ``conv_in``; per level ``DownEncoderBlock2D`` (``layers_per_block`` ``ResnetBlock2D``, then a
  stride-2 3x3 conv after zero-padding the right and bottom by one pixel, except at the last level); the
  mid block (resnet, single-head self-attention, resnet); GroupNorm, SiLU, ``conv_out`` to 2 * latent
  channels; then ``quant_conv`` (1x1) -> (mean, logvar), logvar clipped to [-30, 20] and std = exp(logvar / 2).
* decoder: ``post_quant_conv`` (1x1), ``conv_in``, mid block, per level (channels reversed)
  ``UpDecoderBlock2D`` (``layers_per_block + 1`` resnets, then nearest 2x upsampling and a 3x3 conv, except
  at the last level), GroupNorm, SiLU, ``conv_out``.
* GroupNorm: ``norm_num_groups`` groups, eps 1e-6; activations SiLU; attention: GroupNorm, q/k/v/out
  linear layers over channels, softmax(q k^T / sqrt(C)) in float32, residual.

Images are float NHWC in [-1, 1] (pixel / 127.5 - 1). The encoder's mean/std are the *raw* (unscaled)
latents: the config's ``scaling_factor`` (0.18215) is only metadata here, as it is in diffusers'
``AutoencoderKL.encode``/``decode``; the latent normalisation lives in :mod:`imm_jax.data.latents`.

Weights: a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``), read with numpy
(no torch, no ``safetensors`` package). Both diffusers attention key layouts are accepted (``to_q``/
``to_k``/``to_v``/``to_out.0`` and the older ``query``/``key``/``value``/``proj_attn`` of the original
``sd-vae-ft-ema`` upload).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
HOW_TO_GET = (f"on a machine with internet: huggingface-cli download {DEFAULT_VAE} --local-dir DIR "
              f"(or pip install huggingface_hub and call snapshot_download), then copy DIR here")


class MissingVAEWeights(FileNotFoundError):
  """The VAE folder (config.json + diffusion_pytorch_model.safetensors) is missing or incomplete."""


# ----------------------------------------------------------------------------------------------------------
# safetensors with numpy: 8-byte little-endian header size, JSON header {name: {dtype, shape,
# data_offsets: [begin, end)}} (offsets into the data that follows; optional "__metadata__"), then the data.

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a ``.safetensors`` file as numpy arrays (bfloat16 is widened to float32)."""
  with open(path, "rb") as f:
    raw = f.read()
  if len(raw) < 8:
    raise ValueError(f"{path}: not a safetensors file (too short)")
  (n,) = struct.unpack("<Q", raw[:8])
  if n > len(raw) - 8:
    raise ValueError(f"{path}: not a safetensors file (header size {n} > file size {len(raw)})")
  header = json.loads(raw[8:8 + n])
  data = memoryview(raw)[8 + n:]
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if info["dtype"] == "BF16":
      bits = np.frombuffer(data[begin:end], np.dtype("<u2")).astype(np.uint32) << 16
      array = bits.view(np.float32)
    elif info["dtype"] in _ST_DTYPES:
      array = np.frombuffer(data[begin:end], np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<"))
    else:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    out[name] = array.reshape(shape).copy()
  return out


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
  """Writes numpy arrays as a ``.safetensors`` file (readable by the ``safetensors`` package and torch)."""
  header: dict[str, Any] = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  blobs, offset = [], 0
  for name in sorted(tensors):
    array = np.asarray(tensors[name], order="C")
    if array.dtype not in _ST_NAMES:
      raise ValueError(f"tensor {name!r}: unsupported dtype {array.dtype}")
    blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    header[name] = {"dtype": _ST_NAMES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(blob)]}
    blobs.append(blob)
    offset += len(blob)
  head = json.dumps(header, separators=(",", ":")).encode()
  head += b" " * (-len(head) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(head)))
    f.write(head)
    for blob in blobs:
      f.write(blob)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The fields of a diffusers ``AutoencoderKL`` config.json that the network uses (defaults: SD's)."""

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 256
  scaling_factor: float = 0.18215  # metadata only (see the module docstring)
  mid_block_add_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
    cls_name = d.get("_class_name", "AutoencoderKL")
    if cls_name != "AutoencoderKL":
      raise ValueError(f"VAE config is for {cls_name!r}; only diffusers' AutoencoderKL is supported")
    n = len(d.get("block_out_channels", cls.block_out_channels))
    for key, ok in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
      types = d.get(key, [ok] * n)
      if any(t != ok for t in types):
        raise ValueError(f"VAE config {key}={types}: only {ok} blocks are supported")
    if d.get("act_fn", "silu") != "silu":
      raise ValueError(f"VAE config act_fn={d['act_fn']!r}: only 'silu' is supported")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names and v is not None}
    if "block_out_channels" in kwargs:
      kwargs["block_out_channels"] = tuple(int(c) for c in kwargs["block_out_channels"])
    return cls(**kwargs)

  def to_dict(self) -> dict[str, Any]:
    """A diffusers-compatible config.json."""
    n = len(self.block_out_channels)
    d = dataclasses.asdict(self)
    d["block_out_channels"] = list(self.block_out_channels)
    return {"_class_name": "AutoencoderKL", "act_fn": "silu", "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, **d}


# ----------------------------------------------------------------------------------------------------------
# Network (module names follow the diffusers state-dict keys: "down_blocks.0" -> "down_blocks_0")


def _group_norm(groups: int, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False, name=name)


def _conv(features: int, kernel: int, name: str, stride: int = 1, padding: Any = "SAME") -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, name=name)


class ResnetBlock2D(nn.Module):
  out_channels: int
  groups: int

  @nn.compact
  def __call__(self, x):
    h = nn.silu(_group_norm(self.groups, "norm1")(x))
    h = _conv(self.out_channels, 3, "conv1")(h)
    h = nn.silu(_group_norm(self.groups, "norm2")(h))
    h = _conv(self.out_channels, 3, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "conv_shortcut")(x)
    return x + h


class Attention(nn.Module):
  """diffusers' single-head spatial self-attention of the VAE mid block (residual included)."""

  groups: int

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = _group_norm(self.groups, "group_norm")(x).reshape(b, h * w, c)
    q = nn.Dense(c, name="to_q")(y)
    k = nn.Dense(c, name="to_k")(y)
    v = nn.Dense(c, name="to_v")(y)
    logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * (c ** -0.5)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    a = jnp.einsum("bqk,bkc->bqc", weights, v)
    return x + nn.Dense(c, name="to_out_0")(a).reshape(b, h, w, c)


class MidBlock(nn.Module):
  channels: int
  groups: int
  attention: bool

  @nn.compact
  def __call__(self, x):
    x = ResnetBlock2D(self.channels, self.groups, name="resnets_0")(x)
    if self.attention:
      x = Attention(self.groups, name="attentions_0")(x)
    return ResnetBlock2D(self.channels, self.groups, name="resnets_1")(x)


class DownEncoderBlock(nn.Module):
  out_channels: int
  num_layers: int
  groups: int
  downsample: bool

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, name=f"resnets_{j}")(x)
    if self.downsample:  # diffusers' Downsample2D with padding=0: pad right/bottom by 1, 3x3 stride 2
      x = _conv(self.out_channels, 3, "downsamplers_0_conv", stride=2, padding=((0, 1), (0, 1)))(x)
    return x


class UpDecoderBlock(nn.Module):
  out_channels: int
  num_layers: int
  groups: int
  upsample: bool

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, name=f"resnets_{j}")(x)
    if self.upsample:  # nearest 2x, then 3x3 conv
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      x = _conv(self.out_channels, 3, "upsamplers_0_conv")(x)
    return x


class Encoder(nn.Module):
  config: VAEConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    chans = cfg.block_out_channels
    x = _conv(chans[0], 3, "conv_in")(x)
    for i, c in enumerate(chans):
      x = DownEncoderBlock(c, cfg.layers_per_block, cfg.norm_num_groups, i < len(chans) - 1,
                           name=f"down_blocks_{i}")(x)
    x = MidBlock(chans[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, name="mid_block")(x)
    x = nn.silu(_group_norm(cfg.norm_num_groups, "conv_norm_out")(x))
    return _conv(2 * cfg.latent_channels, 3, "conv_out")(x)


class Decoder(nn.Module):
  config: VAEConfig

  @nn.compact
  def __call__(self, z):
    cfg = self.config
    chans = tuple(reversed(cfg.block_out_channels))
    x = _conv(chans[0], 3, "conv_in")(z)
    x = MidBlock(chans[0], cfg.norm_num_groups, cfg.mid_block_add_attention, name="mid_block")(x)
    for i, c in enumerate(chans):
      x = UpDecoderBlock(c, cfg.layers_per_block + 1, cfg.norm_num_groups, i < len(chans) - 1,
                         name=f"up_blocks_{i}")(x)
    x = nn.silu(_group_norm(cfg.norm_num_groups, "conv_norm_out")(x))
    return _conv(cfg.out_channels, 3, "conv_out")(x)


class AutoencoderKL(nn.Module):
  """``encode(x) -> (mean, logvar)`` of the raw latents; ``decode(z) -> images``; NHWC, images in [-1, 1]."""

  config: VAEConfig

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    if cfg.use_quant_conv:
      self.quant_conv = _conv(2 * cfg.latent_channels, 1, "quant_conv")
    if cfg.use_post_quant_conv:
      self.post_quant_conv = _conv(cfg.latent_channels, 1, "post_quant_conv")

  def encode(self, x):
    moments = self.encoder(x)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z):
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x):
    mean, _ = self.encode(x)
    return self.decode(mean)


# ----------------------------------------------------------------------------------------------------------
# diffusers state dict <-> Flax params

_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _flax_path(key: str) -> tuple[str, ...]:
  """'encoder.down_blocks.0.resnets.1.norm1.weight' -> ('encoder', 'down_blocks_0', 'resnets_1', 'norm1',
  'weight'): numeric parts join the name before them, and so does 'conv' after an up/down sampler."""
  parts = key.split(".")
  for old, new in _OLD_ATTENTION.items():
    if len(parts) >= 2 and parts[-2] == old and "attentions" in parts:
      parts = parts[:-2] + new.split(".") + parts[-1:]
  out: list[str] = []
  for p in parts:
    if out and (p.isdigit() or (p == "conv" and re.fullmatch(r"(up|down)samplers_\d+", out[-1]))):
      out[-1] = f"{out[-1]}_{p}"
    else:
      out.append(p)
  return tuple(out)


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: VAEConfig) -> dict:
  """Flax params of :class:`AutoencoderKL` from a diffusers ``AutoencoderKL`` state dict (numpy arrays).

  Checks that every parameter the network needs is present with the right shape, and ignores nothing
  silently: keys that map to no parameter are an error."""
  expected = {path: leaf for path, leaf in _flatten(param_shapes(config))}
  params: dict = {}
  unused = []
  for key, value in state_dict.items():
    path = _flax_path(key)
    leaf = path[-1]
    value = np.asarray(value, np.float32)
    if leaf == "weight" and value.ndim == 4 and value.shape[2:] == (1, 1) and "attentions_0" in path:
      value = value[:, :, 0, 0]  # 1x1-conv attention weights of very old checkpoints
    if leaf == "weight" and value.ndim == 4:
      path, value = path[:-1] + ("kernel",), value.transpose(2, 3, 1, 0)
    elif leaf == "weight" and value.ndim == 2:
      path, value = path[:-1] + ("kernel",), value.T
    elif leaf == "weight" and value.ndim == 1:
      path = path[:-1] + ("scale",)
    if path not in expected:
      unused.append(key)
      continue
    if tuple(expected[path].shape) != value.shape:
      raise ValueError(f"VAE weight {key}: shape {value.shape} (as {'/'.join(path)}) but the config needs "
                       f"{tuple(expected[path].shape)}")
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  missing = sorted("/".join(p) for p in expected if _get(params, p) is None)
  if unused or missing:
    raise ValueError(f"VAE state dict does not match the config: {len(missing)} missing "
                     f"(e.g. {missing[:3]}), {len(unused)} unexpected (e.g. {unused[:3]})")
  return params


def state_dict_from_params(params: Mapping) -> dict[str, np.ndarray]:
  """diffusers ``AutoencoderKL`` state dict (current key names, PyTorch layouts) from Flax params."""
  out = {}
  for path, value in _flatten(params):
    value = np.asarray(value, np.float32)
    names = []
    for p in path[:-1]:
      m = re.fullmatch(r"(.*?)_(\d+)(_conv)?", p)
      if m and not p.startswith(("conv_in", "conv_out", "conv_norm", "conv_shortcut", "quant_conv",
                                 "post_quant")):
        names += [m.group(1), m.group(2)] + (["conv"] if m.group(3) else [])
      else:
        names.append(p)
    leaf = path[-1]
    if leaf == "kernel" and value.ndim == 4:
      leaf, value = "weight", value.transpose(3, 2, 0, 1)
    elif leaf == "kernel":
      leaf, value = "weight", value.T
    elif leaf == "scale":
      leaf = "weight"
    out[".".join(names + [leaf])] = np.ascontiguousarray(value)
  return out


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _get(tree, path):
  for p in path:
    if not isinstance(tree, Mapping) or p not in tree:
      return None
    tree = tree[p]
  return tree


def param_shapes(config: VAEConfig) -> dict:
  """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (traced, nothing computed)."""
  size = 2 * config.downsample_factor
  x = jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32)
  return jax.eval_shape(lambda x: AutoencoderKL(config).init(jax.random.key(0), x)["params"], x)


def init_params(config: VAEConfig, seed: int = 0) -> dict:
  """Random numpy parameters for tests and tools: kernels N(0, 1 / fan_in), GroupNorm scales 1, biases 0.

  (Drawn with numpy from the shapes: Flax's own ``init`` of this network takes a minute to compile on a
  CPU.)"""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(s.shape[:-1]))
      return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(np.float32)
    return np.ones(s.shape, np.float32) if name == "scale" else np.zeros(s.shape, np.float32)

  return jax.tree_util.tree_map_with_path(leaf, param_shapes(config))


# ----------------------------------------------------------------------------------------------------------
# Loading and saving


@dataclasses.dataclass(frozen=True)
class VAE:
  """A loaded VAE: the Flax module, its parameters and where they came from."""

  module: AutoencoderKL
  params: Any
  source: str

  @property
  def config(self) -> VAEConfig:
    return self.module.config

  def encode(self, images):
    """Float images NHWC in [-1, 1] -> (mean, std) of the raw latents (float32, NHWC; jitted)."""
    return _jitted(self.module, "encode")(self.params, jnp.asarray(images, jnp.float32))

  def decode(self, latents):
    """Raw latents NHWC -> images NHWC, nominally in [-1, 1] (not clipped; jitted)."""
    return _jitted(self.module, "decode")(self.params, jnp.asarray(latents, jnp.float32))


@functools.lru_cache(maxsize=16)
def _jitted(module: AutoencoderKL, what: str):
  if what == "encode":
    def fn(params, x):
      mean, logvar = module.apply({"params": params}, x, method=AutoencoderKL.encode)
      return mean, jnp.exp(0.5 * logvar)
  else:
    def fn(params, z):
      return module.apply({"params": params}, z, method=AutoencoderKL.decode)
  return jax.jit(fn)


def _missing(path: str, what: str, option: str) -> MissingVAEWeights:
  return MissingVAEWeights(f"SD-VAE weights not found: {what}; get them {HOW_TO_GET}, and point {option} at "
                           f"DIR (a folder with {CONFIG_NAME} and {WEIGHTS_NAME}).")


def load_vae(path: str, *, download: bool = False, option: str = "--vae") -> VAE:
  """Loads a diffusers ``AutoencoderKL`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``).

  ``path`` may also be a Hugging Face repo id (e.g. ``stabilityai/sd-vae-ft-ema``) when ``download`` is
  True and ``huggingface_hub`` is installed and online. Missing weights raise :class:`MissingVAEWeights`
  with a one-line message saying how to get them and which ``option`` to point at them.
  """
  if not path:
    raise _missing(path, f"{option} is not set", option)
  local = os.path.abspath(os.path.expanduser(str(path)))
  if not os.path.isdir(local) and download:
    local = _download(str(path), option)
  if not os.path.isdir(local):
    raise _missing(path, f"{path} is not a folder", option)
  cfg_file, weights = os.path.join(local, CONFIG_NAME), os.path.join(local, WEIGHTS_NAME)
  for f in (cfg_file, weights):
    if not os.path.isfile(f):
      extra = ""
      if f == weights and os.path.isfile(os.path.join(local, "diffusion_pytorch_model.bin")):
        extra = " (only the pickled .bin is there: download the .safetensors file)"
      raise _missing(path, f"{f} does not exist{extra}", option)
  with open(cfg_file) as fh:
    config = VAEConfig.from_dict(json.load(fh))
  params = params_from_state_dict(read_safetensors(weights), config)
  return VAE(AutoencoderKL(config), jax.tree.map(jnp.asarray, params), local)


def _download(repo_id: str, option: str) -> str:
  try:
    from huggingface_hub import snapshot_download  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise _missing(repo_id, "huggingface_hub is not installed for the download", option) from e
  try:
    return snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
  except Exception as e:  # pylint: disable=broad-except
    raise _missing(repo_id, f"downloading {repo_id} failed ({type(e).__name__})", option) from e


def save_vae(path: str, config: VAEConfig, params: Mapping) -> str:
  """Writes a diffusers-format folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)."""
  os.makedirs(path, exist_ok=True)
  write_safetensors(os.path.join(path, WEIGHTS_NAME), state_dict_from_params(params), {"format": "pt"})
  with open(os.path.join(path, CONFIG_NAME), "w") as fh:
    json.dump(config.to_dict(), fh, indent=2)
  return path


def small_config(**overrides) -> VAEConfig:
  """A tiny AutoencoderKL for tests: 2 levels (downsampling 2), 32/64 channels, 1 resnet per level."""
  return dataclasses.replace(VAEConfig(block_out_channels=(32, 64), layers_per_block=1, sample_size=32),
                             **overrides)


__all__: Sequence[str] = ("AutoencoderKL", "VAE", "VAEConfig", "MissingVAEWeights", "load_vae", "save_vae",
                          "read_safetensors", "write_safetensors", "params_from_state_dict",
                          "state_dict_from_params", "init_params", "param_shapes", "small_config", "DEFAULT_VAE")
