"""Training objectives that plug into the one trainer.

An objective has ``group_size`` (examples that must stay together on a device), ``prepare(batch, rng)``
(draws all randomness of a global batch into per-example arrays) and ``loss(params, inputs, rng)``
(returns (loss, metrics), the loss being a mean over groups so micro-batches of whole groups combine
exactly). ``passes_per_example`` (network passes per example and step, a backward pass counting two)
is what the training-compute figures multiply by steps x batch.

Objectives with state besides the trained parameters (distillation: a frozen teacher, an auxiliary
network and its optimizer state) also have
  * ``teacher_items``: what the trainer loads from ``config.teacher.workdir`` into a dict of
    parameter-shaped pytrees: 'params' (the teacher's EMA parameters), 'precond' (Adam's
    preconditioner from its optimizer state);
  * ``init_extra(params, teacher, tx) -> (params, extra)``: the initial trained parameters and the
    objective-owned ``TrainState.extra``;
  * ``update_extra(extra, params, inputs, rng, tx) -> (extra, metrics)``: run first in every step, on the
    whole prepared batch;
and their ``loss`` takes ``extra`` as a fourth argument.

IMM and flow matching also take ``augment`` (imm_jax.augment, from ``config.augment``): ``prepare``
then augments the batch first and the prepared inputs carry the augmentation labels to the network.
"""

from __future__ import annotations

from imm_jax import augment as augment_lib
from imm_jax.models.precond import Precond
from imm_jax.objectives.flow_matching import FlowMatchingConfig, FlowMatchingObjective
from imm_jax.objectives.imm import IMMConfig, IMMObjective
from imm_jax.objectives.moment_matching import MomentMatchingConfig, MomentMatchingObjective

OBJECTIVES = ("imm", "flow_matching", "moment_matching")
# Network passes per example and step of IMM: online forward + backward + target forward (spec 3.2).
IMM_PASSES_PER_EXAMPLE = 4.0


def make_objective(config, net, precond: Precond, null_label: int | None):
  """The objective named by ``config.objective`` for network ``net`` (a Flax module)."""
  def net_apply(params, x_in, c_t, c_s, labels, rng, **kwargs):  # kwargs: augment_labels
    return net.apply({"params": params}, x_in, c_t, c_s, labels, train=True, rngs={"dropout": rng}, **kwargs)

  augment = augment_lib.for_training(config, net)
  if config.objective == "imm":
    return IMMObjective(net_apply=net_apply, precond=precond, cfg=IMMConfig.from_config(config.imm),
                        null_label=null_label, augment=augment)
  if config.objective == "flow_matching":
    return FlowMatchingObjective(net_apply=net_apply, precond=precond,
                                 cfg=FlowMatchingConfig.from_config(config.flow_matching), null_label=null_label,
                                 augment=augment)
  if config.objective == "moment_matching":
    return MomentMatchingObjective(net_apply=net_apply, precond=precond,
                                   cfg=MomentMatchingConfig.from_config(config.moment_matching),
                                   null_label=null_label)
  raise ValueError(f"unknown objective {config.objective!r} (config.objective): choose one of {OBJECTIVES}")


def passes_per_example(objective) -> float:
  return float(getattr(objective, "passes_per_example", IMM_PASSES_PER_EXAMPLE))


def time_range(config) -> tuple[float, float]:
  """(eps, T): the times the samplers run between for a model trained with ``config``: IMM's and flow
  matching's training range; moment matching's grid runs from 1 (pure noise under OT-FM) to 0."""
  if config.objective == "flow_matching":
    return float(config.flow_matching.eps), float(config.flow_matching.T)
  if config.objective == "moment_matching":
    return 0.0, 1.0
  return float(config.imm.eps), float(config.imm.T)
