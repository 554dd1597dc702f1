"""Training objectives that plug into the one trainer.

An objective has ``group_size`` (examples that must stay together on a device), ``prepare(batch, rng)``
(draws all randomness of a global batch into per-example arrays) and ``loss(params, inputs, rng)``
(returns (loss, metrics), the loss being a mean over groups so micro-batches of whole groups combine
exactly).
"""

from __future__ import annotations

from imm_jax.models.precond import Precond
from imm_jax.objectives.imm import IMMConfig, IMMObjective

OBJECTIVES = ("imm",)


def make_objective(config, net, precond: Precond, null_label: int | None):
  """The objective named by ``config.objective`` for network ``net`` (a Flax module)."""
  def net_apply(params, x_in, c_t, c_s, labels, rng):
    return net.apply({"params": params}, x_in, c_t, c_s, labels, train=True, rngs={"dropout": rng})

  if config.objective == "imm":
    return IMMObjective(net_apply=net_apply, precond=precond, cfg=IMMConfig.from_config(config.imm), null_label=null_label)
  raise ValueError(f"unknown objective {config.objective!r} (config.objective): choose one of {OBJECTIVES}")
