"""The one trainer: ``train_and_evaluate(config, workdir)`` for every objective.

A single jit-compiled step (``update_fn(state, batch) -> (state, metrics)``) with the state donated,
shardings given at the jit boundary, and all randomness derived from (seed, step) so that a resumed
run continues exactly where an uninterrupted one would be.

Objectives (imm_jax/objectives) plug in: IMM and flow matching train one network; moment-matching
distillation also owns ``TrainState.extra`` (the frozen teacher loaded from ``config.teacher.workdir``,
an auxiliary network and its optimizer state, Adam's preconditioner), which is checkpointed with the
rest so a distillation run resumes without its teacher workdir.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from imm_jax import checkpoints, parallel
from imm_jax import data as data_lib
from imm_jax import images as images_lib
from imm_jax import sampling
from imm_jax.builder import Model, build_model
from imm_jax.evaluation import distances
from imm_jax.io_utils import input_errors
from imm_jax.models import EXECUTION_OPTIONS
from imm_jax.objectives import make_objective, time_range
from imm_jax.writers import MetricWriter

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  extra: Any = flax.struct.field(default_factory=dict)  # objective-owned state ({} for IMM / FM)


def make_optimizer(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  """AdamW / RAdam / Adam with optional linear warmup, cosine or linear decay (to 0 at ``num_steps``) and
  global-norm clipping."""
  lr = float(cfg.lr)
  warmup = int(cfg.get("warmup_steps", 0))
  kind = cfg.get("schedule", "constant")
  if kind not in ("constant", "cosine", "linear"):
    raise ValueError(f"unknown schedule {kind!r} (config.optim.schedule): choose constant, cosine or linear")
  if kind == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(num_steps, warmup + 1))
  elif kind == "linear":
    schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)),
                                     optax.linear_schedule(lr, 0.0, max(num_steps - warmup, 1))],
                                    [max(warmup, 1)])
  elif warmup > 0:
    schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)],
                                    [warmup])
  else:
    schedule = lr
  b1, b2, eps, wd = float(cfg.b1), float(cfg.b2), float(cfg.eps), float(cfg.weight_decay)
  if cfg.name == "adamw":
    tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd)
  elif cfg.name == "radam":
    tx = optax.chain(optax.scale_by_radam(b1=b1, b2=b2, eps=eps), optax.add_decayed_weights(wd),
                     optax.scale_by_learning_rate(schedule))
  elif cfg.name == "adam":
    tx = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
  else:
    raise ValueError(f"unknown optimizer {cfg.name!r} (config.optim.name): choose adamw, radam or adam")
  clip = float(cfg.get("grad_clip", 0.0))
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx


def ema_decay_at(step, decay: float, warmup: bool):
  """EMA rate; with warmup the rate ramps as (1 + step) / (10 + step) so short runs are not
  dominated by the initialisation."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def _split_micro(v, accum: int, group: int):
  """(B, ...) -> (accum, B / accum, ...), micro-batch j taking groups j, j + accum, ... so that each
  micro-batch keeps the device layout of whole groups."""
  g = v.shape[0] // group
  v = v.reshape((g // accum, accum, group) + v.shape[1:])
  v = jnp.moveaxis(v, 1, 0)
  return v.reshape((accum, (g // accum) * group) + v.shape[3:])


def make_update_fn(objective, tx, config):
  """update_fn(state, batch) -> (state, metrics), the whole training step."""
  base_key = jax.random.key(int(config.seed))
  accum = int(config.get("grad_accum_steps", 1))
  ema_decay, ema_warmup = float(config.ema.decay), bool(config.ema.warmup)
  grad_fn = jax.value_and_grad(objective.loss, has_aux=True)
  has_extra = has_objective_state(objective)

  def update_fn(state: TrainState, batch):
    rng = jax.random.fold_in(base_key, state.step)
    k_prep, k_net = jax.random.split(rng)
    inputs = objective.prepare(batch, k_prep)
    extra, loss_args, metrics_extra = state.extra, (), {}
    if has_extra:
      k_net, k_extra = jax.random.split(k_net)
      extra, metrics_extra = objective.update_extra(state.extra, state.params, inputs, k_extra, tx)
      loss_args = (extra,)
    if accum == 1:
      (_, metrics), grads = grad_fn(state.params, inputs, k_net, *loss_args)
    else:
      micro = jax.tree.map(lambda v: _split_micro(v, accum, objective.group_size), inputs)

      def body(carry, xs):
        i, mb = xs
        (_, met), gr = grad_fn(state.params, mb, jax.random.fold_in(k_net, i), *loss_args)
        return jax.tree.map(jnp.add, carry, (gr, met)), None

      first = jax.tree.map(lambda v: v[0], micro)
      shapes = jax.eval_shape(lambda: grad_fn(state.params, first, k_net, *loss_args))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[1], shapes[0][1]))
      (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
      grads, metrics = jax.tree.map(lambda v: v / accum, (grads, metrics))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, ema_decay, ema_warmup)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    metrics = dict(metrics, **metrics_extra, grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params))
    return TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                      extra=extra), metrics

  return update_fn


def has_objective_state(objective) -> bool:
  """Whether the objective owns state besides the trained parameters (objectives/__init__.py)."""
  return hasattr(objective, "init_extra")


def train_state_layout(model: Model, tx, objective, mesh, config):
  """The train state's layout from shapes alone: ``(init_fn, teacher_items, shardings, abstract)``.

  ``init_fn(teacher, start_params)`` makes a fresh state (``init_state``); ``teacher_items`` are the
  teacher arrays a distillation objective needs (empty otherwise; they are parameter-shaped, so nothing
  is loaded here);
  ``abstract`` holds ShapeDtypeStructs carrying the state ``shardings`` (``parallel.state_shardings``).
  """
  init_fn = functools.partial(init_state, model, tx, int(config.seed), objective)
  teacher_items = tuple(getattr(objective, "teacher_items", ()))
  teacher_shapes = None
  if teacher_items:
    params_shape = jax.eval_shape(lambda: model.init_params(jax.random.key(0)))
    teacher_shapes = {k: params_shape for k in teacher_items}
  shapes = jax.eval_shape(init_fn, teacher_shapes)
  shardings = parallel.state_shardings(mesh, shapes, int(config.mesh.fsdp_min_size))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
  return init_fn, teacher_items, shardings, abstract


def init_state(model: Model, tx, seed: int, objective=None, teacher=None, start_params=None) -> TrainState:
  """A fresh state; objectives with their own state (distillation) set the initial parameters (the
  teacher's) and ``extra`` from ``teacher`` (what ``load_teacher`` returns). ``start_params`` (what
  ``load_start_params`` returns) replace the fresh parameters they have an entry for."""
  params = model.init_params(jax.random.key(seed))
  extra = {}
  if start_params is not None:
    flat = flax.traverse_util.flatten_dict(params)
    for path, value in flax.traverse_util.flatten_dict(start_params).items():
      if isinstance(value, StartRows):  # these rows from the source, the others fresh
        flat[path] = flat[path].at[np.asarray(value.rows)].set(jnp.asarray(value.values, flat[path].dtype))
      else:
        flat[path] = jnp.copy(jnp.asarray(value, flat[path].dtype))  # a copy: see the note below
    params = flax.traverse_util.unflatten_dict(flat)
  if objective is not None and has_objective_state(objective):
    params, extra = objective.init_extra(params, teacher, tx)
    # Fresh buffers: under jit an output that is an input (the teacher) would come back as that very
    # array, several times, and the donated state would then donate one buffer twice.
    params, extra = jax.tree.map(jnp.copy, (params, extra))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=tx.init(params), extra=extra)


