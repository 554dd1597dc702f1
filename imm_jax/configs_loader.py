"""Load a config file (``configs/NAME.py``, or any path) the way ``--config FILE:ARG`` does."""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from imm_jax.io_utils import fail

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


def check_config_argv(argv, flag: str = "config") -> None:
  """Stop with one line on a bad ``--config FILE[:ARG]`` or ``--config.KEY=VALUE`` in ``argv``.

  Run by the executables before absl parses their flags: ml_collections' own errors for a missing file,
  a bad variant or a misspelt key are tracebacks. Values themselves are left to the flag parser (its
  error already names the flag).
  """
  value, overrides = None, []
  for i, item in enumerate(argv[1:], 1):
    if item == f"--{flag}" and i + 1 < len(argv):
      value = argv[i + 1]
    elif item.startswith(f"--{flag}="):
      value = item.split("=", 1)[1]
    elif item.startswith((f"--{flag}.", f"--no{flag}.")):
      overrides.append(item.split("=", 1)[0].split(".", 1)[1])
  if value is None:
    return  # absl reports the missing required flag
  path, _, arg = value.partition(":")
  if not os.path.isfile(path):
    names = sorted(n for n in os.listdir(CONFIG_DIR) if n.endswith(".py")) if os.path.isdir(CONFIG_DIR) else []
    fail(f"--{flag}: no config file {path!r}; give a path such as configs/digits.py"
                     + (f" (the files in {CONFIG_DIR}: {', '.join(names)})" if names else ""))
  try:
    config = load_config(path, arg)
  except Exception as e:  # the config file's own error, e.g. an unknown variant
    fail(f"--{flag} {value}: {type(e).__name__}: {e}")
  for key in overrides:
    try:
      config_lookup(config, key)
    except KeyError as e:
      fail(f"--{flag}.{key}: {path}: {e.args[0]}")


def config_lookup(config, key: str):
  """(parent, name) of a dotted ``key`` in a ConfigDict, so that ``parent[name]`` is the option.

  A KeyError names the missing part and lists the options where it should be (a typo must not pass
  silently, and the message shows the right spelling).
  """
  node, done = config, []
  for part in key.split("."):
    where = ".".join(["config", *done])
    if not isinstance(node, (ml_collections.ConfigDict, dict)):
      raise KeyError(f"no such config key {key!r} ({where} is a value, not a group)")
    if part not in node:
      raise KeyError(f"no such config key {key!r} ({where} has: {', '.join(sorted(node.keys()))})")
    parent, node = node, node[part]
    done.append(part)
  return parent, part
