"""Ahead-of-time compilation of the training step: per-device memory and FLOPs, with no data and no state.

  python -m imm_jax.aot --config configs/imagenet256.py:XL/2 [--num_devices 8] [--config.batch_size=4096]
  python -m imm_jax.aot --config configs/cifar10.py --num_devices 8 --steps 3   # + 3 steps on random batches
  python -m imm_jax.aot --config configs/imagenet256.py:XL/2 --target h100     # for a GPU, from any host

The model, objective and optimizer come from the config exactly as in ``imm_jax.trainer``; the train
state exists only as shapes (``jax.eval_shape``) carrying the trainer's shardings (``parallel``), and the
trainer's own ``update_fn`` is lowered and compiled for the global batch ``config.batch_size`` on a
``config.mesh`` mesh over ``--num_devices`` devices. Nothing is read: the example shape is
``(config.data.image_size,) * 2 + (config.data.channels,)`` (channels default 3) and the classes come from
``config.model.num_classes`` / ``config.data.num_classes`` (or ``--input_shape`` / ``--num_classes``).

On a CPU, ``--num_devices`` fakes that many CPU devices, so the program for an 8-accelerator host (its
sharding, per-device buffers and FLOPs) can be inspected anywhere; memory figures are then those of the
CPU compiler, a guide to, not a measurement of, an accelerator's (it keeps bf16 compute's activations at
about float32 size, for one). ``--config.model.remat`` and ``--config.grad_accum_steps`` are the two ways
to make a device's share of the batch fit (docs/benchmarks.md has the figures of the paper configs).
``--steps N`` runs N real steps on random batches of the right shape (a smoke test and a step time where
no data pipeline exists yet).

``--target h100|h200`` compiles for that NVIDIA GPU (``--num_devices`` of them on one host) on a machine
without one, through JAX's CUDA plugin (``imm_jax.gpu_target``): the memory figures are then XLA:GPU's
own, with how much of the GPU they take, and the optimised program's kernels are added up by kind with a
roofline estimate of the step time (``imm_jax.profiling.hlo_account``).

``--target v5e|v5p|v6e`` compiles for a Cloud TPU slice of ``--num_devices`` chips (all its hosts), or
``--target`` an accelerator type (``v5p-128``, ``v5litepod-16``, ``v6e-8``) for that slice, through
libtpu (``imm_jax.tpu_target``): XLA:TPU's memory per chip (a step that does not fit the HBM stops with
the compiler's figures) and its cost model's time per step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from imm_jax import data as data_lib
from imm_jax import gpu_target, parallel, profiling, sampling, tpu_target
from imm_jax.builder import Model, build_model
from imm_jax.io_utils import fail, input_errors, stop_on_input_errors
from imm_jax.models import count_params, target_platform
from imm_jax.objectives import make_objective
from imm_jax.trainer import make_optimizer, make_update_fn, train_state_layout

_BUILT_IN = ("digits", "toy2d")  # datasets whose shape is known without reading anything external


def config_data_info(config, input_shape: tuple[int, ...] | None = None,
                     num_classes: int | None = None) -> data_lib.DataInfo:
  """The example shape and number of classes of ``config.data`` without reading the data.

  Explicit ``input_shape`` / ``num_classes`` win; built-in datasets (digits, toy2d) report their own;
  otherwise images of ``config.data.image_size`` squared with ``config.data.channels`` (default 3)
  channels and ``config.model.num_classes`` or ``config.data.num_classes`` (default 0) classes.
  """
  data = config.data
  if input_shape is None and num_classes is None and data.name in _BUILT_IN:
    return data_lib.get_info(data)
  if input_shape is None:
    size = int(data.image_size)
    input_shape = (size, size, int(data.get("channels", 3)))
  if num_classes is None:
    num_classes = int(config.model.get("num_classes", 0) or data.get("num_classes", 0) or 0)
    if num_classes == 0 and config.model.get("class_conditional", False):
      raise ValueError("config.model.class_conditional=True, and compiling without the data needs its number "
                       "of classes: pass --num_classes N (or set config.data.num_classes)")
  input_shape = tuple(int(d) for d in input_shape)
  kind = "points" if len(input_shape) == 1 else ("latent" if data.name == "latents" else "image")
  return data_lib.DataInfo(shape=input_shape, num_classes=int(num_classes), kind=kind, name=str(data.name))


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """The trainer's step compiled for one config and mesh, with what it takes and what it costs."""

  compiled: Any                  # jax.stages.Compiled: (state, batch) -> (state, metrics), state donated
  model: Model
  mesh: Mesh
  batch_size: int
  state_shardings: Any
  batch_sharding: NamedSharding
  abstract_state: Any            # ShapeDtypeStructs with shardings
  abstract_batch: dict[str, jax.ShapeDtypeStruct]
  init: Callable[[], Any]        # a fresh train state on its shardings (as the trainer makes one)
  num_params: int
  compile_seconds: float
  memory: dict[str, int] | None  # bytes per device (None where the backend does not report them)
  flops: float | None            # per device per step (a multiply-add is 2 FLOPs); see compile_update_fn
  estimated_seconds: float | None  # XLA:TPU's cost model per step (TPU only); see cost_model_seconds

  def random_batch(self, seed: int = 0) -> dict[str, jax.Array]:
    """A global batch of the right shape: N(0, 0.5^2) examples, uniform labels (for smoke tests)."""
    rng = np.random.default_rng(seed)
    x = self.abstract_batch["x"]
    batch = {"x": (0.5 * rng.standard_normal(x.shape)).astype(np.float32),
             "label": rng.integers(0, max(self.model.num_classes, 1), self.batch_size).astype(np.int32)}
    return jax.device_put(batch, self.batch_sharding)


