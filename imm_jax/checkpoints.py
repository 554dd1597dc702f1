"""Orbax checkpoints of the train state and the grain iterator, and the workdir's saved config.

Layout of a workdir:
  config.json              the full training config (what ``imm_jax.sample`` rebuilds the model from)
  checkpoints/<step>/state       TrainState (step, params, ema_params, opt_state)
  checkpoints/<step>/data_iter   grain iterator state (per process)
A sampling-only workdir (``save_params_only``, written by ``imm_jax.convert``) holds just
  checkpoints/<step>/state       {ema_params[, buffers]}
Orbax writes each step into a temporary directory and renames it when complete, so an interrupted
save is never mistaken for a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax.traverse_util import flatten_dict

from imm_jax.io_utils import atomic_open

CONFIG_FILE = "config.json"


class _QuietReadOnly(logging.Filter):
  """Orbax warns "Given directory is read only" whenever a read-only manager is made: that is what
  sampling, evaluation and loading a teacher or a starting point ask for, so the line says nothing."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_QuietReadOnly())


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def create_manager(workdir: str, *, max_to_keep: int = 3, keep_period: int | None = None,
                   async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
  """Keeps the newest ``max_to_keep`` checkpoints plus every step divisible by ``keep_period``."""
  if read_only:  # the values orbax forces for read-only managers (it warns when given others)
    max_to_keep, keep_period, interval = None, None, 0
  else:
    interval = 1
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, keep_period=keep_period or None, create=not read_only,
      enable_async_checkpointing=async_save, read_only=read_only, save_interval_steps=interval)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=("state", "data_iter"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter=None, *, force: bool = False) -> bool:
  items = {"state": ocp.args.StandardSave(state)}
  if data_iter is not None:
    items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def no_checkpoint_message(workdir: str) -> str:
  return (f"no checkpoint in {checkpoint_dir(workdir)}: train first (python -m imm_jax.train --workdir "
          f"{workdir}) or convert one (python -m imm_jax.convert --out {workdir})")


def saved_steps(workdir: str) -> list[int]:
  """The steps of ``workdir``'s finished checkpoints, oldest first ([] when there are none yet); a save
  in progress (a temporary folder, or on GCS a step without its commit marker) is not one."""
  return sorted(ocp.utils.checkpoint_steps(checkpoint_dir(workdir)))


def restore(manager: ocp.CheckpointManager, abstract_state: Any, data_iter=None, step: int | None = None):
  """Restore the train state (onto the shardings carried by ``abstract_state``) and the iterator."""
  step = manager.latest_step() if step is None else step
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored["state"]


def restore_ema_params(workdir: str, abstract_params: Any, step: int | None = None):
  """Only the EMA parameters of a workdir's checkpoint (what sampling and evaluation use)."""
  variables, step = restore_ema_variables(workdir, abstract_params, step)
  return variables["params"], step


def restore_ema_variables(workdir: str, abstract_params: Any, step: int | None = None):
  """``({'params': ema_params[, 'buffers': ...]}, step)``: the EMA parameters plus the non-parameter
  variables a sampling-only checkpoint may carry (``save_params_only(..., buffers=...)``, e.g. a
  converted DiT's reference pos_embed). Pass the dict to ``net.apply`` as its variables."""
  manager = create_manager(workdir, read_only=True, async_save=False)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(no_checkpoint_message(workdir))
  item = {"ema_params": abstract_params}
  saved_buffers = _saved_buffers(manager, step)
  if saved_buffers is not None:
    sharding = next(iter(jax.tree.leaves(abstract_params)), None)
    sharding = getattr(sharding, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    item["buffers"] = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), saved_buffers)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
  manager.close()
  state = restored["state"]
  variables = {"params": state["ema_params"]}
  if saved_buffers is not None:
    variables["buffers"] = state["buffers"]
  return variables, step


