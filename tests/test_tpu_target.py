"""Compiling for a Cloud TPU slice on this CPU-only machine (imm_jax.tpu_target, imm_jax.aot --target v5e)
through libtpu, which the test command installs (the tpu extra): XLA:TPU's own pipeline, with the per-chip
memory checked against the train state's bytes and the FLOPs against the CPU compiler's count."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import imm_jax
from imm_jax import aot, benchmark, profiling, tpu_target
from imm_jax.configs_loader import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_libtpu = pytest.mark.skipif(not imm_jax._installed("libtpu"), reason="libtpu is not installed "  # pylint: disable=protected-access
                                  "(pip install -e '.[tpu]'; the README's test command does)")


def state_bytes(step, per_device: bool = False) -> int:
  leaves = jax.tree.leaves(step.abstract_state)
  return sum(int(np.prod(l.sharding.shard_shape(l.shape) if per_device else l.shape)) * l.dtype.itemsize
             for l in leaves)


def test_slices_are_the_cloud_tpu_shapes_and_names():
  """Cloud TPU's slice tables: v5e / v6e 8 chips = 2x4 (v5litepod-8, v6e-8), 256 = 16x16; v5p counts
  TensorCores in its names, 4 chips = 2x2x1 (v5p-8), 64 = 4x4x4 (v5p-128), 128 = 4x4x8 (v5p-256)."""
  v5e, v5p, v6e = (tpu_target.TARGETS[k] for k in ("v5e", "v5p", "v6e"))
  assert [v5e.topology(n) for n in (1, 4, 8, 16, 32, 64, 128, 256)] == \
      ["1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"]
  assert (v5e.accelerator_type(8), v6e.accelerator_type(256)) == ("v5litepod-8", "v6e-256")
  assert [v5p.topology(n) for n in (4, 8, 16, 32, 64, 128, 256, 512)] == \
      ["2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"]
  assert (v5p.accelerator_type(4), v5p.accelerator_type(64)) == ("v5p-8", "v5p-128")
  with pytest.raises(ValueError, match=r"--num_devices=2 is not a v5p slice: give its number of chips, one of 4, 8,"):
    v5p.topology(2)
  with pytest.raises(ValueError, match=r"--num_devices=512 is not a v6e slice"):
    v6e.topology(512)
  with pytest.raises(ValueError, match=r"unknown TPU target 'v4' \(--target\): choose one of \('v5e', 'v5p', 'v6e'\)"):
    tpu_target.devices("v4", 4)
  # --target (launch/tpu_pod.sh check's ACCELERATOR_TYPE): a generation, or any slice's accelerator type.
  assert tpu_target.resolve("v5p") == ("v5p", None)
  for key, target in tpu_target.TARGETS.items():
    assert all(tpu_target.resolve(target.accelerator_type(n)) == (key, n) for n in target.slice_sizes())
  assert tpu_target.resolve("v5e-16") == ("v5e", 16)  # the generation's own name works too
  with pytest.raises(ValueError, match=r"--target v5p-6: not a v5p slice; its accelerator types are v5p-8, "
                                       r"v5p-16, v5p-32, v5p-64, ..., v5p-16384"):
    tpu_target.resolve("v5p-6")
  assert [tpu_target.resolve(name) for name in ("v4-32", "v6e-x", "h100")] == [None] * 3


@pytest.mark.parametrize("cuda,driver,libtpu,chips,expected", [
    (False, False, False, False, None),        # no plugin: JAX's choice
    (True, False, False, False, "cpu"),        # the gpu-aot extra on a CPU machine
    (False, False, True, False, "cpu"),        # the tpu extra on a CPU machine
    (True, False, True, False, "cpu"),         # both (this test machine)
    (True, True, True, False, "cuda,cpu"),     # a GPU machine with libtpu installed
    (True, False, True, True, "tpu,cpu"),      # a TPU VM with the CUDA plugin installed
    (False, False, True, True, None),          # a TPU VM
    (True, True, False, False, None),          # a GPU machine
])
def test_plugins_without_their_hardware_are_not_started(monkeypatch, cuda, driver, libtpu, chips, expected):
  monkeypatch.setattr(imm_jax, "_installed", lambda m: cuda if m.startswith("jax_plugins.xla_cuda") else
                      libtpu if m == "libtpu" else False)
  monkeypatch.setattr(imm_jax, "_cuda_driver", lambda: driver)
  monkeypatch.setattr(tpu_target, "tpu_attached", lambda: chips)
  assert imm_jax._platforms_to_start() == expected  # pylint: disable=protected-access


def test_benchmark_on_a_tpu_reports_the_timed_step_against_xlas_estimate():
  result = {"what": "train", "seconds_per_step": 0.3, "examples_per_second": 13653.3, "xla_estimate_ms": 270.0}
  assert "XLA's cost model of the compiled step: 270.0 ms; the timed step (300.0 ms) takes 1.11x that" in \
      benchmark.report(result, None).splitlines()


@needs_libtpu
def test_a_multi_host_slice_is_described_from_one_process():
  """...and the TPU VM environment libtpu is given to load does not outlive the call: a process left with
  TPU_WORKER_HOSTNAMES would take itself for a pod worker (imm_jax.distributed)."""
  before = {k: v for k, v in os.environ.items() if k.startswith(("TPU_", "ALLOW_MULTIPLE_LIBTPU"))}
  devices = tpu_target.devices("v5p", 8)  # v5p-16: two hosts of 4 chips
  assert {k: v for k, v in os.environ.items() if k.startswith(("TPU_", "ALLOW_MULTIPLE_LIBTPU"))} == before
  assert len(devices) == 8 and {d.device_kind for d in devices} == {"TPU v5"}
  assert sorted({d.process_index for d in devices}) == [0, 1]
  assert sorted(tuple(d.coords) for d in devices) == [(x, y, z) for x in (0, 1) for y in (0, 1) for z in (0, 1)]
  assert {d.device_kind for d in tpu_target.devices("v5e", 4)} == {"TPU v5 lite"}


def assert_kernel_gradients_summed_in_float32(step):
  """The kernels' gradients (99.3% of the digits DiT's parameters) are summed across the chips in float32
  (layers.dense: XLA:TPU otherwise sums them in bf16), the biases' in bf16."""
  sums = profiling.reduction_bytes(step.compiled.as_text())
  assert 0.99 * 4 * step.num_params <= sums["f32"] <= 1.01 * 4 * step.num_params  # each sum once
  assert sums["bf16"] <= 0.01 * 2 * step.num_params