def memory_stats(compiled) -> dict[str, int] | None:
  """Per-device bytes of a compiled program: arguments, outputs, aliased (donated), temporaries, total."""
  try:
    mem = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (some backends do not implement it)
    return None
  if mem is None:
    return None
  out = {"arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
         "aliased": int(mem.alias_size_in_bytes), "temporaries": int(mem.temp_size_in_bytes),
         "code": int(getattr(mem, "generated_code_size_in_bytes", 0))}
  out["total"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
  return out


def _cost(compiled_or_lowered) -> dict:
  """XLA's cost analysis of a program ({} where the backend has none)."""
  try:
    cost = compiled_or_lowered.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0] if cost else None
  return cost or {}


def flop_count(compiled_or_lowered) -> float | None:
  """XLA's FLOP count of a compiled (per device) or lowered program, None if not reported."""
  flops = _cost(compiled_or_lowered).get("flops")
  return None if flops is None else float(flops)


def cost_model_seconds(compiled, loop_trips: int) -> float | None:
  """XLA's own estimate of a compiled program's time (XLA:TPU's cost model, ``optimal_seconds``; other
  backends report none). Like its FLOP count it takes a loop body once, so a program with a loop (the
  micro-batches of a step, the steps of a sampler: ``loop_trips``) is charged ``loop_trips`` times its
  figure, over-counting what runs outside the loop (the optimizer update, the prior noise)."""
  seconds = _cost(compiled).get("optimal_seconds")
  if not seconds or seconds <= 0:
    return None  # none, or nonsense (libtpu 0.0.42 gives negative times for large v5e / v6e programs)
  looped = " while(" in compiled.as_text()
  return float(seconds) * (loop_trips if looped else 1)


@contextlib.contextmanager
def outside_persistent_cache(active: bool = True):
  """Compiles inside write nothing to JAX's persistent compilation cache, where one is set up (no compile
  is slow enough to be written): for programs of compile-only devices, which cannot be loaded back."""
  min_seconds = jax.config.jax_persistent_cache_min_compile_time_secs
  if active:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
  try:
    yield
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)


# XLA:GPU without a GPU does not autotune: each Triton GEMM gets a default tiling, which for some float32
# GEMMs (e.g. DiT-S/4's at configs/mnist.py's batch) does not exist. An autotuning compile on a GPU
# chooses among tilings and cuBLAS instead.
_NO_TRITON_TILING = "Couldn't find output tile sizes"
_XLA_ERROR_CODE = re.compile(r"^E\d+: \w+: ")  # e.g. "E1000: CompileTimeHbmOom: "


