"""Shared test set-up: a persistent XLA compilation cache so that the many small jitted programs the
end-to-end tests build (each trainer run, each subprocess) compile once per machine, not once per test."""

import os

# The suite runs on CPUs. With JAX's CUDA plugin and libtpu installed (the gpu-aot and tpu extras, for
# compiling for GPUs and TPU slices in tests/test_gpu_target.py and tests/test_tpu_target.py) this keeps
# every process, subprocesses included, from looking for a driver or a TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's programs are small and run a few steps, so compiling them dominates: XLA's backend (LLVM)
# optimisation is turned off (jax_disable_most_optimizations; the HLO passes, and so the programs' FLOPs,
# fusions and numerics up to float rounding, are unchanged), which makes the suite ~25% faster.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

CACHE_DIR = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                              ".pytest_cache", "jax_cache"))
# Subprocesses started by tests inherit these through the environment.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def make_tiny_digits(num_steps: int = 6):
  """The default config shrunk to seconds on a CPU: 8x8 digits, a one-block DiT, batch 16."""
  from imm_jax.configs_loader import load_config
  c = load_config("digits")
  c.num_steps = num_steps
  c.batch_size = 16
  c.log_every = 1
  c.sample_every = 3
  c.checkpoint.every = 3
  c.checkpoint.async_save = False
  c.data.image_size = 8
  c.model.update(patch_size=4, hidden_size=32, depth=1, num_heads=2)
  c.optim.warmup_steps = 2
  c.sample.num = 8
  c.sample.steps = (1, 2)
  c.eval.update(num=32, samples=0, steps=(1, 2), at_start=False)
  return c


@pytest.fixture
def tiny_digits():
  return make_tiny_digits
