"""A reference network (meta + state dict) -> an imm_jax sampling workdir.

  DIR/config.json                 an imm_jax config: the network, precond, eps / T, sampling defaults and
                                  ``data.name='none'`` with the example shape (there is no dataset)
  DIR/checkpoints/0/state         Orbax: {ema_params[, buffers]} (``checkpoints.save_params_only``)

``python -m imm_jax.sample --workdir DIR`` samples it like a trained workdir.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Mapping

import ml_collections
import numpy as np

from imm_jax import checkpoints
from imm_jax.builder import NO_DATA, build_model
from imm_jax.config_base import base_config
from imm_jax.convert.reference import network_from_reference, variables_from_state_dict
from imm_jax.models.dit import get_2d_sincos_pos_embed

IMAGE_CHANNELS = (1, 3)  # anything else (e.g. 4 SD-VAE channels) is a latent space


def config_from_reference(meta: Mapping[str, Any], *, state_dict: Mapping[str, np.ndarray] | None = None,
                          source: str = "") -> ml_collections.ConfigDict:
  """The imm_jax config that rebuilds the reference network of ``meta`` and samples it as the authors
  do. ``meta``: ``precond`` and ``model`` kwargs (test-vector layout), optional ``cfg_scale`` and
  ``sample`` (defaults for config.sample: steps, cfg_scale, schedule, mid_etas)."""
  _, model_cfg, precond_cfg = network_from_reference(meta, state_dict=state_dict)
  pre = meta["precond"]
  res, channels = int(pre["img_resolution"]), int(pre["img_channels"])
  label_dim = int(pre.get("label_dim") or 0)

  c = base_config()
  c.data = ml_collections.ConfigDict(dict(
      name=NO_DATA, shape=(res, res, channels), num_classes=label_dim,
      kind="image" if channels in IMAGE_CHANNELS else "latent"))
  model = model_cfg.to_dict()
  model.update(class_conditional=label_dim > 0, dtype="float32")
  c.model = ml_collections.ConfigDict(model)
  c.precond.update(interpolant=precond_cfg.interpolant, f_type=precond_cfg.f_type,
                   temb_type=precond_cfg.temb_type, sigma_d=precond_cfg.sigma_d,
                   time_scale=precond_cfg.time_scale)
  c.imm.update(eps=precond_cfg.eps, T=precond_cfg.T)
  sample = dict(meta.get("sample") or {})
  cfg_scale = sample.get("cfg_scale", meta.get("cfg_scale"))
  c.sample.update(
      steps=tuple(sample.get("steps", (1, 2, 4))),
      schedule=str(sample.get("schedule", "default")),
      mid_etas=tuple(sample.get("mid_etas", ())),
      cfg_scale=float(cfg_scale) if label_dim and cfg_scale is not None else 1.0)
  c.eval.update(num=0)
  c.converted_from = str(source)
  return c


def convert_to_workdir(state_dict: Mapping[str, np.ndarray], meta: Mapping[str, Any], out: str, *,
                       overwrite: bool = False, source: str = "") -> ml_collections.ConfigDict:
  """Convert and write the workdir ``out`` (see the module docstring); returns its config.

  Every key of ``state_dict`` must map to a parameter and every parameter must be present (else a
  ValueError naming the key) before anything is written. A DiT pos_embed that differs from the
  sin-cos table is kept as the ``buffers/pos_embed`` variable. ``out`` must not exist or be empty
  unless ``overwrite`` (which replaces its config.json and checkpoints/ only).
  """
  check_out(out, overwrite)
  config = config_from_reference(meta, state_dict=state_dict, source=source)
  model = build_model(config)
  variables = variables_from_state_dict(state_dict, model.net, config.model)
  buffers = dict(variables.get("buffers", {}))
  if "pos_embed" in buffers:
    net = model.net
    table = get_2d_sincos_pos_embed(net.hidden_size, net.input_size // net.patch_size)[None]
    if np.allclose(np.asarray(buffers["pos_embed"]), table, rtol=0, atol=1e-6):
      del buffers["pos_embed"]  # the fixed table the DiT computes anyway
  _prepare_out(out, overwrite)
  checkpoints.write_config(out, config)
  checkpoints.save_params_only(out, variables["params"], buffers=buffers or None)
  return config


def check_out(out: str, overwrite: bool):
  """FileExistsError unless ``out`` is new or empty (or ``overwrite``)."""
  if os.path.isfile(out):
    raise FileExistsError(f"--out={out} is a file; give a directory")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise FileExistsError(f"--out={out} exists and is not empty; choose another directory or pass "
                          f"--overwrite (replaces its config.json and checkpoints/)")


def _prepare_out(out: str, overwrite: bool):
  check_out(out, overwrite)
  if os.path.isdir(out) and os.listdir(out):
    shutil.rmtree(checkpoints.checkpoint_dir(out), ignore_errors=True)
    config_path = os.path.join(out, checkpoints.CONFIG_FILE)
    if os.path.exists(config_path):
      os.remove(config_path)
  os.makedirs(out, exist_ok=True)