def _compile(lowered, what: str, compile_only: bool):
  """``lowered.compile()``; a program larger than the device's memory, which XLA:TPU refuses at compile
  time, is bad input: one line with the compiler's figures and the ways to make it fit. Programs for
  compile-only devices stay :func:`outside_persistent_cache`; one for a GPU whose Triton GEMM has no
  default tiling is compiled again with cuBLAS GEMMs (xla_gpu_enable_triton_gemm=false), with a note."""
  try:
    with outside_persistent_cache(compile_only):
      try:
        return lowered.compile()
      except jax.errors.JaxRuntimeError as e:
        if not (compile_only and _NO_TRITON_TILING in str(e)):
          raise
        print(f"note: XLA:GPU found no default Triton tiling for a GEMM of {what} (it autotunes only on a "
              f"GPU); compiled with cuBLAS GEMMs instead, as with XLA_FLAGS=--xla_gpu_enable_triton_gemm=false",
              file=sys.stderr, flush=True)
        return lowered.compile({"xla_gpu_enable_triton_gemm": False})
  except jax.errors.JaxRuntimeError as e:
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "RESOURCE_EXHAUSTED" not in message:
      raise
    figures = message.split(": ", 1)[-1]
    # libtpu >= 0.0.50 puts a code in front and the module's name behind the figures.
    figures = _XLA_ERROR_CODE.sub("", figures).split(". HLO module:")[0].rstrip(".")
    error = ValueError(f"{what} does not fit one device ({figures}): set config.model.remat, "
                       f"config.grad_accum_steps or config.mesh.fsdp, or use more --num_devices")
    error.input_error = True
    raise error from e


def _compile_only(device) -> bool:
  """A device of a compiled-for topology (``--target``), not one this process runs on."""
  return device.platform != jax.default_backend()


def compile_update_fn(config, *, devices=None, input_shape: tuple[int, ...] | None = None,
                      num_classes: int | None = None) -> CompiledStep:
  """Lower and compile ``trainer.make_update_fn`` for ``config`` from shapes alone.

  ``devices``: the mesh's devices (default all). ``input_shape`` / ``num_classes``: see
  :func:`config_data_info`. FLOPs: XLA's cost analysis counts a loop body once, so with
  ``config.grad_accum_steps = n`` its count (one micro-batch plus the optimizer update) is scaled by n;
  that over-counts the update (a few FLOPs per parameter) by n - 1 times, negligible beside the network.
  Where XLA has no cost analysis (compile-only GPU devices), the FLOPs are those of the optimised
  program's dots, convolutions and attention (``profiling.hlo_account``).
  """
  platform = (list(devices) if devices is not None else jax.devices())[0].platform
  with target_platform(platform):  # the networks' platform checks are for the devices compiled for
    return _compile_update_fn(ml_collections.ConfigDict(config), devices, input_shape, num_classes)


def _compile_update_fn(config, devices, input_shape, num_classes) -> CompiledStep:
  with input_errors():  # bad config: one line from the command-line tools
    info = config_data_info(config, input_shape, num_classes)
    model = build_model(config, info)
    mesh = parallel.create_mesh(int(config.mesh.data), int(config.mesh.fsdp), devices=devices)
    tx = make_optimizer(config.optim, int(config.num_steps))
    objective = make_objective(config, model.net, model.precond, model.null_label)
    batch_size = int(config.batch_size)
    accum = int(config.get("grad_accum_steps", 1))
    parallel.check_batch_layout(batch_size, objective.group_size, mesh, accum)

  # The state's layout as the trainer derives it.
  init_fn, teacher_items, state_sh, abstract_state = train_state_layout(model, tx, objective, mesh, config)

  def init():
    teacher = None
    if teacher_items:  # for smoke tests only: fresh parameters as the teacher, a unit preconditioner
      fresh = model.init_params(jax.random.key(int(config.seed) + 1))
      teacher = {k: fresh if k == "params" else jax.tree.map(jnp.ones_like, fresh) for k in teacher_items}
    return jax.jit(init_fn, out_shardings=state_sh)(teacher)

  batch_sh = parallel.batch_sharding(mesh)
  abstract_batch = {
      "x": jax.ShapeDtypeStruct((batch_size,) + tuple(info.shape), jnp.float32, sharding=batch_sh),
      "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch_sh),
  }
  jitted = jax.jit(make_update_fn(objective, tx, config), in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, parallel.replicated(mesh)), donate_argnums=(0,))
  start = time.perf_counter()
  compiled = _compile(jitted.lower(abstract_state, abstract_batch),
                      f"the step at batch {batch_size} ({batch_size // mesh.devices.size // accum} per device"
                      f" per micro-batch)", compile_only=_compile_only(mesh.devices.flat[0]))
  seconds = time.perf_counter() - start
  flops = flop_count(compiled)
  flops = profiling.hlo_account(compiled.as_text(), 1.0, 1.0)["flops"] if flops is None else flops * accum
  return CompiledStep(
      compiled=compiled, model=model, mesh=mesh, batch_size=batch_size, state_shardings=state_sh,
      batch_sharding=batch_sh, abstract_state=abstract_state, abstract_batch=abstract_batch,
      init=init, num_params=count_params(abstract_state.params), compile_seconds=seconds,
      memory=memory_stats(compiled), flops=flops, estimated_seconds=cost_model_seconds(compiled, accum))