def load_teacher(config, model: Model, items=("params",)) -> dict:
  """The teacher of a distillation run from ``config.teacher.workdir``: {'params': its EMA parameters
  [, 'precond': Adam's preconditioner 1 / (sqrt(v_hat) + eps) from its optimizer state]} on the host.

  The teacher must have the student's network and preconditioning (the same ``model`` and ``precond``
  config sections): the student is initialised from it.
  """
  from imm_jax.objectives.moment_matching import adam_preconditioner

  workdir = str(config.teacher.get("workdir", "") or "")
  if not workdir:
    raise ValueError(f"objective={config.objective!r} distils a trained model: set --config.teacher.workdir "
                     f"to a workdir written by imm_jax.train (e.g. a flow-matching run)")
  teacher_config = checkpoints.read_config(workdir)
  for section in ("model", "precond"):
    mine, theirs = config[section].to_dict(), teacher_config[section].to_dict()
    ignored = EXECUTION_OPTIONS if section == "model" else ()  # the same parameters either way
    diff = sorted(k for k in set(mine) | set(theirs)
                  if k not in ignored and _as_plain(mine.get(k, _ADDED_LATER.get(k)))
                  != _as_plain(theirs.get(k, _ADDED_LATER.get(k))))
    if diff:
      raise ValueError(f"the student's config.{section} differs from the teacher's in {workdir} at "
                       f"{', '.join(f'{section}.{k}: {mine.get(k)!r} vs {theirs.get(k)!r}' for k in diff)}; "
                       f"the student is initialised from the teacher, so they must match")
  step = config.teacher.get("step", None)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if "precond" not in items:
    params, _ = checkpoints.restore_ema_params(workdir, model.abstract_params(device), step)
    return {"params": jax.device_get(params)}
  teacher_tx = make_optimizer(teacher_config.optim, int(teacher_config.num_steps))
  abstract = jax.eval_shape(functools.partial(init_state, model, teacher_tx, 0))
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
  manager = checkpoints.create_manager(workdir, read_only=True, async_save=False)
  try:
    if manager.latest_step() is None:
      raise FileNotFoundError(f"no checkpoint in {checkpoints.checkpoint_dir(workdir)} (config.teacher.workdir)")
    state = checkpoints.restore(manager, abstract, step=step)
  finally:
    manager.close()
  precond = adam_preconditioner(state.opt_state, float(teacher_config.optim.b2), float(teacher_config.optim.eps))
  return jax.device_get({"params": state.ema_params, "precond": precond})


