"""Compile for a Cloud TPU slice on a machine that has none (libtpu's compile-only topologies).

  python -m imm_jax.aot --config configs/imagenet256.py:XL/2 --target v5p --num_devices 64

libtpu (``pip install 'imm_jax[tpu]'``, i.e. ``jax[tpu]``: what a TPU VM runs, and all that compiling for
one needs) describes a whole slice, every host's chips, from a topology name such as ``v5p:4x4x4``;
``jax.jit(...).lower(...).compile()`` on a mesh of those devices runs XLA:TPU's own pipeline for the
slice (SPMD partitioning, fusion, scheduling, buffer assignment against the chip's HBM) from one CPU
process. It gives the per-chip memory (a program that does not fit fails to compile, as it would on the
slice) and XLA:TPU's cost model of the program (``cost_analysis()["optimal_seconds"]``), the compiler's
own estimate of a step's time.

libtpu on a machine without a TPU looks for the TPU VM's metadata before it starts, printing warnings and
waiting on the network; where no TPU is attached :func:`devices` gives it, while it loads, the environment
a TPU VM would have (``TPU_SKIP_MDS_QUERY``, a one-host ``TPU_WORKER_HOSTNAMES``, ``TPU_ACCELERATOR_TYPE``),
and ``imm_jax/__init__.py`` keeps JAX from starting libtpu as a backend there.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os


@dataclasses.dataclass(frozen=True)
class TpuTarget:
  """A TPU generation: how its slices are named and laid out, and its chip's ceilings."""

  description: str         # the device's kind as JAX reports it on the TPU VM
  topology_prefix: str     # libtpu's name of the generation in a topology ("v5p:4x4x4")
  accelerator_prefix: str  # the Cloud TPU accelerator type's ("v5p-128")
  torus_dims: int          # 2 (v5e, v6e) or 3 (v5p)
  cores_per_chip: int      # TensorCores per chip (accelerator types count cores: v5p-8 is 4 chips)
  memory_bytes: int        # HBM per chip
  peak_flops: float        # dense bf16 FLOP/s per chip (the published figure)
  max_chips: int

  def topology(self, num_chips: int) -> str:
    """The standard slice shape of ``num_chips`` chips, e.g. '2x4' for 8 v5e chips, '4x4x8' for 128 v5p chips.

    2-D slices (v5e, v6e): 1, 4, 8, ... chips, the longer side twice the shorter or equal; 3-D slices
    (v5p): 4 chips (2x2x1), then each doubling of the chips doubles the shortest side.
    """
    sizes = self.slice_sizes()
    if num_chips not in sizes:
      raise ValueError(f"--num_devices={num_chips} is not a {self.topology_prefix} slice: give its number of "
                       f"chips, one of {', '.join(map(str, sizes))}")
    if self.torus_dims == 3 and num_chips == 4:
      return "2x2x1"
    k = int(math.log2(num_chips))
    exponents = [k // self.torus_dims + (i >= self.torus_dims - k % self.torus_dims)
                 for i in range(self.torus_dims)]
    return "x".join(str(2**e) for e in exponents)

  def slice_sizes(self) -> list[int]:
    """The chips of the standard slices: 1, 4, 8, 16, ... (2-D) or 4, 8, 16, ... (3-D)."""
    smallest = 1 if self.torus_dims == 2 else 4
    return [n for n in (2**i for i in range(int(math.log2(self.max_chips)) + 1)) if n >= smallest and n != 2]

  def accelerator_type(self, num_chips: int) -> str:
    """The Cloud TPU accelerator type of a slice of ``num_chips`` chips (``launch/tpu_pod.sh``'s
    ``ACCELERATOR_TYPE``)."""
    return f"{self.accelerator_prefix}-{num_chips * self.cores_per_chip}"


# Published per-chip figures (cloud.google.com/tpu/docs: v5e, v5p, v6e).
TARGETS: dict[str, TpuTarget] = {
    "v5e": TpuTarget("TPU v5 lite", "v5e", "v5litepod", torus_dims=2, cores_per_chip=1,
                     memory_bytes=16 * 2**30, peak_flops=197e12, max_chips=256),
    "v5p": TpuTarget("TPU v5", "v5p", "v5p", torus_dims=3, cores_per_chip=2,
                     memory_bytes=95 * 2**30, peak_flops=459e12, max_chips=8192),
    "v6e": TpuTarget("TPU v6 lite", "v6e", "v6e", torus_dims=2, cores_per_chip=1,
                     memory_bytes=32 * 2**30, peak_flops=918e12, max_chips=256),
}


def resolve(name: str) -> tuple[str, int | None] | None:
  """A TPU ``--target``: a generation ('v5p': the chips are --num_devices) or a Cloud TPU accelerator type
  ('v5p-128', 'v5litepod-16', 'v6e-8': ``launch/tpu_pod.sh``'s ACCELERATOR_TYPE, which counts TensorCores)
  -> (the generation's key in TARGETS, the slice's chips or None); None for a name of neither form."""
  if name in TARGETS:
    return name, None
  prefix, _, cores = name.rpartition("-")
  for key, target in TARGETS.items():
    if prefix in (key, target.accelerator_prefix) and cores.isdigit():
      chips, rest = divmod(int(cores), target.cores_per_chip)
      sizes = target.slice_sizes()
      if rest or chips not in sizes:
        raise ValueError(f"--target {name}: not a {key} slice; its accelerator types are "
                         f"{', '.join(target.accelerator_type(n) for n in sizes[:4])}, ..., "
                         f"{target.accelerator_type(sizes[-1])}")
      return key, chips
  return None


def tpu_attached() -> bool:
  """Whether this machine has TPU chips (Google's PCI vendor id, as JAX itself checks). This module
  imports nothing heavy, so that ``imm_jax/__init__.py`` can ask before JAX starts."""
  for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(path, encoding="ascii") as f:
        if f.read().strip() == "0x1ae0":
          return True
    except OSError:
      continue
  return False


def devices(name: str, num_devices: int = 1) -> list:
  """The compile-only devices of a ``name`` (a key of TARGETS) slice of ``num_devices`` chips, all hosts'."""
  if name not in TARGETS:
    raise ValueError(f"unknown TPU target {name!r} (--target): choose one of {tuple(TARGETS)}")
  target = TARGETS[name]
  topology = target.topology(num_devices)
  # Where no TPU is attached, what a TPU VM's environment says while libtpu loads (it reads it then), so
  # that it does not go looking for the VM's metadata; only for that call: TPU_WORKER_HOSTNAMES left set
  # would tell imm_jax.distributed (and JAX) that this process is one of a TPU pod's workers.
  vm = {} if tpu_attached() else {
      "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # compiling only: processes may share libtpu
      "TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
      "TPU_ACCELERATOR_TYPE": target.accelerator_type(num_devices)}
  vm = {k: v for k, v in vm.items() if k not in os.environ}
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  hosts = {"chips_per_host_bounds": [1, 1, 1]} if num_devices == 1 else {}  # else libtpu's 2x2x1 hosts
  os.environ.update(vm)
  try:
    description = topologies.get_topology_desc(platform="tpu", topology_name=f"{target.topology_prefix}:{topology}",
                                               **hosts)
  except RuntimeError as e:
    if isinstance(e, jax.errors.JaxRuntimeError):  # libtpu's own errors
      raise
    raise ValueError(f"compiling for --target {name} needs libtpu: pip install 'jax[tpu]=={jax.__version__}' "
                     f"(the imm_jax[tpu] extra) ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from e
  finally:
    for k in vm:
      del os.environ[k]
  return list(description.devices)