def sample_fn(model: Model, config, steps: int, cfg_scale: float) -> Callable:
  """``(params, noise, labels) -> samples``: the ``steps``-step pushforward sampler on the uniform schedule
  (``config.imm`` eps and T), guided at ``cfg_scale`` for class-conditional models (one batched pass over
  conditional and null rows); what ``imm_jax.benchmark --what sample`` times."""
  guided = model.guided(cfg_scale)
  times = sampling.make_schedule("uniform", steps, model.precond.interpolant, float(config.imm.eps),
                                 float(config.imm.T))

  def fn(params, noise, labels):
    return sampling.generate(model.net, params, model.precond, noise, times, labels, cfg_scale,
                             guided=guided, null_label=model.null_label)

  return fn


@dataclasses.dataclass(frozen=True)
class CompiledSampler:
  """:func:`sample_fn` compiled for a batch split over a mesh's devices (parameters replicated)."""

  compiled: Any                  # jax.stages.Compiled: (params, noise, labels) -> samples
  model: Model
  mesh: Mesh
  batch_size: int
  steps: int
  cfg_scale: float
  num_params: int
  compile_seconds: float
  memory: dict[str, int] | None
  flops: float | None            # per device per batch
  estimated_seconds: float | None  # XLA:TPU's cost model per batch (TPU only); see cost_model_seconds