@needs_libtpu
def test_step_for_a_v5e_slice_holds_the_state_and_does_the_cpu_programs_flops():
  """Data parallel on 4 v5e chips: each chip's arguments are the whole train state (plus its share of
  the batch and the chip's tile padding); with FSDP over the 4 chips about a quarter of it; per example
  the FLOPs of the CPU compiler's program of the same step. (At depth 1: three compiles of a 4-block
  step take ~80 s on a 2-core CPU, and nothing checked here depends on the depth.)"""
  config = load_config("digits")
  config.model.depth = 1
  cpu = aot.compile_update_fn(config, devices=jax.devices()[:1])
  chips = tpu_target.devices("v5e", 4)
  replicated = aot.compile_update_fn(config, devices=chips)
  assert replicated.mesh.devices.flat[0].platform == "tpu"
  batch_share = 128 // 4 * (16 * 16 * 4 + 4)
  full = state_bytes(replicated)
  assert full + batch_share <= replicated.memory["arguments"] <= 1.02 * (full + batch_share)
  assert replicated.flops * 4 / 128 == pytest.approx(cpu.flops / 128, rel=0.05)
  assert replicated.estimated_seconds >= replicated.flops / tpu_target.TARGETS["v5e"].peak_flops
  assert_kernel_gradients_summed_in_float32(replicated)

  config.mesh.fsdp, config.mesh.fsdp_min_size = 4, 2**10
  sharded = aot.compile_update_fn(config, devices=chips)
  assert state_bytes(sharded, per_device=True) < 0.3 * full
  assert state_bytes(sharded, per_device=True) <= sharded.memory["arguments"] < 0.3 * full
  assert_kernel_gradients_summed_in_float32(sharded)
  text = aot.describe(sharded, config, tpu_target.TARGETS["v5e"])
  assert "on 4 TPU v5 lite (compile-only; v5litepod-4, topology 2x2) devices, mesh data=1 x fsdp=4" in text
  assert "of the chip's 16.000 GiB of HBM" in text and re.search(r"XLA:TPU's cost model: [0-9.]+ ms per step", text)


