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


# --- The static account (profiling.hlo_account) on hand-written optimised HLO, figures worked out by hand.

HLO = """HloModule jit_step, entry_computation_layout={(bf16[256,512]{1,0})->bf16[256,128]{1,0}}

%gemm_computation (p0: bf16[256,512], p1: bf16[512,128]) -> bf16[256,128] {
  %p0 = bf16[256,512]{1,0} parameter(0)
  %p1 = bf16[512,128]{1,0} parameter(1)
  ROOT %dot.1 = bf16[256,128]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (state: (s32[], f32[256,128])) -> (s32[], f32[256,128]) {
  %state = (s32[], f32[256,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %acc = f32[256,128]{1,0} get-tuple-element(%state), index=1
  %add.9 = f32[256,128]{1,0} fusion(%acc, %acc), kind=kLoop, calls=%add_computation, metadata={op_name="jit(step)/while/body/add"}
  ROOT %t = (s32[], f32[256,128]{1,0}) tuple(%i, %add.9)
}

%add_computation (a: f32[256,128], b: f32[256,128]) -> f32[256,128] {
  %a = f32[256,128]{1,0} parameter(0)
  %b = f32[256,128]{1,0} parameter(1)
  ROOT %sum = f32[256,128]{1,0} add(%a, %b)
}

%slice_computation (p: f32[256,128]) -> f32[16,128] {
  %p = f32[256,128]{1,0} parameter(0)
  ROOT %rows = f32[16,128]{1,0} slice(%p), slice={[0:16], [0:128]}
}

ENTRY %main.7 (x: bf16[256,512], w: bf16[512,128], q: bf16[2,64,4,32], s: (s32[], f32[256,128]), big: f32[256,128]) -> bf16[256,128] {
  %x = bf16[256,512]{1,0} parameter(0)
  %w = bf16[512,128]{1,0} parameter(1)
  %q = bf16[2,64,4,32]{3,2,1,0} parameter(2)
  %s = (s32[], f32[256,128]{1,0}) parameter(3)
  %big = f32[256,128]{1,0} parameter(4)
  %slice_fusion = f32[16,128]{1,0} fusion(%big), kind=kLoop, calls=%slice_computation
  %gemm_fusion_dot.1 = bf16[256,128]{1,0} fusion(%x, %w), kind=kCustom, calls=%gemm_computation, metadata={op_name="jit(step)/dot_general"}, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
  %fmha = (bf16[2,64,4,32]{3,2,1,0}, u8[0]{0}) custom-call(%q, %q, %q), custom_call_target="__cudnn$fmhaSoftmax", backend_config={"cudnn_fmha_backend_config": {"intermediate_tensor_shape": {"element_type": "BF16", "dimensions": ["2", "4", "64", "64"]}}}
  %fmha_bwd = (bf16[2,64,4,32]{3,2,1,0}, u8[0]{0}) custom-call(%q, %q, %q), custom_call_target="__cudnn$fmhaSoftmaxBackward", backend_config={"cudnn_fmha_backend_config": {"intermediate_tensor_shape": {"element_type": "BF16", "dimensions": ["2", "4", "64", "64"]}}}
  %conv = (bf16[2,8,8,16]{3,2,1,0}, u8[0]{0}) custom-call(%q, %w), window={size=2x2 stride=2x2}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward"
  %loop = (s32[], f32[256,128]{1,0}) while(%s), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %copy.2 = bf16[128,256]{0,1} copy(%gemm_fusion_dot.1)
  ROOT %b = bf16[256,128]{1,0} bitcast(%gemm_fusion_dot.1)
}
"""