@flax.struct.dataclass
class StartRows:
  """Some rows of a parameter taken from the source of a fine-tuning run (``values``, placed at ``rows``
  of the fresh initialisation by ``init_state``); the other rows keep their fresh values."""
  values: Any
  rows: tuple = flax.struct.field(pytree_node=False)


# The parameters that encode the class labels, by network: DiT's class table (row num_classes is the null
# class; with extra_null_row one unused row follows) and SongUNet's label map (one-hot input rows; its
# null class is the zero vector, so its bias is the unconditional part and keeps its shape).
DIT_LABEL_TABLE = ("y_embedder", "embedding_table")
UNET_LABEL_MAP = ("map_label", "kernel")
UNET_NULL_BIAS = ("map_label", "bias")
UNET_FIRST_LAYER = (("map_layer0", "kernel"), ("map_layer0", "bias"))


def _class_rows(theirs_rows: int, their_extra: bool, ours_rows: int, our_extra: bool):
  """``(source rows, our rows, source classes, our classes)`` of a DiT class table that carry over when
  the number of classes changes: the null row (and the unused row when both have it)."""
  their_classes, our_classes = theirs_rows - 1 - int(their_extra), ours_rows - 1 - int(our_extra)
  src, dst = [their_classes], [our_classes]
  if their_extra and our_extra:
    src.append(their_classes + 1)
    dst.append(our_classes + 1)
  if their_classes == our_classes:  # only the unused row differs: the classes carry over too
    src, dst = list(range(their_classes)) + src, list(range(our_classes)) + dst
  return tuple(src), tuple(dst), their_classes, our_classes


def _class_label_changes(theirs: dict, ours: dict, source_config, model: Model):
  """Where the source's number of classes differs from this network's (flat parameter shapes of
  both): ``relabel`` {path: (source rows, our rows, note)} for the label parameters whose class rows
  change, and whether a conditional SongUNet's null class (map_label's bias) goes into map_layer0."""
  relabel = {}
  for path in (DIT_LABEL_TABLE, UNET_LABEL_MAP):
    if (path in theirs and path in ours and theirs[path].shape != ours[path].shape
        and theirs[path].shape[1:] == ours[path].shape[1:]):
      if path == DIT_LABEL_TABLE:
        src, dst, their_classes, our_classes = _class_rows(
            theirs[path].shape[0], bool(source_config.model.get("extra_null_row", False)),
            ours[path].shape[0], bool(getattr(model.net, "extra_null_row", False)))
      else:  # SongUNet: all rows are classes
        src, dst, their_classes, our_classes = (), (), theirs[path].shape[0], ours[path].shape[0]
      relabel[path] = (src, dst, f"its class rows: {their_classes} classes there, {our_classes} here")
  # A class-conditional SongUNet made unconditional: the null class (a zero one-hot) adds map_label's
  # bias before map_layer0, a linear layer, which takes it into its own bias exactly.
  fold_label_bias = (UNET_LABEL_MAP in theirs and UNET_LABEL_MAP not in ours and UNET_NULL_BIAS in theirs
                     and UNET_FIRST_LAYER[1] in ours)
  return relabel, fold_label_bias


