"""Compile for an NVIDIA GPU on a machine that has none (XLA's deviceless ahead-of-time compilation).

  python -m imm_jax.aot --config configs/imagenet256.py:XL/2 --target h100 [--num_devices 8]

JAX's CUDA plugin (``pip install 'imm_jax[gpu-aot]'``, i.e. ``jax[cuda13]``: the plugin and the CUDA
compiler libraries, no driver) can create compile-only GPU devices from a description of the target
(XLA's ``GpuTargetConfigProto``: SM count, shared memory, memory size and bandwidth, compute capability,
cuDNN version). :func:`devices` returns such devices for the GPUs below; ``jax.jit(...).lower(...)
.compile()`` on a mesh of them runs XLA's whole GPU pipeline (fusion, Triton and cuDNN code generation,
scheduling, buffer assignment) and gives the program's per-device memory and its optimised HLO, from
which :func:`imm_jax.profiling.hlo_account` estimates where a step's time goes. Without a device XLA
cannot autotune, so its GEMM choices (Triton vs cuBLAS, tile sizes) are defaults, not the tuned ones.

The CUDA plugin, once installed, checks the driver whenever JAX starts its backends; on a machine without
a GPU that check fails loudly unless ``JAX_PLATFORMS=cpu`` is set, which importing ``imm_jax`` does there
(``imm_jax/__init__.py``), as does ``imm_jax.aot --target`` on any machine.
"""

from __future__ import annotations

import dataclasses
import os
from importlib import metadata

import jax


@dataclasses.dataclass(frozen=True)
class GpuTarget:
  """What XLA needs to know of a GPU to compile for it, and the two ceilings of its roofline."""

  description: str          # the device's name as the driver reports it
  memory_bytes: int         # device memory (what the driver reports, not the marketing figure)
  bandwidth: float          # bytes/s of device memory
  peak_flops: float         # dense bf16 FLOP/s a large GEMM reaches (measured where known, else the spec)
  sm_count: int = 132
  clock_ghz: float = 1.98
  l2_bytes: int = 50 * 2**20
  compute_capability: tuple[int, int] = (9, 0)

  def target_config(self, cudnn: tuple[int, int], cuda: tuple[int, int] = (13, 0)) -> str:
    """XLA's GpuTargetConfigProto in text form (Hopper's per-SM limits)."""
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: {self.sm_count}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(self.bandwidth)}
  l2_cache_size: {self.l2_bytes}
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{
    major: {self.compute_capability[0]}
    minor: {self.compute_capability[1]}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: {cudnn[0]}
  minor: {cudnn[1]}
}}
runtime_version {{
  major: {cuda[0]}
  minor: {cuda[1]}
}}
device_description_str: "{self.description}"
"""


# H100 SXM 80GB: 3.35 TB/s; 775 TFLOP/s is the bf16 GEMM ceiling measured in issue 8 (spec: 989 dense).
# H200 SXM 141GB: the same Hopper die and clocks with HBM3e at 4.8 TB/s.
TARGETS: dict[str, GpuTarget] = {
    "h100": GpuTarget("NVIDIA H100 80GB HBM3", memory_bytes=84_929_347_584, bandwidth=3.35e12,
                      peak_flops=775e12),
    "h200": GpuTarget("NVIDIA H200", memory_bytes=150_754_820_096, bandwidth=4.8e12, peak_flops=775e12),
}


def for_device(device) -> GpuTarget | None:
  """The target whose description is this device's kind (e.g. a real H100 80GB HBM3), else None."""
  return next((t for t in TARGETS.values() if t.description == getattr(device, "device_kind", None)), None)


def _cudnn_version() -> tuple[int, int]:
  """The installed cuDNN's (major, minor): what XLA would find on a machine with this software."""
  for package in ("nvidia-cudnn-cu13", "nvidia-cudnn-cu12"):
    try:
      major, minor = metadata.version(package).split(".")[:2]
      return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
      continue
  return 9, 8


def devices(name: str, num_devices: int = 1) -> list:
  """``num_devices`` compile-only devices of GPU ``name`` (a key of TARGETS) on one host."""
  if name not in TARGETS:
    raise ValueError(f"unknown GPU target {name!r} (--target): choose one of {tuple(TARGETS)}")
  if num_devices < 1:
    raise ValueError(f"--num_devices={num_devices}: give at least 1 device")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  config = TARGETS[name].target_config(_cudnn_version())
  try:
    topology = topologies.get_topology_desc(platform="cuda", target_config=config,
                                            topology=f"1x1x{num_devices}")
  except (NotImplementedError, RuntimeError) as e:  # no CUDA plugin, or one that cannot start
    hint = ("" if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu"
            else "; on a machine without a GPU set JAX_PLATFORMS=cpu")
    raise ValueError(f"compiling for --target {name} needs JAX's CUDA plugin: pip install "
                     f"'jax[cuda13]=={jax.__version__}' (the imm_jax[gpu-aot] extra){hint} "
                     f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from e
  return list(topology.devices)
