"""Load a config file (``configs/NAME.py``, or any path) the way ``--config FILE:ARG`` does."""

from __future__ import annotations

import importlib.util
import os

import ml_collections

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config(name_or_path: str, arg: str = "") -> ml_collections.ConfigDict:
  """``load_config('digits')`` or ``load_config('configs/toy2d.py', 'moons')``."""
  path = name_or_path if name_or_path.endswith(".py") else os.path.join(CONFIG_DIR, name_or_path + ".py")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} not found (configs live in {CONFIG_DIR})")
  spec = importlib.util.spec_from_file_location(f"imm_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()
