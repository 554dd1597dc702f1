"""The authors' generation configs (``configs/*_generate_images.yaml`` in github.com/lumalabs/imm) ->
the reference ``meta`` the converter builds networks from (same layout as a test vector's meta).

What is read: the ``network:`` section (``class_name`` must be the IMMPrecond; the precond's kwargs
``model_type``, ``noise_schedule``, ``f_type``, ``temb_type``, ``time_scale``, ``sigma_data``, ``eps``, ``T``,
``mixed_precision``; every other key is a kwarg of the network, e.g. ``s_embed`` or SongUNet's
``model_channels``), the top-level ``resolution`` / ``channels`` / ``label_dim`` the authors' scripts pass
to the precond, and the ``sampling:`` presets (``4_steps_cfg1.5_pushforward_uniform``: steps, guidance
scale and schedule) for the workdir's sampling defaults. The YAML wins over what the pickle recorded
(the authors select ``temb_type=identity`` for ``imagenet256_s_a1.pkl`` by overriding the YAML).
"""

from __future__ import annotations

import collections
import os
import re
from typing import Any, Mapping

from imm_jax.convert.reference import PRECOND_KEYS

_INTERFACE_KEYS = (("img_resolution", "resolution"), ("img_channels", "channels"), ("label_dim", "label_dim"))
_PRESET = re.compile(r"^(\d+)_steps(?:_cfg([0-9.]+))?_([a-z]+)_([a-z]+)")
_SCHEDULES = {"uniform": "uniform", "edm": "edm"}


def read_generation_yaml(path: str) -> dict:
  import yaml  # PyYAML (a flax dependency)

  if not os.path.exists(path):
    raise FileNotFoundError(f"--yaml={path}: file not found")
  with open(path) as f:
    cfg = yaml.safe_load(f)
  if not isinstance(cfg, dict) or not isinstance(cfg.get("network"), dict):
    raise ValueError(f"--yaml={path}: no 'network:' section (expected the authors' generation config, "
                     f"e.g. configs/im256_generate_images.yaml)")
  return cfg


def meta_from_generation_config(cfg: Mapping[str, Any], *, pickle_attributes: Mapping[str, Any] | None = None,
                                ) -> tuple[dict, list[str]]:
  """(meta, notes): meta = {'precond': ..., 'model': ..., 'sample': ...}; notes name every precond
  option where the YAML and the pickle's recorded attributes disagree (the YAML is used)."""
  net = dict(cfg["network"])
  class_name = net.pop("class_name", None)
  if class_name is not None and str(class_name).rsplit(".", 1)[-1] != "IMMPrecond":
    raise ValueError(f"network.class_name={class_name!r} is not supported: the converter reads "
                     f"training.preconds.IMMPrecond networks")
  precond = {k: net.pop(k) for k in PRECOND_KEYS if k in net}
  attrs = dict(pickle_attributes or {})
  for key, top in _INTERFACE_KEYS:
    if key not in precond:
      if cfg.get(top) is not None:
        precond[key] = cfg[top]
      elif attrs.get(key) is not None:
        precond[key] = attrs[key]
  for key, value in {**precond, **net}.items():
    if isinstance(value, str) and "${" in value:
      raise ValueError(f"network.{key}={value!r} is an unresolved interpolation: give its value")
  meta = {"precond": precond, "model": net,
          "sample": sample_defaults(cfg.get("sampling"), int(precond.get("label_dim") or 0))}
  return meta, disagreements(precond, attrs, "the YAML")


def disagreements(precond: Mapping[str, Any], attributes: Mapping[str, Any], what: str) -> list[str]:
  """One note per precond option where ``what`` (used) and the pickle's recorded attribute differ."""
  return [f"network.{key}: {what} says {value!r}, the pickle recorded {attributes[key]!r}; using {what}"
          for key, value in precond.items()
          if attributes.get(key) is not None and not _same(attributes[key], value)]


def _same(a, b) -> bool:
  try:
    return float(a) == float(b)
  except (TypeError, ValueError):
    return a == b


def sample_defaults(sampling: Mapping | None, label_dim: int) -> dict:
  """Sampling defaults from the authors' presets: the step counts, the most common guidance scale
  (class-conditional models) and the schedule when all presets share one."""
  steps, scales, schedules = set(), [], set()
  for name, preset in (sampling or {}).items():
    m = _PRESET.match(str(name))
    preset = preset if isinstance(preset, Mapping) else {}
    if m:
      steps.add(int(m.group(1)))
      if m.group(2):
        scales.append(float(m.group(2).rstrip(".")))
      schedules.add(m.group(4))
    if preset.get("num_steps") is not None:
      steps.add(int(preset["num_steps"]))
    if preset.get("cfg_scale") is not None:
      scales.append(float(preset["cfg_scale"]))
    if preset.get("discretization") is not None:
      schedules.add(str(preset["discretization"]))
  out = {}
  if steps:
    out["steps"] = tuple(sorted(steps))
  if label_dim and scales:
    out["cfg_scale"] = collections.Counter(scales).most_common(1)[0][0]
  if len(schedules) == 1 and next(iter(schedules)) in _SCHEDULES:
    out["schedule"] = _SCHEDULES[next(iter(schedules))]
  return out
