"""imm_jax: Inductive Moment Matching (Zhou, Ermon, Song, ICML 2025) in JAX/Flax; see README.md."""

import ctypes
import importlib.util
import os
import sys

from imm_jax import tpu_target


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ImportError:
    return False


def _cuda_driver() -> bool:
  try:
    ctypes.CDLL("libcuda.so.1")
  except OSError:
    return False
  return True


def _platforms_to_start() -> str | None:
  """JAX starts every installed accelerator plugin. JAX's CUDA plugin (the gpu-aot extra, or jax[cuda13])
  on a machine without the CUDA driver prints a long traceback before JAX falls back to the CPU; libtpu
  (the tpu extra) on a machine without TPU chips waits on the TPU VM's metadata server and prints
  warnings. Where an installed plugin has no hardware, this names the platforms JAX should start (the
  same outcome, without the noise and the wait), e.g. "cpu" or "cuda,cpu"; None where each installed
  plugin has its hardware, or none is installed: JAX's own choice."""
  cuda = any(_installed(f"jax_plugins.xla_cuda{v}") for v in (12, 13))
  tpu = _installed("libtpu")
  working = (["cuda"] if cuda and _cuda_driver() else []) + (["tpu"] if tpu and tpu_target.tpu_attached() else [])
  if len(working) == cuda + tpu:
    return None
  return ",".join(working + ["cpu"])


def _skip_accelerator_plugins_without_hardware() -> None:
  """Sets JAX_PLATFORMS to :func:`_platforms_to_start`'s choice; one already set is left alone."""
  if os.environ.get("JAX_PLATFORMS") or not sys.platform.startswith("linux"):
    return
  platforms = _platforms_to_start()
  if platforms is None:
    return
  os.environ["JAX_PLATFORMS"] = platforms
  if "jax" in sys.modules:  # imported before us: its config has read the environment already
    sys.modules["jax"].config.update("jax_platforms", platforms)


_skip_accelerator_plugins_without_hardware()