def _apply_class_label_changes(params: dict, relabel: dict, fold_label_bias: bool, ours: dict) -> list[str]:
  """Makes the source's flat ``params`` (host arrays) this network's, in place, as
  ``_class_label_changes`` found; returns the notes on the rows that start fresh."""
  if fold_label_bias:
    kernel, bias = UNET_FIRST_LAYER
    params[bias] = params[bias] + params.pop(UNET_NULL_BIAS) @ params[kernel]
    del params[UNET_LABEL_MAP]
  fresh = []
  for path, (src, dst, note) in relabel.items():
    rows = params.pop(path)[np.asarray(src, np.int64)]
    if len(dst) == ours[path].shape[0]:  # e.g. an unconditional DiT's table: the null row alone
      params[path] = rows[np.argsort(dst)]
      continue
    if src:
      params[path] = StartRows(values=rows, rows=dst)
    fresh.append(f"{'/'.join(path)} ({note})")
  return fresh


def load_start_params(config, model: Model) -> dict | None:
  """``config.init``: the EMA parameters of another run (a workdir written by ``imm_jax.train`` or
  ``imm_jax.convert``, at ``config.init.step`` or its latest checkpoint) that a new run starts from, on
  the host; None when ``config.init.workdir`` is empty.

  Read from the checkpoint's own layout, so the source may be any network with the same parameter
  names and shapes: parameters this network has and the source lacks keep their fresh initialisation
  (e.g. an augmentation embedding added for fine-tuning) and are listed; a source parameter
  this network lacks, or has in another shape, stops the run. A different preconditioning is allowed
  and named (the parameters then start from another function). The optimizer, the step, the EMA (set
  to the loaded parameters) and the data order start fresh.

  The class labels' parameters follow this run's number of classes (0: unconditional): where it differs
  from the source's, the null class carries over and the class rows start fresh: DiT's null row (a
  ``StartRows``); SongUNet's null class is the label map's bias, which an unconditional SongUNet lacks
  and takes into map_layer0's bias. So e.g. a released ImageNet DiT fine-tunes on a folder of 10
  classes, or unconditionally, starting from its unguided network.
  """
  source = str(config.get("init", {}).get("workdir", "") or "")
  if not source:
    return None
  where = f"config.init.workdir={source}"
  if config.objective == "moment_matching":
    raise ValueError(f"{where}: moment-matching distillation starts from its teacher "
                     f"(config.teacher.workdir); leave config.init.workdir empty")
  if not os.path.exists(os.path.join(source, checkpoints.CONFIG_FILE)):
    raise FileNotFoundError(f"{where}: no {checkpoints.CONFIG_FILE} there; give a workdir written by "
                            f"imm_jax.train or imm_jax.convert")
  want_step = config.init.get("step", None)
  step, shapes, has_buffers = checkpoints.ema_params_layout(source, want_step)
  if step is None:
    raise FileNotFoundError(f"{where} holds no checkpoint yet: train it first, or give another workdir")
  if shapes is None:
    saved = checkpoints.saved_steps(source)
    raise ValueError(f"{where}: no EMA parameters at step {step} (its checkpoints: {saved}); set "
                     f"config.init.step to one of them, or leave it unset for the latest")
  if has_buffers:
    raise ValueError(f"{where}: its checkpoint carries a reference DiT pos_embed that is not the "
                     f"sin-cos table this trainer uses; it can be sampled (imm_jax.sample), not trained")
  ours = flax.traverse_util.flatten_dict(model.abstract_params())
  theirs = flax.traverse_util.flatten_dict(shapes)
  source_config = checkpoints.read_config(source)
  name = "/".join
  relabel, fold_label_bias = _class_label_changes(theirs, ours, source_config, model)
  unknown = [name(p) for p in theirs if p not in ours
             and not (fold_label_bias and p in (UNET_LABEL_MAP, UNET_NULL_BIAS))]
  misshapen = [f"{name(p)} {tuple(theirs[p].shape)} there, {tuple(ours[p].shape)} here"
               for p in theirs
               if p in ours and p not in relabel and tuple(theirs[p].shape) != tuple(ours[p].shape)]
  if unknown or misshapen:
    problems = [f"{what}: {'; '.join(items[:3])}" + (f" (and {len(items) - 3} more)" if len(items) > 3 else "")
                for what, items in (("parameters this network lacks", unknown), ("other shapes", misshapen))
                if items]
    raise ValueError(f"{where} is another network ({'; '.join(problems)}): set config.model to the "
                     f"source's network (its config.json), with additions only")
  source_precond = source_config.get("precond", ml_collections.ConfigDict()).to_dict()
  changed = sorted(k for k, v in config.precond.to_dict().items()
                   if k in source_precond and _as_plain(source_precond[k]) != _as_plain(v))
  if changed:
    log.warning("config.init: the source was trained with another preconditioning (%s)",
                ", ".join(f"precond.{k}: {source_precond[k]!r} there, {config.precond[k]!r} here"
                          for k in changed))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
  params, _ = checkpoints.restore_ema_params(source, abstract, step)
  params = flax.traverse_util.flatten_dict(jax.device_get(params))
  fresh = [name(p) for p in ours if p not in theirs] + _apply_class_label_changes(
      params, relabel, fold_label_bias, ours)
  if jax.process_index() == 0:
    loaded = sum(not isinstance(v, StartRows) for v in params.values())
    print(f"initialised from {source} (step {step}): {loaded} of {len(ours)} parameter arrays"
          + (f"; fresh: {', '.join(sorted(fresh))}" if fresh else "")
          + ("; map_label's bias (the null class) taken into map_layer0's" if fold_label_bias else ""),
          flush=True)
  return flax.traverse_util.unflatten_dict(params)


