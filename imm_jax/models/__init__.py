"""Networks G(x, c_t, c_s, labels) and their construction from ``config.model``.

Every network is a Flax Linen module called as
``module.apply(variables, x, c_t, c_s, labels, train=False, rngs={'dropout': key})`` with x in NHWC
(or (N, D) for the MLP) already scaled by c_in, c_t / c_s the (N,) noise labels, and integer labels
(N,) where the value ``num_classes`` is the null class (or None for unconditional models).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from imm_jax.models.dit import DIT_PRESETS, DiT, check_attention_impl
from imm_jax.models.layers import target_platform
from imm_jax.models.mlp import MLP
from imm_jax.models.unet import SongUNet

NETWORKS = ("dit", "unet", "mlp")

# config.model fields that change how a network is computed, not its parameters: runs that share
# parameters (a distillation teacher and its student, a checkpoint and a later run) may differ in them.
EXECUTION_OPTIONS = ("dtype", "remat", "attention_impl")

__all__ = ["DIT_PRESETS", "DiT", "EXECUTION_OPTIONS", "MLP", "NETWORKS", "SongUNet", "count_params",
           "create_network", "target_platform"]


_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "fp16": jnp.float16}


def _kwargs(model_cfg, drop: tuple[str, ...]) -> dict[str, Any]:
  items = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
  out = {}
  for k, v in items.items():
    if k in drop or (k == "preset" and not v):
      continue
    if k == "dtype" and isinstance(v, str):
      if v not in _DTYPES:
        raise ValueError(f"unknown compute dtype {v!r} (config.model.dtype): choose one of {tuple(_DTYPES)}")
      v = _DTYPES[v]
    out[k] = tuple(v) if isinstance(v, list) else v
  return out


def _build(cls, name: str, **kwargs):
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"config.model.{unknown[0]} is not an option of {cls.__name__} "
                     f"(config.model.name={name!r}); options: {sorted(fields)}")
  return cls(**kwargs)


def _spatial(input_shape: tuple, name: str) -> tuple[int, int, int]:
  shape = tuple(int(d) for d in input_shape)
  if len(shape) == 4:  # with a batch axis
    shape = shape[1:]
  if len(shape) != 3 or shape[0] != shape[1]:
    raise ValueError(f"config.model.name={name!r} needs square NHWC images: input_shape (H, W, C) with "
                     f"H == W (optionally with a leading batch axis), got {tuple(input_shape)}")
  return shape


def create_network(model_cfg, *, input_shape: tuple, num_classes: int):
  """Build the network named by ``model_cfg.name`` ('dit' | 'unet' | 'mlp').

  ``input_shape``: one example's shape, (H, W, C) for images or (D,) for vectors (a leading batch
  axis is accepted and ignored). ``num_classes``: 0 for unconditional data; the null label is
  ``num_classes``. The remaining ``model_cfg`` fields are the network's keyword arguments (``dtype``
  may be a string: 'float32', 'bfloat16'/'bf16', 'float16'); for DiT an optional ``preset`` ('S/2',
  'B/4', 'XL/2', ...) supplies patch_size / hidden_size / depth / num_heads, which explicit fields
  override (an empty preset is ignored). ``remat`` (every network) and ``attention_impl`` (DiT) are
  described in config_base.py.
  """
  name = model_cfg.name
  if name == "dit":
    h, _, c = _spatial(input_shape, name)
    kwargs = _kwargs(model_cfg, ("name", "preset"))
    preset = model_cfg.get("preset", None) if hasattr(model_cfg, "get") else None
    if preset:
      if preset not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r} (config.model.preset): choose one of "
                         f"{tuple(DIT_PRESETS)}")
      kwargs = {**DIT_PRESETS[preset], **kwargs}
    net = _build(DiT, name, input_size=h, in_channels=c, num_classes=num_classes, **kwargs)
    check_attention_impl(net.attention_impl, net.dtype)  # at build time, not deep in the first trace
    return net
  if name == "unet":
    h, _, c = _spatial(input_shape, name)
    kwargs = _kwargs(model_cfg, ("name",))
    return _build(SongUNet, name, img_resolution=h, in_channels=c, out_channels=c, label_dim=num_classes,
                  **kwargs)
  if name == "mlp":
    return _build(MLP, name, num_classes=num_classes, **_kwargs(model_cfg, ("name",)))
  raise ValueError(f"unknown network {name!r} (config.model.name): choose one of {NETWORKS}")


def count_params(params: Mapping) -> int:
  """Number of scalars in a params pytree (works on jax.eval_shape's ShapeDtypeStructs too)."""
  return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree_util.tree_leaves(params)))