def compile_sampler(config, steps: int, cfg_scale: float, batch_size: int, *, devices=None,
                    input_shape: tuple[int, ...] | None = None, num_classes: int | None = None) -> CompiledSampler:
  """Lower and compile :func:`sample_fn` from shapes alone, the batch split over ``devices`` (default
  all). FLOPs per device: XLA's count of one network evaluation on a device's rows (:func:`forward_flops`;
  guided: conditional and null rows) times ``steps``, as the benchmark counts them; for compile-only
  GPUs, the optimised program's (``profiling.hlo_account``)."""
  devices = list(devices) if devices is not None else jax.devices()
  platform = devices[0].platform
  with target_platform(platform):
    with input_errors():
      config = ml_collections.ConfigDict(config)
      model = build_model(config, config_data_info(config, input_shape, num_classes))
      if steps < 1 or batch_size < 1:
        raise ValueError(f"sampling needs --sample_steps >= 1 and --batch_size >= 1, got {steps} and {batch_size}")
      if batch_size % len(devices):
        raise ValueError(f"--batch_size={batch_size} does not split over {len(devices)} devices: give a multiple")
    mesh = parallel.create_mesh(len(devices), 1, devices=devices)
    batch_sh, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), model.abstract_params())
    noise = jax.ShapeDtypeStruct((batch_size,) + model.input_shape, jnp.float32, sharding=batch_sh)
    labels = (None if model.null_label is None
              else jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch_sh))
    start = time.perf_counter()
    compiled = _compile(jax.jit(sample_fn(model, config, steps, cfg_scale)).lower(params, noise, labels),
                        f"the sampler at batch {batch_size} ({batch_size // len(devices)} per device)",
                        compile_only=_compile_only(devices[0]))
    seconds = time.perf_counter() - start
    if platform in (jax.default_backend(), "tpu"):  # networks that lower the same here (no cuDNN calls)
      flops = forward_flops(model, batch_size // len(devices) * (2 if model.guided(cfg_scale) else 1))
      flops = None if flops is None else flops * steps
    else:  # compile-only GPUs: this backend cannot lower cuDNN attention as they run it
      flops = profiling.hlo_account(compiled.as_text(), 1.0, 1.0)["flops"]
  return CompiledSampler(compiled=compiled, model=model, mesh=mesh, batch_size=batch_size, steps=steps,
                         cfg_scale=cfg_scale, num_params=count_params(params), compile_seconds=seconds,
                         memory=memory_stats(compiled), flops=flops,
                         estimated_seconds=cost_model_seconds(compiled, steps))


def forward_flops(model: Model, batch_size: int = 1) -> float | None:
  """XLA's FLOP count of one network forward pass (with labels) at ``batch_size``, from the lowered HLO.

  The paper's Table 5 "GFLOPs" count a multiply-add once, i.e. about half of this per example.
  """
  params = model.abstract_params()
  x = jax.ShapeDtypeStruct((batch_size,) + model.input_shape, jnp.float32)
  c = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
  y = None if model.null_label is None else jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  forward = jax.jit(lambda p, x, c, y: model.net.apply({"params": p}, x, c, c, y, train=False))
  return flop_count(forward.lower(params, x, c, y))


def _gib(n: int) -> str:
  return f"{n / 2**30:.3f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def describe(program: CompiledStep | CompiledSampler, config,
             target: gpu_target.GpuTarget | tpu_target.TpuTarget | None = None) -> str:
  """What was compiled, its memory and FLOPs per device; for a GPU ``target``, also the share of the
  GPU's memory and the optimised program's roofline account (``profiling.hlo_account``); for a TPU one,
  the share of the chip's HBM and XLA:TPU's cost-model time (:func:`cost_model_seconds`)."""
  devices = program.mesh.devices.size
  mesh = " x ".join(f"{k}={v}" for k, v in program.mesh.shape.items())
  tpu = isinstance(target, tpu_target.TpuTarget)
  where = program.mesh.devices.flat[0].platform
  if target is not None:
    where = f"{target.description} (compile-only" + (
        f"; {target.accelerator_type(devices)}, topology {target.topology(devices)})" if tpu else ")")
  net = program.model.net
  lines = [
      f"model: {program.num_params / 1e6:.2f}M parameters, input {program.model.input_shape}, "
      f"{program.model.num_classes} classes; compute {jnp.dtype(net.dtype).name}, remat "
      f"{getattr(net, 'remat', 'none')}"]
  per_device = program.batch_size // devices
  if isinstance(program, CompiledSampler):
    unit, examples = "batch", "images"
    guided = program.model.guided(program.cfg_scale)
    lines.append(f"sampler: {program.steps} step(s)" + (f", guidance {program.cfg_scale} (conditional and null rows"
                                                        f" in one pass)" if guided else "")
                 + f", batch {program.batch_size} ({per_device} per device) on {devices} {where} devices; "
                 f"compiled in {program.compile_seconds:.1f} s")
  else:
    unit, examples = "step", "examples"
    accum = int(config.get("grad_accum_steps", 1))
    lines.append(f"step: global batch {program.batch_size} ({per_device} per device"
                 + (f", {accum} micro-batches" if accum > 1 else "") + f") on {devices} {where} devices, mesh "
                 f"{mesh}; compiled in {program.compile_seconds:.1f} s")
  if program.memory is not None:
    m = program.memory
    lines.append(f"memory per device: arguments {_gib(m['arguments'])}, outputs {_gib(m['outputs'])} "
                 f"({_gib(m['aliased'])} aliased with donated arguments), temporaries {_gib(m['temporaries'])}"
                 f", total {_gib(m['total'])}")
  else:
    lines.append("memory per device: not reported by this backend")
  if program.flops is not None:
    lines.append(f"FLOPs per {unit}: {program.flops / 1e12:.3f} TFLOP per device, {program.flops * devices / 1e12:.3f} "
                 f"TFLOP in all ({program.flops * devices / program.batch_size / 1e9:.2f} GFLOP per example)")
  sums_across_devices = isinstance(program, CompiledStep) and devices > 1
  gpu_roofline = target is not None and not tpu
  text = program.compiled.as_text() if sums_across_devices or gpu_roofline else ""  # large for big models
  if sums_across_devices:
    def megabytes(sums):
      return ", ".join(f"{dtype} {n / 1e6:.3f} MB" for dtype, n in sums.most_common())

    sums = profiling.reduction_bytes(text)
    lines.append("summed across devices (all-reduce, reduce-scatter; each instruction once): "
                 + (megabytes(sums) or "nothing"))
    in_loop = profiling.reduction_bytes(text, in_loops=True)
    if accum > 1 and sum(in_loop.values()) >= 1e-3 * sum(sums.values()):  # not just the metrics' scalars
      lines.append(f"  of which inside the accumulation loop, once per micro-batch ({accum} times a step): "
                   + megabytes(in_loop))
  if tpu:
    if program.memory is not None:
      lines.append(f"that is {100 * program.memory['total'] / target.memory_bytes:.0f}% of the chip's "
                   f"{_gib(target.memory_bytes)} of HBM (XLA:TPU refuses to compile a program that does not fit)")
    floor = program.flops / target.peak_flops if program.flops else 0.0
    if floor:
      lines.append(f"compute floor: {1e3 * floor:.1f} ms per {unit} at the chips' {target.peak_flops / 1e12:.0f} "
                   f"TFLOP/s, at most {program.batch_size / floor:.0f} {examples}/s")
    t = program.estimated_seconds
    if t and t >= floor:
      lines.append(f"XLA:TPU's cost model: {1e3 * t:.1f} ms per {unit}, {program.batch_size / t:.0f} {examples}/s "
                   f"({program.batch_size / t / devices:.1f} per chip, {100 * floor / t:.0f}% of the compute floor's "
                   f"rate; the compiler's estimate, not a measurement)")
    else:
      lines.append("XLA:TPU's cost model: no usable estimate for this program" + (
          f" ({1e3 * t:.3g} ms, below the compute floor)" if t else ""))
  elif gpu_roofline:
    if program.memory is not None:
      share = program.memory["total"] / target.memory_bytes
      lines.append(f"that is {100 * share:.0f}% of the GPU's {_gib(target.memory_bytes)}: "
                   + ("fits JAX's default preallocation (75%)" if share <= 0.75 else
                      "more than JAX's default preallocation (75%): set XLA_CLIENT_MEM_FRACTION"
                      if share <= 0.95 else "does not fit: set config.model.remat or config.grad_accum_steps"))
    account = profiling.hlo_account(text, target.peak_flops, target.bandwidth)
    lines.append(profiling.describe_account(account, unit))
    lines.append(f"  at that roofline: {program.batch_size / account['roofline_ms'] * 1e3:.0f} {examples}/s (an "
                 f"upper bound: real kernels reach a fraction of both ceilings; XLA did not autotune without a GPU)")
  return "\n".join(lines)


