"""imm_jax.profiling: device time from a JAX profiler trace, checked on hand-made traces in the profiler's
GPU and TPU layouts (per-step figures worked out by hand), and end to end on this CPU."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from conftest import make_tiny_digits
from imm_jax import benchmark, profiling

NVJET = "nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_NTN"
FLASH = "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_kernel0_0"


def _meta(pid, tid, kind, name):
  event = {"ph": "M", "pid": pid, "name": kind, "args": {"name": name}}
  if tid is not None:
    event["tid"] = tid
  return event


def _kernel(pid, tid, name, ts, dur, hlo_op=""):
  return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur, "args": {"hlo_op": hlo_op}}


def gpu_trace(steps: int = 2) -> list[dict]:
  """Per step (1000 us apart) on GPU 0: a GEMM 0-400 us, flash attention 400-600, a fusion 600-700, a
  device copy 650-750 on a second stream (overlapping the fusion), a reduction 750-800. The derived
  "XLA Ops" line and the host's events must not count."""
  events = [_meta(1, None, "process_name", "/device:GPU:0"), _meta(1, 13, "thread_name", "Stream #13(Compute)"),
            _meta(1, 14, "thread_name", "Stream #14(MemcpyD2D)"), _meta(1, 1000, "thread_name", "XLA Ops"),
            _meta(701, None, "process_name", "/host:CPU"), _meta(701, 5, "thread_name", "python")]
  for k in range(steps):
    t = 1000.0 * k
    events += [_kernel(1, 13, NVJET, t, 400, "dot.12"), _kernel(1, 13, FLASH, t + 400, 200, "custom-call.3"),
               _kernel(1, 13, "loop_add_fusion", t + 600, 100, "add_fusion.3"),
               _kernel(1, 14, "Memcpy DtoD (Device -> Device)", t + 650, 100),
               _kernel(1, 13, "input_reduce_fusion", t + 750, 50, "reduce.7"),
               _kernel(1, 1000, "fusion.3", t, 900), _kernel(701, 5, "PjitFunction(update_fn)", t, 990)]
  return events


def test_gpu_trace_per_step_busy_time_and_kinds():
  s = profiling.summarize(gpu_trace(), steps=2, seconds_per_step=1e-3)
  assert s["kernels"] == 10 and s["kernels_per_step"] == 5
  assert s["busy_ms"] == pytest.approx(0.8)   # 0-800 us: the overlapping copy counts once
  assert s["span_ms"] == pytest.approx(0.9)   # 0 .. 1800 us over 2 steps
  assert s["busy_fraction"] == pytest.approx(0.8)
  assert s["kinds"] == pytest.approx({"matmul": 0.4, "attention": 0.2, "fusion": 0.15, "copy": 0.1})
  assert [(k["name"], k["kind"], k["calls_per_step"]) for k in s["top"][:2]] == [(NVJET, "matmul", 1),
                                                                                  (FLASH, "attention", 1)]
  assert profiling.one_line(s) == ("profile: device busy 80% of the step; matmul 47%, attention 24%, "
                                   "fusion 18%, copy 12% of the kernel time")


def test_a_trace_without_process_and_thread_names():
  """Without metadata: the device is the low pid, its kernels the low-numbered lines."""
  events = [e for e in gpu_trace() if e["ph"] != "M"]
  s = profiling.summarize(events, steps=2, seconds_per_step=1e-3)
  assert s["kernels"] == 10 and s["busy_ms"] == pytest.approx(0.8)


def test_tpu_trace_uses_the_xla_ops_line():
  events = [_meta(3, None, "process_name", "/device:TPU:0"), _meta(3, 1, "thread_name", "XLA Modules"),
            _meta(3, 2, "thread_name", "XLA Ops"), _kernel(3, 1, "jit_update_fn", 0, 500),
            _kernel(3, 2, "fusion.1", 0, 100), _kernel(3, 2, "convolution.2", 100, 300)]
  s = profiling.summarize(events, steps=1)
  assert s["kinds"] == pytest.approx({"convolution": 0.3, "fusion": 0.1}) and s["busy_ms"] == pytest.approx(0.4)
  assert profiling.one_line(s).startswith("profile: device busy 0.40 ms per step; convolution 75%, fusion 25%")


@pytest.mark.parametrize("name,hlo_op,kind", [
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "", "convolution"),
    ("loop_convert_fusion", "convert_fusion.2", "fusion"),
    ("triton_gemm_dot_1", "gemm_fusion_dot.1", "matmul"),
    ("cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_256x128_32x3_nn_align8", "", "matmul"),
    ("nccl_AllReduce_RING_LL_Sum_float", "all-reduce.1", "collective"),
    ("wrapped_transpose", "transpose.4", "copy"),
    ("some_kernel", "custom-call.9", "other"),
])
def test_kinds_of_real_kernel_names(name, hlo_op, kind):
  assert profiling.kind_of(name, hlo_op) == kind


def test_cli_summarises_a_trace_file_and_refuses_bad_paths(tmp_path, capsys):
  path = tmp_path / "host.trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"displayTimeUnit": "ns", "traceEvents": gpu_trace()}, f)
  assert profiling.main([str(path), "--steps", "2", "--step_ms", "1"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("profile: device busy 80% of the step; matmul 47%") and NVJET in out[2]
  for bad in (str(tmp_path / "missing.json.gz"), str(tmp_path)):
    with pytest.raises(SystemExit) as e:
      profiling.main([bad])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_benchmark_profiles_a_cpu_run(tmp_path):
  """On a CPU the trace is written and read, and the summary says there are no accelerator kernels."""
  result = benchmark.benchmark_train(make_tiny_digits(), repeats=1, warmup=1, profile_dir=str(tmp_path),
                                     profile_steps=2)
  prof = result["profile"]
  assert prof["kernels"] == 0 and os.path.isfile(prof["trace"]) and prof["trace"].startswith(str(tmp_path))
  assert "profile: no accelerator kernels in the trace" in benchmark.report(result, None)
