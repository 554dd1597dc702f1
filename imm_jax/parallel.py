"""Device mesh, sharding rules and global-batch assembly.

One mesh with two axes, ``data`` and ``fsdp``. The batch is split over both (FSDP is data parallel
too); parameters and optimizer state are sharded over ``fsdp`` when they are large enough, and
replicated otherwise. The mesh uses Auto axis types: shardings are given at the jit boundary and XLA
propagates them inside, which is what a whole-step ``jax.jit`` with donated state wants.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def create_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A (data, fsdp) mesh over all devices; -1 for ``data`` means "whatever is left"."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  if data == -1:
    if n % fsdp:
      raise ValueError(f"config.mesh.fsdp={fsdp} does not divide the {n} devices")
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f"config.mesh data x fsdp = {data} x {fsdp} must equal the {n} devices")
  axis_types = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=axis_types, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
  """Shard the largest dimension divisible by the fsdp axis when the array has >= min_size elements."""
  if fsdp_size <= 1 or math.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(mesh: Mesh, abstract_state: Any, min_size: int = 2**18) -> Any:
  """NamedShardings for every leaf of a (possibly abstract) train state."""
  fsdp = mesh.shape["fsdp"]

  def leaf(x):
    shape = getattr(x, "shape", ())
    return NamedSharding(mesh, param_spec(tuple(shape), fsdp, min_size))

  return jax.tree.map(leaf, abstract_state)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble the global batch from this process's rows (rows of process i follow those of i-1)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def check_batch_layout(global_batch_size: int, group_size: int, mesh: Mesh, accum_steps: int = 1):
  """Every device must hold whole particle groups in every micro-batch, so the MMD stays local."""
  if global_batch_size < 1 or accum_steps < 1:
    raise ValueError(f"config.batch_size={global_batch_size} and config.grad_accum_steps={accum_steps} "
                     f"must be positive")
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  per_micro = global_batch_size // accum_steps
  if global_batch_size % accum_steps:
    raise ValueError(f"config.batch_size={global_batch_size} is not divisible by "
                     f"config.grad_accum_steps={accum_steps}")
  if per_micro % (shards * group_size):
    raise ValueError(
        f"config.batch_size / config.grad_accum_steps = {per_micro} must be a multiple of "
        f"devices ({shards}) x config.imm.group_size ({group_size}) so each device holds whole groups")
  if global_batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={global_batch_size} must divide over {jax.process_count()} hosts")
