"""Shared test set-up: a persistent XLA compilation cache so that the many small jitted programs the
end-to-end tests build (each trainer run, each subprocess) compile once per machine, not once per test."""

import os

import jax
import pytest

CACHE_DIR = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                              ".pytest_cache", "jax_cache"))
# Subprocesses started by tests inherit these through the environment.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