def test_hlo_account_counts_flops_bytes_and_loops_by_hand():
  a = profiling.hlo_account(HLO, peak_flops=1e12, bandwidth=1e9)
  kinds = a["kinds"]
  # GEMM: 2 * 256 * 128 * 512 FLOPs; bytes: result 256*128*2 + operands 256*512*2 + 512*128*2.
  assert kinds["matmul"]["flops"] == 2 * 256 * 128 * 512
  assert kinds["matmul"]["bytes"] == 65536 + 262144 + 131072
  assert kinds["matmul"]["ms"] == pytest.approx(1e3 * max(2 * 256 * 128 * 512 / 1e12, 458752 / 1e9))
  # cuDNN attention: 4 * (B H Sq Sk) * head_dim forward, 2.5 times that backward; q read once per call.
  forward = 4 * (2 * 4 * 64 * 64) * 32
  assert kinds["attention"]["flops"] == forward * 3.5 and kinds["attention"]["kernels"] == 2
  assert kinds["attention"]["bytes"] == 2 * (32768 + 32768)  # per call: the result tuple (q-sized, u8[0]) and q
  # cuDNN convolution: 2 * forward output (2*8*8*16) * kernel elements per output feature (w as o01i).
  assert kinds["convolution"]["flops"] == 2 * (2 * 8 * 8 * 16) * (512 * 128 // 512)
  # The loop body's fusion, three times: result + one distinct operand (read once), f32[256,128]; and a
  # fusion that reads only a 16-row slice of its operand: charged the slice, not the whole operand.
  assert kinds["fusion"]["kernels"] == 3 + 1 and kinds["fusion"]["bytes"] == 3 * 2 * 131072 + 2 * 8192
  assert kinds["copy"]["kernels"] == 1 and kinds["copy"]["bytes"] == 2 * 65536
  assert a["kernels"] == 1 + 2 + 1 + 3 + 1 + 1 and a["loops_without_trip_count"] == 0
  assert a["roofline_ms"] == pytest.approx(sum(v["ms"] for v in kinds.values()))
  assert a["top"][0]["kind"] == "fusion" and a["top"][0]["op_name"] == "jit(step)/while/body/add"
  text = profiling.describe_account(a)
  assert text.startswith(f"roofline: {a['roofline_ms']:.1f} ms per step at 1 TFLOP/s and 0.00 TB/s (9 kernels")


def test_hlo_account_counts_what_xla_rematerialised():
  """Kernels XLA's rematerialisation pass added (named <name>.remat[N][.N]) are counted apart, with their
  time; free instructions it added (a bitcast) are not kernels. Without them describe_account is silent."""
  assert profiling.hlo_account(HLO, 1e12, 1e9)["rematerialized"] == {"kernels": 0, "ms": 0}
  assert "recomputed" not in profiling.describe_account(profiling.hlo_account(HLO, 1e12, 1e9))
  text = HLO.replace("%add.9", "%add.9.remat2").replace(
      "  %copy.2 = ", "  %b.remat.3 = bf16[128,256]{1,0} bitcast(%gemm_fusion_dot.1)\n  %copy.2 = ")
  a = profiling.hlo_account(text, peak_flops=1e12, bandwidth=1e9)
  # The loop body's fusion, 3 trips: result + one operand of f32[256,128] each time, at 1 GB/s.
  assert a["rematerialized"]["kernels"] == 3
  assert a["rematerialized"]["ms"] == pytest.approx(3 * 1e3 * 2 * 131072 / 1e9)
  assert a["kernels"] == 9 and a["roofline_ms"] == pytest.approx(profiling.hlo_account(HLO, 1e12, 1e9)["roofline_ms"])
  assert "  recomputed: 3 of the kernels, 0.79 ms, added by XLA's rematerialisation pass" in \
      profiling.describe_account(a)


def test_reduction_bytes_by_element_type():
  """Each all-reduce (sync, or async counted at its done: the start's shape is the result in jax 0.10's
  XLA, ((operands), result) in jax 0.12's; a tuple counts every array) and reduce-scatter once, its
  result's bytes per element type; other collectives not at all. With ``in_loops``, only those in loop
  bodies and what they call."""
  text = """HloModule m

%sum (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %c = f32[] add(%a, %b)
}

ENTRY %main (g: f32[1024], h: bf16[64], k: f32[8,16], s: (s32[], f32[256])) -> f32[1024] {
  %g = f32[1024]{0} parameter(0)
  %h = bf16[64]{0} parameter(1)
  %k = f32[8,16]{1,0} parameter(2)
  %s = (s32[], f32[256]{0}) parameter(3)
  %ar = (f32[1024]{0}, bf16[64]{0}) all-reduce(%g, %h), replica_groups={{0,1}}, to_apply=%sum
  %ars = f32[8,16]{1,0} all-reduce-start(%k), replica_groups={{0,1}}, to_apply=%sum
  %ard = f32[8,16]{1,0} all-reduce-done(%ars)
  %ars2 = ((f32[1024]{0}), f32[1024]{0}) all-reduce-start(%g), replica_groups={{0,1}}, to_apply=%sum
  %ard2 = f32[1024]{0} all-reduce-done(%ars2)
  %rs = f32[512]{0} reduce-scatter(%g), replica_groups={{0,1}}, dimensions={0}, to_apply=%sum
  %ag = f32[2048]{0} all-gather(%g), replica_groups={{0,1}}, dimensions={0}
  %loop = (s32[], f32[256]{0}) while(%s), condition=%cond, body=%body
  ROOT %out = f32[1024]{0} get-tuple-element(%ar), index=0
}

%body (state: (s32[], f32[256])) -> (s32[], f32[256]) {
  %state = (s32[], f32[256]{0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %acc = f32[256]{0} get-tuple-element(%state), index=1
  %grad = f32[256]{0} call(%acc), to_apply=%inner
  ROOT %t = (s32[], f32[256]{0}) tuple(%i, %grad)
}

%inner (x: f32[256]) -> f32[256] {
  %x = f32[256]{0} parameter(0)
  ROOT %r = f32[256]{0} all-reduce(%x), replica_groups={{0,1}}, to_apply=%sum
}
"""
  # The one in the loop body (through the computation the body calls) is counted once, and alone with in_loops.
  assert profiling.reduction_bytes(text) == {"f32": 4 * (1024 + 128 + 1024 + 512 + 256), "bf16": 2 * 64}
  assert profiling.reduction_bytes(text, in_loops=True) == {"f32": 4 * 256}


def test_hlo_account_of_a_cpu_compile_matches_the_closed_form():
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  compiled = jax.jit(lambda x, w: jnp.tanh(x @ w)).lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile()
  a = profiling.hlo_account(compiled.as_text(), 1e12, 1e11)
  assert a["flops"] == 2 * 64 * 32 * 16
  assert a["kinds"]["matmul"]["bytes"] == 4 * (64 * 16 + 64 * 32 + 32 * 16)