def run_steps(step: CompiledStep, num_steps: int, seed: int = 0):
  """Run the compiled step ``num_steps`` times on random batches from a fresh state.

  Returns (state, per-step metrics as floats, seconds per step after the first)."""
  state = step.init()
  history, times = [], []
  for i in range(num_steps):
    batch = step.random_batch(seed + i)
    start = time.perf_counter()
    state, metrics = step.compiled(state, batch)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    times.append(time.perf_counter() - start)
    history.append(metrics)
  per_step = float(np.mean(times[1:])) if len(times) > 1 else (times[0] if times else float("nan"))
  return state, history, per_step


def main(argv):
  from absl import app, flags  # pylint: disable=import-outside-toplevel

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  target = None
  if FLAGS.target:
    if FLAGS.steps:
      fail(f"--steps={FLAGS.steps} runs steps, which compile-only --target {FLAGS.target} devices cannot: "
           f"drop one of them")
    # Only compiling: keep JAX off any accelerator here, and its plugins from looking for their hardware.
    jax.config.update("jax_platforms", "cpu")
    with stop_on_input_errors(), input_errors():
      if FLAGS.target in gpu_target.TARGETS:
        target = gpu_target.TARGETS[FLAGS.target]
        devices = gpu_target.devices(FLAGS.target, FLAGS.num_devices or 1)
      else:
        tpu = tpu_target.resolve(FLAGS.target)
        if tpu is None:
          types = ", ".join(t.accelerator_type(t.slice_sizes()[1]) for t in tpu_target.TARGETS.values())
          raise ValueError(f"--target {FLAGS.target}: compiles for a GPU ({', '.join(gpu_target.TARGETS)}), a TPU "
                           f"generation ({', '.join(tpu_target.TARGETS)}) with --num_devices, or a Cloud TPU "
                           f"accelerator type ({types}, ...)")
        name, chips = tpu
        target = tpu_target.TARGETS[name]
        if chips and FLAGS.num_devices and FLAGS.num_devices != chips:
          raise ValueError(f"--num_devices={FLAGS.num_devices} but --target {FLAGS.target} is a slice of {chips} "
                           f"chips: drop --num_devices")
        devices = tpu_target.devices(name, chips or FLAGS.num_devices or target.slice_sizes()[0])
  else:
    if FLAGS.num_devices:
      jax.config.update("jax_num_cpu_devices", FLAGS.num_devices)  # CPU only; before the backend starts
    devices = jax.devices()
    if FLAGS.num_devices:
      if len(devices) < FLAGS.num_devices:
        raise app.UsageError(
            f"--num_devices={FLAGS.num_devices} but only {len(devices)} {devices[0].platform} devices are "
            f"visible; compile for a CPU stand-in with JAX_PLATFORMS=cpu")
      devices = devices[:FLAGS.num_devices]
  input_shape = tuple(int(d) for d in FLAGS.input_shape.split(",")) if FLAGS.input_shape else None
  config = FLAGS.config
  if FLAGS.what == "sample":
    if FLAGS.steps:
      fail(f"--steps={FLAGS.steps} runs training steps; with --what sample time the sampler with "
           f"python -m imm_jax.benchmark --what sample")
    with stop_on_input_errors():
      sampler = compile_sampler(config, FLAGS.sample_steps, FLAGS.cfg_scale,
                                FLAGS.batch_size or int(config.batch_size), devices=devices,
                                input_shape=input_shape, num_classes=FLAGS.num_classes)
    print(describe(sampler, config, target), flush=True)
    return
  with stop_on_input_errors():
    step = compile_update_fn(config, devices=devices, input_shape=input_shape, num_classes=FLAGS.num_classes)
  print(describe(step, config, target), flush=True)
  if FLAGS.steps:
    _, history, seconds = run_steps(step, FLAGS.steps, seed=int(config.seed))
    for i, metrics in enumerate(history, 1):
      print(f"step {i}: loss {metrics['loss']:.6g}, grad_norm {metrics['grad_norm']:.4g}", flush=True)
    which = "after the first" if FLAGS.steps > 1 else "(one step: includes the first call's overhead)"
    print(f"{seconds:.3f} s per step {which}, {step.batch_size / seconds:.1f} examples/s", flush=True)


