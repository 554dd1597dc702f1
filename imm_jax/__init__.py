"""imm_jax: Inductive Moment Matching (Zhou, Ermon, Song, ICML 2025) in JAX/Flax; see README.md."""

import ctypes
import importlib.util
import os
import sys


def _cpu_where_the_cuda_plugin_has_no_driver() -> None:
  """JAX's CUDA plugin (the gpu-aot extra, or jax[cuda13] on a machine without a GPU) looks for the CUDA
  driver whenever JAX starts its backends and, finding none, prints a long traceback before falling back
  to the CPU. Where the plugin is installed but no driver can be loaded, choose the CPU up front: the
  same outcome, without the traceback. A JAX_PLATFORMS already set is left alone."""
  if os.environ.get("JAX_PLATFORMS") or not sys.platform.startswith("linux"):
    return
  try:
    plugin = any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13))
  except ImportError:
    plugin = False
  if not plugin:
    return
  try:
    ctypes.CDLL("libcuda.so.1")
  except OSError:
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported before us: its config has read the environment already
      sys.modules["jax"].config.update("jax_platforms", "cpu")


_cpu_where_the_cuda_plugin_has_no_driver()