# Network options added after runs were written: a saved config without one had its default.
_ADDED_LATER = {"augment_dim": 0}


def _as_plain(v):
  return list(v) if isinstance(v, tuple) else v


class Preemption:
  """SIGTERM (and the platform's preemption notice via Orbax) -> save at the next step and exit."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread (e.g. a notebook worker): rely on Orbax's notice only
      self._previous = None
    return self

  def _handler(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def sample_grid_noise(model: Model, num: int, seed: int):
  """Fixed prior noise and labels for the periodic sample grids (the same images every time)."""
  key = jax.random.key(seed + 7919)
  noise = sampling.prior_noise(key, (num,) + model.input_shape, model.precond.sigma_d)
  labels = None
  if model.null_label is not None:
    labels = jnp.arange(num, dtype=jnp.int32) % model.num_classes
  return noise, labels


def generate_samples(model: Model, params, noise, labels, steps: int, config, *, rng=None) -> np.ndarray:
  """Samples with ``config.sample``'s sampler between the objective's times (``objectives.time_range``):
  pushforward / restart (IMM), euler / heun (flow ODE), ancestral (moment matching)."""
  cfg = config.sample
  mid_etas = [float(e) for e in cfg.get("mid_etas", ())] if cfg.schedule == "explicit" else None
  eps, T = time_range(config)
  times = sampling.make_schedule(cfg.schedule, steps, model.precond.interpolant, eps, T, mid_etas=mid_etas)
  scale = float(cfg.get("cfg_scale", 1.0))
  guided = model.guided(scale)
  sampler = cfg.get("sampler", "pushforward")
  if sampler == "ancestral" and rng is None:
    rng = jax.random.key(int(config.seed) + steps)
  out = sampling.run_sampler(sampler, model.net, params, model.precond, noise, times, labels, scale, rng,
                             guided=guided, null_label=model.null_label)
  return np.asarray(jax.device_get(out), np.float32)


def render(model: Model, samples: np.ndarray, reference: np.ndarray | None = None,
           decoder=None) -> np.ndarray:
  """A picture of samples: an image grid (tiny images upscaled) or a 2-D scatter plot. ``decoder``
  (latent models): model-space latents -> uint8 images, e.g. :func:`imm_jax.data.latents.latent_decoder`."""
  if model.kind == "points":
    return images_lib.scatter_image(samples, extent=1.5, reference=reference)
  grid = images_lib.make_grid(decoder(samples) if decoder is not None else data_lib.to_uint8(samples))
  factor = max(1, 512 // max(grid.shape[:2]))
  return images_lib.upscale_nearest(grid, factor) if factor > 1 else grid


def augment_preview(model: Model, augment, x: np.ndarray, seed: int, num: int = 32) -> np.ndarray:
  """Training images beside the same images as ``config.augment`` hands them to the objective."""
  x = np.asarray(x[:num], np.float32)
  out, _ = augment(jax.random.key(seed), jnp.asarray(x))
  return images_lib.side_by_side([render(model, x), render(model, np.asarray(out))],
                                 ["data", "augmented (config.augment)"])


def sample_quality(model: Model, params, config, eval_x: np.ndarray, steps_list) -> dict[str, float]:
  """Energy distance (and RBF MMD^2) between model samples and held-out real data, per step count:
  ``config.eval.samples`` samples (0: as many as ``eval_x`` holds), from the same noise at every step
  count and evaluation (keyed by ``config.seed``), generated in equal chunks of at most
  ``config.eval.batch`` (one compiled sampler per step count; the last chunk's few extra are dropped)."""
  n_ref = eval_x.shape[0]
  n = int(config.eval.get("samples", 0)) or n_ref
  chunks = -(-n // max(1, int(config.eval.get("batch", n))))
  size = -(-n // chunks)
  noise, labels = sample_grid_noise(model, chunks * size, int(config.seed) + 1)
  flat_ref = eval_x.reshape(n_ref, -1)
  out = {}
  for steps in steps_list:
    key = jax.random.key(int(config.seed) + steps)
    parts = [generate_samples(model, params, noise[i * size:(i + 1) * size],
                              None if labels is None else labels[i * size:(i + 1) * size], steps, config,
                              rng=key if i == 0 else jax.random.fold_in(key, i))  # stochastic samplers
             for i in range(chunks)]
    flat = np.concatenate(parts)[:n].reshape(n, -1)
    out[f"energy_{steps}step"] = distances.energy_distance(flat, flat_ref)
    out[f"mmd_{steps}step"] = distances.mmd_rbf(flat, flat_ref)
  return out


def check_eval_config(eval_cfg) -> None:
  """One-line errors for a ``config.eval`` that sample_quality cannot run."""
  samples, batch = int(eval_cfg.get("samples", 0)), int(eval_cfg.get("batch", 1))
  if samples < 0 or samples == 1:
    raise ValueError(f"config.eval.samples={samples}: give 0 (as many samples as config.eval.num held-out "
                     "examples) or at least 2")
  if batch < 1:
    raise ValueError(f"config.eval.batch={batch}: give the number of samples generated at a time, at least 1")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Train (resuming from ``workdir`` when it holds a checkpoint), write samples and metrics.

  Returns the final evaluation figures.
  """
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  config = ml_collections.ConfigDict(config)
  with input_errors():  # bad config, data or workdir: stop before anything runs, in one line (imm_jax.train)
    info = data_lib.get_info(config.data)
    model = build_model(config, info)
    mesh = parallel.create_mesh(int(config.mesh.data), int(config.mesh.fsdp))
    num_steps = int(config.num_steps)
    tx = make_optimizer(config.optim, num_steps)
    objective = make_objective(config, model.net, model.precond, model.null_label)
    accum = int(config.get("grad_accum_steps", 1))
    parallel.check_batch_layout(int(config.batch_size), objective.group_size, mesh, accum)
    check_eval_config(config.eval)
    checkpoints.check_resumable(workdir, config)  # before anything in the workdir is written
    start_params = None
    if not checkpoints.has_checkpoint(workdir):
      start_params = load_start_params(config, model)  # config.init: fine-tune another run's network
    elif config.get("init", {}).get("workdir"):
      log.info("resuming %s: config.init.workdir is not read", workdir)

    init_fn, teacher_items, state_sh, abstract = train_state_layout(model, tx, objective, mesh, config)
    local_batch = int(config.batch_size) // jax.process_count()
    data_iter = data_lib.create_train_iterator(
        config.data, local_batch_size=local_batch, seed=int(config.seed),
        process_index=jax.process_index(), process_count=jax.process_count())

    manager = checkpoints.create_manager(workdir, max_to_keep=int(config.checkpoint.keep),
                                         keep_period=config.checkpoint.get("keep_period"),
                                         async_save=bool(config.checkpoint.get("async_save", True)))
    writer = MetricWriter(workdir, enabled=is_main)
    if manager.latest_step() is not None:
      try:
        state = checkpoints.restore(manager, abstract, data_iter)
      except ValueError as e:  # e.g. a workdir without config.json whose checkpoint is another network's
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot resume from {checkpoints.checkpoint_dir(workdir)}: its train state does "
                         f"not match this config's ({reason[:300]}). Use a new --workdir, or that run's "
                         f"config") from None
      start = int(jax.device_get(state.step))
      writer.truncate_after(start)
      log.info("resumed from step %d in %s", start, workdir)
    else:
      teacher = load_teacher(config, model, teacher_items) if teacher_items else None
      state = jax.jit(init_fn, out_shardings=state_sh)(teacher, start_params)
      start = 0
      writer.write_hparams(config.to_dict())
    checkpoints.write_config(workdir, config)  # only once the workdir's checkpoint (if any) fits it
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))

  update_fn = make_update_fn(objective, tx, config)
  batch_sh = parallel.batch_sharding(mesh)
  metrics_sh = parallel.replicated(mesh)
  first = next(data_iter)
  batch = parallel.global_batch(first, mesh)
  jitted = jax.jit(update_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, metrics_sh),
                   donate_argnums=(0,))
  compiled = jitted.lower(state, batch).compile()
  if is_main:
    _print_compiled_memory(compiled, n_params, config)

  eval_x = None
  eval_cfg = config.eval
  if int(eval_cfg.num) > 0:
    eval_x, _ = data_lib.load_eval_set(config.data, int(eval_cfg.num), seed=int(config.seed))
  grid_noise, grid_labels = sample_grid_noise(model, int(config.sample.num), int(config.seed))
  decoder = None
  if model.kind == "latent" and is_main:  # SD-VAE latents: decode the sample grids (None without weights)
    from imm_jax.data import latents as latents_lib
    decoder = latents_lib.maybe_latent_decoder(config.data)
  sample_steps = tuple(int(s) for s in config.sample.steps)
  eval_steps = tuple(int(s) for s in eval_cfg.steps)

  def periodic_outputs(step, ema_params, final=False):
    params = host_params(ema_params)  # every process takes part in the gather; only process 0 samples
    if not is_main:
      return {}
    if (_due(step, config.sample_every) or final) and sample_steps:
      pictures = {}
      for steps in sample_steps:
        samples = generate_samples(model, params, grid_noise, grid_labels, steps, config,
                                   rng=jax.random.key(int(config.seed) + steps))
        pictures[f"samples/{steps}step"] = render(model, samples, eval_x, decoder=decoder)
      sample_dir = os.path.join(workdir, "samples")
      os.makedirs(sample_dir, exist_ok=True)
      for name, pic in pictures.items():
        images_lib.save_png(os.path.join(sample_dir, f"step{step:07d}_{name.split('/')[1]}.png"), pic)
      writer.write_images(step, pictures)
    figures = {}
    if eval_x is not None and (final or _due(step, eval_cfg.every)):
      figures = sample_quality(model, params, config, eval_x, eval_steps)
      writer.write_scalars(step, {f"eval/{k}": v for k, v in figures.items()})
    writer.flush()
    return figures

  if start == 0 and bool(eval_cfg.get("at_start", True)) and eval_x is not None:
    params0 = host_params(state.ema_params)
    if is_main:
      initial = sample_quality(model, params0, config, eval_x, eval_steps)
      writer.write_scalars(0, {f"eval_init/{k}": v for k, v in initial.items()})
      _print_figures("untrained model", initial)

  augment = getattr(objective, "augment", None)
  if start == 0 and augment is not None and is_main and model.kind == "image":
    preview = augment_preview(model, augment, first["x"], int(config.seed))
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    images_lib.save_png(os.path.join(workdir, "samples", "augmented.png"), preview)
    writer.write_images(0, {"data/augmented": preview})

  pending = first
  last_metrics = None
  figures: dict[str, float] = {}
  t_last, steps_since = time.perf_counter(), 0
  bar = tqdm(total=num_steps, initial=start, desc="train", unit="step", disable=not is_main,
             dynamic_ncols=True, mininterval=1.0)
  with Preemption() as preempt:
    step = start
    while step < num_steps:
      local = pending if pending is not None else next(data_iter)
      pending = None
      state, metrics = compiled(state, parallel.global_batch(local, mesh))
      step += 1
      steps_since += 1
      bar.update(1)
      stop = preempt.requested or manager.reached_preemption(step)
      logged = _due(step, config.log_every) or step == num_steps or stop
      if logged:
        last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(last_metrics, step, workdir)
        now = time.perf_counter()
        last_metrics["steps_per_sec"] = steps_since / max(now - t_last, 1e-9)
        t_last, steps_since = now, 0
        writer.write_scalars(step, {f"train/{k}": v for k, v in last_metrics.items()})
        bar.set_postfix(loss=f"{last_metrics['loss']:.4g}")
      if _due(step, config.checkpoint.every) or step == num_steps or stop:
        if not logged:
          _check_finite({k: float(v) for k, v in jax.device_get(metrics).items()}, step, workdir)
        checkpoints.save(manager, step, state, data_iter, force=True)
      if stop:
        log.warning("preemption requested: saved step %d, exiting", step)
        bar.close()
        _close(manager, writer, data_iter)
        return {}
      if _due(step, config.sample_every) or _due(step, eval_cfg.every):
        if step != num_steps:
          periodic_outputs(step, state.ema_params)
    bar.close()
  figures = periodic_outputs(num_steps, state.ema_params, final=True)
  _close(manager, writer, data_iter)
  if is_main and figures:
    _print_figures(f"EMA model after {num_steps} steps", figures)
  return figures


def host_params(params):
  """A full host copy of (possibly sharded, multi-host) parameters, so that sample grids and
  evaluation run on process 0's devices alone without a cross-host collective."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(params, tiled=True)
  return jax.device_get(params)


def _close(manager, writer, data_iter):
  """Finish pending asynchronous saves before returning, then release files and grain workers."""
  manager.wait_until_finished()
  manager.close()
  writer.close()
  if hasattr(data_iter, "close"):
    data_iter.close()


def _due(step: int, every) -> bool:
  """Whether a periodic action (config.*_every, eval.every, checkpoint.every) runs at ``step``; 0 turns
  it off (it still runs at the end of training)."""
  return int(every) > 0 and step % int(every) == 0


def _check_finite(metrics: dict[str, float], step: int, workdir: str):
  bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
  if bad:
    raise FloatingPointError(
        f"non-finite training metrics at step {step}: {bad}; stopped without saving, so the last good "
        f"checkpoint in {checkpoints.checkpoint_dir(workdir)} is kept (lower config.optim.lr or set "
        f"config.optim.grad_clip)")


def _print_compiled_memory(compiled, n_params: int, config):
  from imm_jax.aot import memory_stats  # aot builds on this module, so imported here, not at the top

  mem = memory_stats(compiled)
  line = f"model: {n_params / 1e6:.2f}M parameters; global batch {config.batch_size}"
  if mem is not None:
    line += (f"; compiled step per device: arguments {mem['arguments'] / 2**20:.1f} MiB, "
             f"temporaries {mem['temporaries'] / 2**20:.1f} MiB, total {mem['total'] / 2**20:.1f} MiB")
  print(line, flush=True)


def _print_figures(title: str, figures: dict[str, float]):
  print(f"sample quality ({title}) vs held-out data:", flush=True)
  for k in sorted(figures):
    print(f"  {k:>16s}: {figures[k]:.5f}", flush=True)