def _saved_tree(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The array metadata (shape, dtype) of a checkpoint's ``state`` item, or None if unreadable."""
  path = epath.Path(str(manager.directory)) / str(step) / "state"
  try:
    tree = ocp.PyTreeCheckpointHandler().metadata(path).tree
  except Exception:  # an unreadable or differently laid out checkpoint
    return None
  return tree if isinstance(tree, dict) else None


def _saved_buffers(manager: ocp.CheckpointManager, step: int):
  """The array metadata of a checkpoint's ``buffers`` entry, or None (train states have none)."""
  tree = _saved_tree(manager, step)
  return tree.get("buffers") if tree is not None else None


def ema_params_layout(workdir: str, step: int | None = None):
  """``(step, shapes, has_buffers)`` of a workdir's checkpoint (the latest when ``step`` is None), read
  from its metadata without restoring anything: ``shapes`` is the EMA parameters' tree of
  ShapeDtypeStructs (None if the checkpoint has no readable ``ema_params``), ``has_buffers`` whether it
  carries non-parameter variables (``save_params_only(..., buffers=...)``)."""
  manager = create_manager(workdir, read_only=True, async_save=False)
  try:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      return step, None, False
    tree = _saved_tree(manager, step) or {}
  finally:
    manager.close()
  ema = tree.get("ema_params")
  shapes = None if ema is None else jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), ema)
  return step, shapes, bool(tree.get("buffers"))


def save_params_only(workdir: str, ema_params: Any, step: int = 0, *, buffers: Any = None):
  """A sampling-only checkpoint (e.g. a converted reference model): ``ema_params`` and, optionally,
  non-parameter ``buffers`` (a pytree restored by ``restore_ema_variables``)."""
  state = {"ema_params": ema_params}
  if buffers:
    state["buffers"] = buffers
  manager = create_manager(workdir, async_save=False)
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
  manager.wait_until_finished()
  manager.close()


def write_config(workdir: str, config: ml_collections.ConfigDict):
  """config.json beside the checkpoints, written atomically by process 0."""
  if jax.process_index() != 0:
    return
  with atomic_open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


# What a workdir's checkpoints are: the network, the data it learns, the objective, the preconditioning
# and the optimizer (its state's layout). A run resumed with other values here would load parameters
# into another network or continue on other data. Everything else may change on resume: the schedule
# (num_steps, lr, batch, logging), the mesh, and the options below, which change how, not what.
RUN_IDENTITY = ("model", "data", "objective", "precond", "optim.name")
RESUME_FREE = ("model.dtype", "model.remat", "model.attention_impl", "data.path", "data.tfds_data_dir",
               "data.worker_count", "data.prefetch_buffer")


def has_checkpoint(workdir: str) -> bool:
  directory = checkpoint_dir(workdir)
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def check_resumable(workdir: str, config: ml_collections.ConfigDict):
  """Before a run writes anything into ``workdir``: when it holds checkpoints, its config.json must
  agree with ``config`` on RUN_IDENTITY (keys only one side has are not compared: configs of other
  imm_jax versions). Raises a one-line ValueError naming the first differences and the fix."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not has_checkpoint(workdir) or not os.path.exists(path):
    return
  with open(path) as f:
    saved = flatten_dict(json.load(f), sep=".")
  new = flatten_dict(json.loads(config.to_json_best_effort()), sep=".")
  diffs = [k for k in sorted(saved.keys() & new.keys()) if _identity_key(k) and saved[k] != new[k]]
  if diffs:
    shown = "; ".join(f"config.{k} is {saved[k]!r} there, {new[k]!r} here" for k in diffs[:3])
    more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
    raise ValueError(f"--workdir {workdir} holds checkpoints of another run: {shown}{more}. Use a new "
                     f"--workdir, or resume with that run's config ({path})")


def _identity_key(key: str) -> bool:
  def under(prefixes):
    return any(key == p or key.startswith(p + ".") for p in prefixes)
  return under(RUN_IDENTITY) and not under(RESUME_FREE)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a directory written by "
                            f"imm_jax.train or imm_jax.convert")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
