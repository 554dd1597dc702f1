"""Compiling for an NVIDIA GPU on this CPU-only machine (imm_jax.gpu_target, imm_jax.aot --target) through
JAX's CUDA plugin, which the test command installs (the gpu-aot extra): XLA:GPU's real pipeline, cuDNN
attention included, with FLOPs checked against the analytic DiT count and the CPU compiler's."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from imm_jax import aot, benchmark, gpu_target, models, profiling
from imm_jax.configs_loader import load_config
from imm_jax.models import dit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
  H100 = gpu_target.devices("h100", 2)
except ValueError as e:  # no CUDA plugin: the gpu-aot extra is not installed
  H100, MISSING = None, str(e)
needs_plugin = pytest.mark.skipif(H100 is None, reason="JAX's CUDA plugin is not installed "
                                  "(pip install -e '.[gpu-aot]'; the README's test command does)")


def digits_dit(**model):
  c = load_config("digits", "cond")
  c.model.update(dict(dtype="bfloat16", attention_impl="cudnn"), **model)
  return c


def test_target_configs_describe_the_gpus():
  text = gpu_target.TARGETS["h100"].target_config(cudnn=(9, 8))
  assert "core_count: 132" in text and "major: 9\n    minor: 0" in text
  assert "device_memory_size: 84929347584" in text and 'device_description_str: "NVIDIA H100 80GB HBM3"' in text
  assert "dnn_version_info {\n  major: 9\n  minor: 8\n}" in text
  h200 = gpu_target.TARGETS["h200"]
  assert (h200.bandwidth, h200.memory_bytes // 2**30) == (4.8e12, 140)
  with pytest.raises(ValueError, match=r"unknown GPU target 'a100' \(--target\): choose one of \('h100', 'h200'\)"):
    gpu_target.devices("a100")


def test_a_real_gpu_is_matched_to_its_target_and_the_benchmark_reports_the_roofline_share():
  class Device:  # what jax.devices()[0] reports on the lent machines
    device_kind = "NVIDIA H200"

  assert gpu_target.for_device(Device()) is gpu_target.TARGETS["h200"]
  Device.device_kind = "NVIDIA A100-SXM4-80GB"
  assert gpu_target.for_device(Device()) is None
  result = {"what": "train", "seconds_per_step": 0.25, "examples_per_second": 512.0, "roofline_ms": 200.0,
            "roofline_ms_by_kind": {"matmul": 150.0, "fusion": 50.0}, "roofline_rematerialized_ms": 0.0}
  lines = benchmark.report(result, None).splitlines()
  assert "roofline of the compiled step: 200.0 ms; the timed step (250.0 ms) runs at 80% of it" in lines
  assert not any("recompute" in line for line in lines)
  result["roofline_rematerialized_ms"] = 12.5
  assert "of which 12.5 ms recompute values: the step crossed XLA's memory limit for the GPU (fewer examples " \
      "per device or micro-batch avoid that)" in benchmark.report(result, None).splitlines()


def test_a_missing_plugin_is_one_line_with_the_install_command(monkeypatch):
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  def no_plugin(*args, **kwargs):
    raise NotImplementedError("topology not implemented for cuda")

  monkeypatch.setattr(topologies, "get_topology_desc", no_plugin)
  with pytest.raises(ValueError, match=r"--target h100 needs JAX's CUDA plugin: pip install 'jax\[cuda13\]==") as e:
    gpu_target.devices("h100")
  assert "\n" not in str(e.value)


@needs_plugin
def test_guided_sampler_for_h100s_matches_the_analytic_flops():
  """Compile-only H100s: the batch split over 2, cuDNN attention in the program, and the account's FLOPs
  (dots, the patch convolution, fused attention) equal to the analytic DiT count: 2 steps x (conditional
  + null rows) x forward FLOPs."""
  config = digits_dit()
  sampler = aot.compile_sampler(config, steps=2, cfg_scale=1.5, batch_size=64, devices=H100)
  assert sampler.mesh.devices.flat[0].platform == "gpu" and sampler.mesh.devices.size == 2
  text = sampler.compiled.as_text()
  assert "__cudnn$fmhaSoftmax" in text and "f64" not in text
  assert sampler.memory is not None and 0 < sampler.memory["total"] < 2**30
  analytic = benchmark.dit_forward_flops(sampler.model.net, sampler.model.input_shape)
  assert sampler.flops == pytest.approx(2 * 2 * 32 * analytic, rel=0.005)  # per device: 32 of the 64 rows
  account = profiling.hlo_account(text, 775e12, 3.35e12)
  assert account["kinds"]["attention"]["kernels"] == 2 * config.model.depth  # one fused call per block and step
  assert account["loops_without_trip_count"] == 0


def _producer(insts: dict, name: str) -> dict:
  """The instruction that computes ``name``, looking through bitcasts and tuple elements."""
  inst = insts[name]
  while inst["op"] in ("bitcast", "get-tuple-element"):
    inst = insts[inst["operands"][0]]
  return inst


@needs_plugin
def test_a_dit_block_for_an_h100_takes_q_k_v_and_the_gelu_from_its_gemms():
  """One DiT-XL/2 block (width 1152, 16 heads, 256 tokens, batch 128), forward and backward, compiled for
  an H100 with cuBLAS GEMMs (xla_gpu_enable_triton_gemm off, the ``*_cublas`` runs of
  launch/gpu_benchmarks.sh): the fc1 GEMM writes bias + GELU and the pre-activation in one kernel
  (cuBLAS-lt's BIAS_GELU_AUX epilogue; layers.gelu_tanh's backward keeps only the GEMM's output), and
  cuDNN's attention reads q, k and v where the qkv GEMMs wrote them (dit.QKV: no copies slicing them out
  of one output; at XL/2's size: XLA merges small GEMMs that share an input back into one).
  jax.nn.gelu and one qkv GEMM compile to neither."""
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(H100[:1], ("x",)), jax.sharding.PartitionSpec())

  def spec(shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)

  block = dit.DiTBlock(1152, 16, dtype=jnp.bfloat16, attention_impl="cudnn")
  x, c = spec((128, 256, 1152)), spec((128, 1152))
  with models.target_platform("gpu"):
    params = jax.tree.map(lambda a: spec(a.shape), jax.eval_shape(block.init, jax.random.key(0), x, c))
    grad = jax.grad(lambda p, x, c: jnp.sum(block.apply(p, x, c) ** 2), argnums=(0, 1))
    with aot.outside_persistent_cache():
      text = jax.jit(grad).lower(params, x, c).compile({"xla_gpu_enable_triton_gemm": False}).as_text()
  computations, entry = profiling.parse_hlo_module(text)
  insts = {i["name"]: i for i in computations[entry]}
  gemms = [i for i in insts.values() if i["op"] == "custom-call" and "__cublas$" in i["attrs"]]
  fc1 = [i for i in gemms if "mlp/fc1/dot_general" in i["attrs"] and "transpose(" not in i["attrs"]]
  assert len(fc1) == 1 and '"epilogue":"BIAS_GELU_AUX"' in fc1[0]["attrs"]
  fmha = [i for i in insts.values() if '"__cudnn$fmhaSoftmax"' in i["attrs"]]
  assert len(fmha) == 1
  assert all(_producer(insts, o) in gemms for o in fmha[0]["operands"][:3])


@needs_plugin
def test_cifar10_augmentation_compiles_for_an_h100():
  """EDM's augmentation of configs/cifar10.py at the issue 8 batch (256), with XLA's default GEMMs: its
  Lanczos resizes once went through jax.image.resize, whose float32 HIGHEST-precision GEMMs got no
  default Triton tiling without a GPU ("Couldn't find output tile sizes"); now they are no GEMMs."""
  from imm_jax import augment

  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(H100[:1], ("x",)), jax.sharding.PartitionSpec())
  aug = augment.Augment.from_config(load_config("cifar10").augment)
  x = jax.ShapeDtypeStruct((256, 32, 32, 3), jnp.float32, sharding=sharding)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding)
  with aot.outside_persistent_cache():
    text = jax.jit(aug).lower(key, x).compile().as_text()
  assert "ENTRY" in text


@needs_plugin
def test_fid_inception_compiles_for_an_h100():
  """FID's feature extractor (resize to 299, the float32 Inception at HIGHEST precision) for 64 CIFAR-10
  images, with XLA's default GEMMs: its bilinear resize once was two float32 GEMMs that got no default
  Triton tiling without a GPU; now it is gathers and multiply-adds."""
  from imm_jax.evaluation import inception

  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(H100[:1], ("x",)), jax.sharding.PartitionSpec())
  variables = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                           inception._param_shapes())
  images = jax.ShapeDtypeStruct((64, 32, 32, 3), jnp.uint8, sharding=sharding)
  model = inception.InceptionV3()
  with aot.outside_persistent_cache():
    text = jax.jit(lambda v, x: model.apply(v, inception.preprocess(x))).lower(variables, images).compile().as_text()
  assert "ENTRY" in text


@pytest.mark.slow
@needs_plugin
def test_train_step_for_an_h100_counts_what_the_cpu_compiler_counts():
  """The same step compiled for an H100 (bf16, cuDNN attention) and for this CPU (float32, XLA attention):
  the GEMM and convolution FLOPs of the two optimised programs agree (the fused attention's backward
  recomputes the scores, 2.5 forward-equivalents against the CPU's 2: under 1% of this network)."""
  gpu = aot.compile_update_fn(digits_dit(), devices=H100[:1])
  cpu = aot.compile_update_fn(digits_dit(dtype="float32", attention_impl="xla"))
  assert gpu.mesh.devices.flat[0].platform == "gpu"
  assert gpu.memory["aliased"] > 0  # the donated state is updated in place
  cpu_flops = profiling.hlo_account(cpu.compiled.as_text(), 1.0, 1.0)["flops"]
  assert gpu.flops == pytest.approx(cpu_flops, rel=0.01)
  assert profiling.hlo_account(gpu.compiled.as_text(), 1.0, 1.0)["rematerialized"]["kernels"] == 0  # 80 GB
  # The IMM step: forward + backward on x_t, forward on x_r: four forward passes of the analytic count.
  analytic = benchmark.dit_forward_flops(gpu.model.net, gpu.model.input_shape)
  assert gpu.flops == pytest.approx(benchmark.IMM_PASSES_PER_STEP * gpu.batch_size * analytic, rel=0.02)


@pytest.mark.slow
@needs_plugin
def test_aot_reports_what_xla_recomputed_to_fit_a_small_gpu(monkeypatch):
  """The depth-1 digits step needs ~28 MiB; compiled for an H100 with 20 MiB, XLA:GPU's rematerialisation pass
  recomputes values to fit, and aot.describe gives those kernels and their share of the roofline."""
  small = dataclasses.replace(gpu_target.TARGETS["h100"], memory_bytes=20 * 2**20)
  monkeypatch.setitem(gpu_target.TARGETS, "small", small)
  config = digits_dit(depth=1)  # XLA:GPU compiles each block's kernels: ~10 s a block on this CPU
  step = aot.compile_update_fn(config, devices=gpu_target.devices("small", 1))
  text = aot.describe(step, config, small)
  assert re.search(r"\n  recomputed: [1-9]\d* of the kernels, [0-9.]+ ms, added by XLA's rematerialisation pass", text)


@pytest.mark.slow
@needs_plugin
def test_cli_compiles_for_two_h200s_without_a_gpu():
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}  # aot sets the platform
  cmd = [sys.executable, "-m", "imm_jax.aot", "--config", "configs/digits.py:cond", "--target", "h200",
         "--num_devices", "2", "--config.model.dtype=bfloat16", "--config.model.attention_impl=cudnn",
         "--config.model.depth=1"]
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout
  assert "global batch 128 (64 per device) on 2 NVIDIA H200 (compile-only) devices, mesh data=2 x fsdp=1" in out
  assert "of the GPU's 140.401 GiB: fits JAX's default preallocation (75%)" in out
  assert "roofline: " in out and " at 775 TFLOP/s and 4.80 TB/s" in out and "  attention " in out
  assert "examples/s (an upper bound" in out
  # The kernels' gradients (99.3% of the parameters) are summed across the GPUs in float32 (layers.dense),
  # the biases' in bf16.
  params = float(re.search(r"model: ([0-9.]+)M parameters", out).group(1)) * 1e6
  sums = dict(re.findall(r"(\w+) ([0-9.]+) MB", out.split("summed across devices")[1].splitlines()[0]))
  # (Each sum once: jax 0.12's XLA gives an async all-reduce's start its operands and result; `params`
  # is printed to 0.01M.)
  assert 0.99 * 4 * params <= float(sums["f32"]) * 1e6 <= 1.05 * 4 * params
  assert float(sums.get("bf16", 0)) * 1e6 <= 0.01 * 2 * params
  r = subprocess.run(cmd + ["--steps", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --steps=1 runs steps")


def test_a_gemm_without_a_default_triton_tiling_compiles_with_cublas(capsys):
  """What XLA:GPU says without a GPU for such a GEMM (configs/mnist.py's step at batch 512): the compile
  is tried again with cuBLAS GEMMs, and the report says so; other errors and real devices are left alone."""
  class Lowered:
    def __init__(self, message):
      self.message, self.options = message, []

    def compile(self, options=None):
      self.options.append(options)
      if options is None:
        raise jax.errors.JaxRuntimeError(self.message)
      return "compiled"

  tiling = "INTERNAL: Couldn't find output tile sizes that satisfy hlo: %dot.832 = f32[25088,384]{1,0} dot(...)"
  lowered = Lowered(tiling)
  assert aot._compile(lowered, "the step", compile_only=True) == "compiled"
  assert lowered.options == [None, {"xla_gpu_enable_triton_gemm": False}]
  assert "note: XLA:GPU found no default Triton tiling for a GEMM of the step" in capsys.readouterr().err
  for message, compile_only in ((tiling, False), ("INTERNAL: something else", True)):
    with pytest.raises(jax.errors.JaxRuntimeError):
      aot._compile(Lowered(message), "the step", compile_only=compile_only)


@needs_plugin
def test_importing_imm_jax_keeps_the_plugin_quiet_where_there_is_no_driver():
  """With the CUDA plugin installed and no driver (this machine), JAX would print the plugin's failed
  driver check as a traceback in every command before falling back to the CPU; imm_jax picks the CPU
  first. A JAX_PLATFORMS given by the user stays as it is."""
  try:
    ctypes.CDLL("libcuda.so.1")
    pytest.skip("a CUDA driver is installed here")
  except OSError:
    pass
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  code = "import jax, imm_jax, os; print(jax.devices()[0].platform, os.environ['JAX_PLATFORMS'])"
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and r.stdout.split() == ["cpu", "cpu"], r.stderr[-2000:]
  assert "Traceback" not in r.stderr and "plugin configuration error" not in r.stderr
  r = subprocess.run([sys.executable, "-c", "import imm_jax, os; print(os.environ['JAX_PLATFORMS'])"], cwd=REPO,
                     env=dict(env, JAX_PLATFORMS="tpu,cpu"), capture_output=True, text=True, timeout=120)
  assert r.stdout.split() == ["tpu,cpu"]