@needs_libtpu
def test_sampler_estimate_counts_every_step():
  """XLA:TPU's cost model takes the sampler's loop body once; the estimate charges it per step, so 2
  steps (a loop) cost about twice 1 (no loop: the whole program is costed). The 1-step program's FLOPs
  as XLA:TPU counts them are the network's on a chip's conditional and null rows, as counted here."""
  config = load_config("digits", "cond")
  chips = tpu_target.devices("v5e", 4)
  one, two = (aot.compile_sampler(config, steps, 1.5, 256, devices=chips) for steps in (1, 2))
  assert " while(" in two.compiled.as_text() and " while(" not in one.compiled.as_text()
  assert two.estimated_seconds == pytest.approx(2 * one.estimated_seconds, rel=0.1)
  assert aot.flop_count(one.compiled) == pytest.approx(one.flops, rel=0.05)
  assert one.flops == pytest.approx(aot.forward_flops(one.model, 256 // 4 * 2)) and two.flops == 2 * one.flops


def test_hbm_refusal_reads_the_same_from_either_libtpu():
  """libtpu 0.0.42 (jax 0.10) and 0.0.50 (jax 0.12) word XLA:TPU's refusal differently; the line is one."""
  figures = ("Ran out of memory on HBM, the total memory required for HLO temporaries (24.99G) exceeds "
             "available HBM (15.75G)")

  class Lowered:
    def __init__(self, message):
      self.message = message

    def compile(self, options=None):
      raise jax.errors.JaxRuntimeError(self.message)

  for message in (f"RESOURCE_EXHAUSTED: {figures}.",
                  f"RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: {figures}. HLO module: jit_update_fn"):
    with pytest.raises(ValueError) as e:
      aot._compile(Lowered(message), "the step", compile_only=True)  # pylint: disable=protected-access
    assert str(e.value) == (f"the step does not fit one device ({figures}): set config.model.remat, "
                            "config.grad_accum_steps or config.mesh.fsdp, or use more --num_devices")
    assert e.value.input_error
  with pytest.raises(jax.errors.JaxRuntimeError):
    aot._compile(Lowered("INTERNAL: something else"), "the step", compile_only=True)  # pylint: disable=protected-access


@needs_libtpu
def test_cli_step_that_does_not_fit_the_hbm_is_one_line():
  env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
  proc = subprocess.run(
      [sys.executable, "-m", "imm_jax.aot", "--config", "configs/digits.py", "--target", "v5litepod-4",
       "--config.batch_size=262144"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: the step at batch 262144 (65536 per device per micro-batch) does not fit one "
                         "device (Ran out of memory on HBM"), proc.stderr[-2000:]
  assert "exceeds available HBM (15.75G)): set config.model.remat, config.grad_accum_steps" in last
  proc = subprocess.run([sys.executable, "-m", "imm_jax.aot", "--config", "configs/digits.py", "--target", "v4-32"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
      "error: --target v4-32: compiles for a GPU (h100, h200), a TPU generation (v5e, v5p, v6e) with "
      "--num_devices, or a Cloud TPU accelerator type (v5litepod-4, v5p-16, v6e-4, ...)"), proc.stderr[-2000:]