def run():
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  from imm_jax.configs_loader import check_config_argv  # pylint: disable=import-outside-toplevel

  # Defined here, not at import, so that importing this module as a library defines no flags.
  config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:variant]).",
                                  lock_config=True)
  flags.DEFINE_integer("num_devices", None, "Devices in the mesh (default: all; on CPU, fakes this many; with --target: "
                       "GPUs, or a TPU slice's chips, default the smallest slice).")
  flags.DEFINE_string("input_shape", None, "Example shape, e.g. 32,32,4 (default: from config.data).")
  flags.DEFINE_integer("num_classes", None, "Classes (default: config.model/data.num_classes, else 0).")
  flags.DEFINE_integer("steps", 0, "Also run this many steps on random batches and time them.")
  flags.DEFINE_enum("what", "train", ["train", "sample"], "Compile the training step or the sampler.")
  flags.DEFINE_integer("sample_steps", 1, "--what=sample: sampling steps (the uniform schedule).")
  flags.DEFINE_float("cfg_scale", 1.0, "--what=sample: guidance scale (1 = no guidance pass).")
  flags.DEFINE_integer("batch_size", 0, "--what=sample: images per batch (default: config.batch_size).")
  flags.DEFINE_string("target", None,
                      f"Compile for this NVIDIA GPU ({', '.join(gpu_target.TARGETS)}; needs JAX's CUDA plugin, not "
                      f"the GPU: memory and roofline) or Cloud TPU slice ({', '.join(tpu_target.TARGETS)} with "
                      f"--num_devices chips, or an accelerator type such as v5p-128; needs libtpu: memory and "
                      f"XLA's cost model).")
  flags.mark_flags_as_required(["config"])
  check_config_argv(sys.argv)
  app.run(main)


if __name__ == "__main__":
  run()
