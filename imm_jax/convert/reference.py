"""Reference (authors' PyTorch) IMM networks -> imm_jax modules and parameters.

The reference state dict is flat, keys prefixed ``model.`` (the precond wrapper's network), PyTorch
layouts. ``params_from_state_dict`` maps each key to our parameter tree (reference_networks.md):

* Linear ``weight`` (out, in) -> ``kernel`` (in, out); Conv2d ``weight`` (out, in, kh, kw) -> ``kernel``
  (kh, kw, in, out); GroupNorm ``weight`` -> ``scale``; ``bias`` -> ``bias``.
* Names: ``.`` -> ``/``; ``blocks.3`` -> ``blocks_3``; ``mlp.0`` -> ``mlp_0``; ``adaLN_modulation.1`` ->
  ``adaLN_modulation``; ``x_embedder.proj`` -> ``x_embedder``; ``enc.16x16_block0`` -> ``enc_16x16_block0``.
* The qkv layouts need no permutation: our DiT splits the qkv output as [3][heads][head_dim] and our
  SongUNet as [head][channel][3], exactly as the reference does.
* Buffers ``pos_embed`` and ``*.resample_filter`` are compared with our constants, not loaded.

Every unknown key, missing parameter and shape mismatch raises a ValueError naming the key.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from imm_jax.models import MLP, DiT, SongUNet, create_network
from imm_jax.models.dit import get_2d_sincos_pos_embed
from imm_jax.models.layers import resample_filter_2d

PREFIX = "model."
_NOISE_SCHEDULES = {"fm": "ot_fm", "vp_cosine": "vp_cosine"}

# The precond wrapper's kwargs (IMMPrecond); everything else in a network section is the model's.
PRECOND_KEYS = ("img_resolution", "img_channels", "label_dim", "mixed_precision", "noise_schedule",
                "model_type", "sigma_data", "f_type", "T", "eps", "temb_type", "time_scale")
# The reference's DiT constructors DiT_{S,B,L,XL}_{2,4,8}: fixed (patch, hidden, depth, heads).
_DIT_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
_DIT_NAME = re.compile(r"^DiT_(S|B|L|XL)_(2|4|8)$")

# Reference network kwargs the converter understands (some only with their default value).
_DIT_KEYS = {"patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio", "num_classes", "s_embed",
             "class_dropout_prob", "img_resolution", "in_channels", "qk_norm", "skip", "temb_mult",
             "dropout", "embedding_kwargs"}
_UNET_KEYS = {"model_channels", "channel_mult", "channel_mult_emb", "num_blocks", "attn_resolutions",
              "dropout", "embedding_type", "channel_mult_noise", "encoder_type", "decoder_type",
              "resample_filter", "s_embed", "label_dropout", "augment_dim", "embedding_kwargs",
              "share_tsemb"}


def load_reference_npz(path) -> tuple[dict[str, np.ndarray], dict, dict[str, np.ndarray]]:
  """(state_dict, meta, arrays) from a test-vector file: ``state_dict/<key>`` entries, JSON ``meta``,
  and every other array (x, t, s, labels, out, ...)."""
  with np.load(path, allow_pickle=False) as data:
    state_dict, arrays, meta = {}, {}, None
    for key in data.files:
      if key == "meta":
        meta = json.loads(str(data[key]))
      elif key.startswith("state_dict/"):
        state_dict[key[len("state_dict/"):]] = np.asarray(data[key])
      else:
        arrays[key] = np.asarray(data[key])
  if meta is None:
    raise ValueError(f"{path}: no 'meta' entry (not a reference test-vector file)")
  return state_dict, meta, arrays


def network_from_reference(meta: Mapping[str, Any], *, state_dict: Mapping[str, np.ndarray] | None = None):
  """(module, model_cfg, precond_cfg) for the reference ``meta`` (``precond`` and ``model`` kwargs).

  ``model_type`` is ``SongUNet``, ``DiT`` (sizes in the model kwargs) or one of the reference's DiT
  constructors ``DiT_{S,B,L,XL}_{2,4,8}`` (e.g. ``DiT_XL_2``, the released ImageNet model).
  ``state_dict`` (optional) settles what the kwargs may not say: whether the DiT label table carries
  the extra row of label-dropout training.
  """
  pre = dict(meta["precond"])
  model = dict(meta.get("model", {}))
  unknown = sorted(set(pre) - set(PRECOND_KEYS))
  if unknown:
    raise ValueError(f"reference precond kwargs {unknown} are not understood by the converter "
                     f"(known: {list(PRECOND_KEYS)})")
  for key in ("img_resolution", "img_channels"):
    if pre.get(key) is None:
      raise ValueError(f"reference precond kwarg {key} is missing")
  if pre.get("mixed_precision") not in (None, "bf16", "fp16"):
    raise ValueError(f"reference precond mixed_precision={pre['mixed_precision']!r} is not supported "
                     f"(None, 'bf16' or 'fp16'; imm_jax computes in float32 either way)")
  model_type = pre.get("model_type", "SongUNet")
  named = _DIT_NAME.match(str(model_type))
  if named:
    hidden, depth, heads = _DIT_SIZES[named.group(1)]
    sizes = dict(patch_size=int(named.group(2)), hidden_size=hidden, depth=depth, num_heads=heads)
    for key, value in sizes.items():
      if key in model and model[key] != value:
        raise ValueError(f"reference model kwarg {key}={model[key]!r} contradicts model_type "
                         f"{model_type} ({key}={value})")
    model.update(sizes)
    model_type = "DiT"
  res = int(pre["img_resolution"])
  channels = int(pre["img_channels"])
  label_dim = int(pre.get("label_dim", 0))

  cfg = ml_collections.ConfigDict()
  if model_type == "DiT":
    _check_keys(model, _DIT_KEYS, "DiT")
    _require(model, "qk_norm", False, "DiT qk_norm")
    _require(model, "skip", False, "DiT skip connections")
    _require(model, "temb_mult", 1, "DiT temb_mult")
    _require(model, "dropout", 0, "DiT dropout")
    if model.get("embedding_kwargs", {}).get("embedding_type", "positional") != "positional":
      raise ValueError("reference DiT with a non-positional timestep embedding is not supported")
    num_classes = int(model.get("num_classes", label_dim))
    if label_dim and num_classes != label_dim:
      raise ValueError(f"reference DiT num_classes={num_classes} differs from precond label_dim={label_dim}")
    extra = float(model.get("class_dropout_prob", 0.0)) > 0
    if state_dict is not None and PREFIX + "y_embedder.embedding_table.weight" in state_dict:
      rows = state_dict[PREFIX + "y_embedder.embedding_table.weight"].shape[0]
      extra = rows == num_classes + 2
    cfg.name = "dit"
    cfg.patch_size = int(model.get("patch_size", 2))
    cfg.hidden_size = int(model.get("hidden_size", 1152))
    cfg.depth = int(model.get("depth", 28))
    cfg.num_heads = int(model.get("num_heads", 16))
    cfg.mlp_ratio = float(model.get("mlp_ratio", 4.0))
    cfg.s_embed = bool(model.get("s_embed", True))
    cfg.extra_null_row = bool(extra)
  elif model_type == "SongUNet":
    _check_keys(model, _UNET_KEYS, "SongUNet")
    _require(model, "augment_dim", 0, "SongUNet augment_dim")
    num_classes = label_dim
    cfg.name = "unet"
    cfg.model_channels = int(model.get("model_channels", 128))
    cfg.channel_mult = list(model.get("channel_mult", [1, 2, 2, 2]))
    cfg.channel_mult_emb = int(model.get("channel_mult_emb", 4))
    cfg.num_blocks = int(model.get("num_blocks", 4))
    cfg.attn_resolutions = list(model.get("attn_resolutions", [16]))
    cfg.dropout = float(model.get("dropout", 0.10))
    cfg.embedding_type = str(model.get("embedding_type", "positional"))
    cfg.channel_mult_noise = int(model.get("channel_mult_noise", 1))
    cfg.encoder_type = str(model.get("encoder_type", "standard"))
    cfg.decoder_type = str(model.get("decoder_type", "standard"))
    cfg.resample_filter = list(model.get("resample_filter", [1, 1]))
    cfg.s_embed = bool(model.get("s_embed", True))
    if cfg.embedding_type == "fourier":
      cfg.fourier_scale = float(model.get("embedding_kwargs", {}).get("scale", 0.02))
  else:
    raise ValueError(f"reference model_type {model_type!r} is not supported: choose 'DiT' or 'SongUNet'")

  schedule = pre.get("noise_schedule", "fm")
  if schedule not in _NOISE_SCHEDULES:
    raise ValueError(f"reference noise_schedule {schedule!r} is not supported: choose one of "
                     f"{tuple(_NOISE_SCHEDULES)}")
  precond = ml_collections.ConfigDict()
  precond.interpolant = _NOISE_SCHEDULES[schedule]
  precond.f_type = str(pre.get("f_type", "euler_fm"))
  precond.temb_type = str(pre.get("temb_type", "identity"))
  precond.sigma_d = float(pre.get("sigma_data", 0.5))
  precond.time_scale = float(pre.get("time_scale", 1000.0))
  precond.eps = float(pre.get("eps", 0.0))
  precond.T = float(pre.get("T", 0.994))

  module = create_network(cfg, input_shape=(res, res, channels), num_classes=num_classes)
  return module, cfg, precond


def _check_keys(model: Mapping, known: set, what: str):
  unknown = sorted(set(model) - known)
  if unknown:
    raise ValueError(f"reference {what} kwargs {unknown} are not understood by the converter")


def _require(model: Mapping, key: str, value, what: str):
  if key in model and model[key] != value:
    raise ValueError(f"{what} ({key}={model[key]!r}) is not supported (only {value!r})")


# --------------------------------------------------------------------------------------------------
# State dict -> params.

_LEAF_TO_TORCH = {"kernel": "weight", "bias": "bias", "scale": "weight", "freqs": "freqs",
                  "embedding_table": "embedding_table.weight"}


def _module_to_torch(part: str, model_name: str) -> str:
  if model_name == "dit":
    if part == "adaLN_modulation":
      return "adaLN_modulation.1"
    if part == "x_embedder":
      return "x_embedder.proj"
    return re.sub(r"^(blocks|mlp)_(\d+)$", r"\1.\2", part)
  if model_name == "unet":
    return re.sub(r"^(enc|dec)_", r"\1.", part)
  return part


def reference_key(path: tuple[str, ...], model_name: str) -> str:
  """The reference state-dict key (with ``model.``) of one of our parameter paths."""
  *mods, leaf = path
  return PREFIX + ".".join([_module_to_torch(m, model_name) for m in mods] + [_LEAF_TO_TORCH[leaf]])


def _to_ours(value: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel":
    if value.ndim == 2:
      value = value.T
    elif value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
  return value


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], module, model_cfg):
  """Our params pytree (float32) from the flat reference state dict (keys ``model.*``).

  The buffers ``pos_embed`` / ``*.resample_filter`` must equal our constants (else ValueError naming
  the key; see ``variables_from_state_dict`` for a state dict with a modified pos_embed).
  """
  return _convert(state_dict, module, model_cfg, load_pos_embed=False)["params"]


def variables_from_state_dict(state_dict: Mapping[str, np.ndarray], module, model_cfg):
  """``{'params': ..., 'buffers': {'pos_embed': ...}}`` for a DiT: as ``params_from_state_dict`` but
  the reference pos_embed is carried over as-is instead of being checked against the sin-cos table.

  The reference keeps pos_embed as a frozen nn.Parameter, so tools that perturb or fine-tune "all
  parameters" (the reference test vectors do) change it; the DiT reads ``buffers/pos_embed`` when
  present. For SongUNet this is ``{'params': ...}``.
  """
  return _convert(state_dict, module, model_cfg, load_pos_embed=True)


def _convert(state_dict, module, model_cfg, *, load_pos_embed: bool):
  name = model_cfg.name
  abstract = _abstract_params(module)
  flat = flax.traverse_util.flatten_dict(abstract)
  expected = {reference_key(path, name): path for path in flat}
  buffers = _expected_buffers(module)

  out, loaded_buffers = {}, {}
  for key, value in state_dict.items():
    value = np.asarray(value)
    if key in buffers:
      want = buffers[key]
      if value.shape != want.shape:
        raise ValueError(f"reference buffer {key}: shape {value.shape} differs from ours {want.shape}")
      if load_pos_embed and key == PREFIX + "pos_embed":
        loaded_buffers["pos_embed"] = jnp.asarray(value.astype(np.float32))
      elif not np.allclose(value, want, rtol=0, atol=1e-6):
        raise ValueError(f"reference buffer {key} differs from our fixed constant "
                         f"(max abs diff {np.max(np.abs(value - want)):.3g})"
                         + ("; use variables_from_state_dict to carry it over"
                            if key == PREFIX + "pos_embed" else ""))
      continue
    if key not in expected:
      raise ValueError(f"unknown reference key {key} (shape {value.shape}): no {name} parameter maps to it")
    path = expected[key]
    ours = flat[path]
    converted = _to_ours(value, path[-1])
    if tuple(converted.shape) != tuple(ours.shape):
      raise ValueError(f"shape mismatch for reference key {key}: reference {value.shape} -> "
                       f"{converted.shape} after layout conversion, ours {'/'.join(path)} {ours.shape}")
    out[path] = jnp.asarray(converted.astype(np.float32))
  missing = sorted(k for k, p in expected.items() if p not in out)
  if missing:
    raise ValueError(f"reference state dict lacks {len(missing)} parameter(s): {', '.join(missing)}")
  missing_buffers = sorted(set(buffers) - set(state_dict))
  if missing_buffers:
    raise ValueError(f"reference state dict lacks buffer(s): {', '.join(missing_buffers)}")
  variables = {"params": flax.traverse_util.unflatten_dict(out)}
  if loaded_buffers:
    variables["buffers"] = loaded_buffers
  return variables


def _example_inputs(module):
  if isinstance(module, DiT):
    x = jnp.zeros((1, module.input_size, module.input_size, module.in_channels), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if module.num_classes else None
  elif isinstance(module, SongUNet):
    x = jnp.zeros((1, module.img_resolution, module.img_resolution, module.in_channels), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if module.label_dim else None
  elif isinstance(module, MLP):
    raise ValueError("the MLP has no reference counterpart")
  else:
    raise ValueError(f"cannot convert into {type(module).__name__}")
  return x, labels


def _abstract_params(module):
  x, labels = _example_inputs(module)
  t = jnp.zeros((1,), jnp.float32)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, t, t, labels))
  return shapes["params"]


def _expected_buffers(module) -> dict[str, np.ndarray]:
  buffers = {}
  if isinstance(module, DiT):
    grid = module.input_size // module.patch_size
    buffers[PREFIX + "pos_embed"] = get_2d_sincos_pos_embed(module.hidden_size, grid)[None].astype(np.float32)
    return buffers
  # SongUNet: a 1x1xkxk resample filter on every Conv2d that resamples.
  f = resample_filter_2d(module.resample_filter)[None, None]
  for name in _resampling_convs(module):
    buffers[PREFIX + name + ".resample_filter"] = f
  return buffers


def _resampling_convs(module) -> list[str]:
  """Reference names of the SongUNet convs that carry a resample_filter buffer."""
  names = []
  mults = list(module.channel_mult)
  for level in range(1, len(mults)):
    res = module.img_resolution >> level
    names += [f"enc.{res}x{res}_down.conv0", f"enc.{res}x{res}_down.skip"]
    if module.encoder_type == "skip":
      names.append(f"enc.{res}x{res}_aux_down")
    if module.encoder_type == "residual":
      names.append(f"enc.{res}x{res}_aux_residual")
  for level in range(len(mults) - 1):
    res = module.img_resolution >> level
    names += [f"dec.{res}x{res}_up.conv0", f"dec.{res}x{res}_up.skip"]
    if module.decoder_type == "skip":
      names.append(f"dec.{res}x{res}_aux_up")
  return names
