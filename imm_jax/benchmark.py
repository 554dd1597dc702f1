"""Throughput of the real jitted training step, sampler and training input pipeline.

  python -m imm_jax.benchmark --config configs/imagenet256.py:XL/2 --config.batch_size=128 --what train
  python -m imm_jax.benchmark --config configs/imagenet256.py:XL/2 --what sample --steps 8 --cfg_scale 1.5
  python -m imm_jax.benchmark --config configs/cifar10.py --what data --needed_rate 4320

Times the compiled step (or sampler) after warm-up, synchronised with the device, and reports the median
of ``--repeats``: examples per second, model FLOPs utilisation against ``--peak_tflops`` (FLOPs both from
an analytic count of the network and from XLA's cost analysis), and peak device memory where the backend
reports it. ``--what data`` times the trainer's own input iterator (``data.create_train_iterator`` with
``config.data``'s workers and prefetch) over ``--repeats`` batches after warm-up, against the rate the
step consumes (``--needed_rate``). ``--profile_dir DIR`` then traces ``--profile_steps`` more steps with
the JAX profiler and prints where the device time goes (:mod:`imm_jax.profiling`: busy share of the step,
matmul / attention / fusion / copy shares, the most expensive kernels). Results go into
docs/benchmarks.md with the command, device and date.

The functions behind each mode (:class:`TrainLoop`, :func:`make_sampler`, :func:`benchmark_data`) are
what the tests run, so that what is timed is what is checked (e.g. bf16 against float32).
"""

from __future__ import annotations

import datetime
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from imm_jax import aot, gpu_target, profiling, sampling
from imm_jax import data as data_lib
from imm_jax.io_utils import input_errors, stop_on_input_errors

# Forward passes per example in one IMM step: forward + backward (counted as two) on x_t, forward on x_r.
IMM_PASSES_PER_STEP = 4


def dit_forward_flops(net, input_shape) -> float | None:
  """Analytic FLOPs (2 per multiply-add) of one DiT forward pass per example; None for other networks."""
  if type(net).__name__ != "DiT":
    return None
  h, w, c = input_shape
  p, d, depth = net.patch_size, net.hidden_size, net.depth
  tokens = (h // p) * (w // p)
  mlp = int(net.mlp_ratio * d)
  per_block = tokens * (4 * d * d + 2 * d * mlp) + 2 * tokens * tokens * d + 6 * d * d
  macs = (depth * per_block + tokens * p * p * c * d          # patch embedding
          + tokens * d * p * p * c + 2 * d * d                 # final linear and its adaLN
          + 2 * (256 * d + d * d) * (2 if net.s_embed else 1))  # time embeddings
  return 2.0 * macs


def peak_memory_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


def _median_seconds(fn, repeats: int, warmup: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


class TrainLoop:
  """The trainer's compiled step (``aot.compile_update_fn``) from a fresh state on one fixed random
  batch of the config's shape; each call runs one step and returns its metrics. ``state`` is the
  current train state (the previous one is donated)."""

  def __init__(self, config):
    self.step = aot.compile_update_fn(config)
    self.state = self.step.init()
    self.batch = self.step.random_batch(int(config.seed))

  def __call__(self) -> dict[str, jax.Array]:
    self.state, metrics = self.step.compiled(self.state, self.batch)
    return metrics


def _profile(result: dict, fn, seconds: float, profile_dir: str | None, steps: int) -> dict:
  """Adds ``result['profile']`` (profiling.summarize of ``steps`` more calls traced into ``profile_dir``).
  A profiler failure (e.g. no CUPTI) is reported there instead of losing the timing."""
  if profile_dir:
    try:
      result["profile"] = profiling.profile(fn, steps, profile_dir, seconds)
    except Exception as e:  # pylint: disable=broad-except
      result["profile"] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
  return result


def benchmark_train(config, repeats: int = 10, warmup: int = 2, profile_dir: str | None = None,
                    profile_steps: int = 3) -> dict:
  run = TrainLoop(config)
  step = run.step
  seconds = _median_seconds(run, repeats, warmup)
  per_example = dit_forward_flops(step.model.net, step.model.input_shape)
  devices = step.mesh.devices.size
  result = {"what": "train", "batch_size": step.batch_size, "seconds_per_step": seconds,
            "examples_per_second": step.batch_size / seconds, "devices": devices,
            "xla_tflop_per_step": None if step.flops is None else step.flops * devices / 1e12,
            "analytic_tflop_per_step": None if per_example is None
            else per_example * IMM_PASSES_PER_STEP * step.batch_size / 1e12,
            "compile_seconds": step.compile_seconds, "peak_memory_bytes": peak_memory_bytes()}
  # On a known GPU: the compiled (autotuned) step's kernels at its roofline; the timed step against that
  # is how close the kernels come to the ceilings.
  target = gpu_target.for_device(step.mesh.devices.flat[0])
  if target is not None:
    account = profiling.hlo_account(step.compiled.as_text(), target.peak_flops, target.bandwidth)
    result["roofline_ms"] = account["roofline_ms"]
    result["roofline_ms_by_kind"] = {k: v["ms"] for k, v in account["kinds"].items()}
    result["roofline_rematerialized_ms"] = account["rematerialized"]["ms"]
  if step.estimated_seconds:  # on a TPU: XLA:TPU's cost model of the compiled step
    result["xla_estimate_ms"] = 1e3 * step.estimated_seconds
  return _profile(result, run, seconds, profile_dir, profile_steps)


def make_sampler(config, steps: int, cfg_scale: float, batch_size: int, params=None):
  """(model, run): ``run()`` draws ``batch_size`` samples with the ``steps``-step uniform pushforward
  sampler (guided at ``cfg_scale`` for class-conditional models) from fixed noise and labels.
  ``params``: the network's parameters (default: a fresh initialisation, enough for timing)."""
  from imm_jax.builder import build_model  # pylint: disable=import-outside-toplevel
  with input_errors():
    model = build_model(config, aot.config_data_info(config))
  if params is None:
    params = jax.jit(model.init_params)(jax.random.key(0))
  noise = sampling.prior_noise(jax.random.key(1), (batch_size,) + model.input_shape, model.precond.sigma_d)
  labels = None
  if model.null_label is not None:
    labels = jnp.arange(batch_size, dtype=jnp.int32) % model.num_classes
  fn = aot.sample_fn(model, config, steps, cfg_scale)
  return model, lambda: fn(params, noise, labels)


def benchmark_sample(config, steps: int, cfg_scale: float, batch_size: int, repeats: int = 10,
                     warmup: int = 2, profile_dir: str | None = None, profile_steps: int = 3) -> dict:
  model, run = make_sampler(config, steps, cfg_scale, batch_size)
  seconds = _median_seconds(run, repeats, warmup)
  per_example = dit_forward_flops(model.net, model.input_shape)
  guided = model.guided(cfg_scale)
  passes = steps * (2 if guided else 1)
  # XLA's count of one network evaluation (guided: one batched pass over [conditional; null] rows).
  per_call = aot.forward_flops(model, batch_size * (2 if guided else 1))
  result = {"what": "sample", "steps": steps, "cfg_scale": cfg_scale, "batch_size": batch_size,
            "seconds_per_batch": seconds, "images_per_second": batch_size / seconds,
            "xla_tflop_per_batch": None if per_call is None else per_call * steps / 1e12,
            "analytic_tflop_per_batch": None if per_example is None else per_example * passes * batch_size / 1e12,
            "peak_memory_bytes": peak_memory_bytes()}
  return _profile(result, run, seconds, profile_dir, profile_steps)


def benchmark_data(config, batches: int = 20, warmup: int = 3, needed_rate: float | None = None) -> dict:
  """Examples per second of this process' training input pipeline, as the trainer builds it.

  The rate is steady-state throughput (``batches`` consecutive batches after ``warmup``, which covers
  grain's worker start-up and the first fill of the prefetch buffers), not a median per batch: with
  prefetching, single batches arrive in bursts. ``needed_rate``: examples per second that the training
  step consumes on this process (e.g. 8 GPUs x 540 for DiT-XL/2 on H100s); the result then says how
  many times faster than that the pipeline is (below 1: it would starve the step).
  """
  local_batch = int(config.batch_size) // jax.process_count()
  with input_errors():
    if batches < 1:
      raise ValueError(f"--what=data times at least one batch: set --repeats >= 1, got {batches}")
    it = data_lib.create_train_iterator(config.data, local_batch_size=local_batch, seed=int(config.seed),
                                        process_index=jax.process_index(), process_count=jax.process_count())
  try:
    for _ in range(warmup):
      next(it)
    start = time.perf_counter()
    for _ in range(batches):
      batch = next(it)
    seconds = time.perf_counter() - start
  finally:
    if hasattr(it, "close"):
      it.close()
  rate = local_batch * batches / seconds
  result = {"what": "data", "dataset": data_lib.get_info(config.data).name, "batch_size": local_batch,
            "example_shape": list(batch["x"].shape[1:]), "batches": batches,
            "worker_count": int(config.data.get("worker_count", 0)),
            "prefetch_buffer": int(config.data.get("prefetch_buffer", 0)),
            "seconds_per_batch": seconds / batches, "examples_per_second": rate}
  if needed_rate:
    result.update(needed_examples_per_second=float(needed_rate), headroom=rate / float(needed_rate))
  return result


def report(result: dict, peak_tflops: float | None) -> str:
  tflop = result.get("analytic_tflop_per_step") or result.get("analytic_tflop_per_batch")
  seconds = result.get("seconds_per_step") or result.get("seconds_per_batch")
  device = jax.devices()[0]
  prof = result.get("profile")
  shown = {k: v for k, v in result.items() if k != "profile"}
  if prof:
    shown["profile_trace"] = prof.get("trace") or prof.get("error")
  lines = [f"{datetime.date.today().isoformat()} on {len(jax.devices())} x {device.device_kind} ({device.platform})",
           json.dumps(shown, indent=1)]
  if tflop and peak_tflops:
    lines.append(f"model FLOPs utilisation (analytic): {100 * tflop / seconds / (peak_tflops * result.get('devices', 1)):.1f}% "
                 f"of {peak_tflops} TFLOP/s per device")
  xla_tflop = result.get("xla_tflop_per_step") or result.get("xla_tflop_per_batch")
  if xla_tflop and peak_tflops:
    lines.append(f"model FLOPs utilisation (XLA count): "
                 f"{100 * xla_tflop / seconds / (peak_tflops * result.get('devices', 1)):.1f}%")
  if result.get("roofline_ms"):
    lines.append(f"roofline of the compiled step: {result['roofline_ms']:.1f} ms; the timed step "
                 f"({1e3 * seconds:.1f} ms) runs at {100 * result['roofline_ms'] / (1e3 * seconds):.0f}% of it")
    if result.get("roofline_rematerialized_ms"):
      lines.append(f"of which {result['roofline_rematerialized_ms']:.1f} ms recompute values: the step crossed XLA's "
                   f"memory limit for the GPU (fewer examples per device or micro-batch avoid that)")
  if result.get("xla_estimate_ms"):
    lines.append(f"XLA's cost model of the compiled step: {result['xla_estimate_ms']:.1f} ms; the timed step "
                 f"({1e3 * seconds:.1f} ms) takes {1e3 * seconds / result['xla_estimate_ms']:.2f}x that")
  if prof and "error" in prof:
    lines.append(f"profile: failed ({prof['error']})")
  elif prof:
    lines.append(profiling.describe(prof))
  if "headroom" in result:
    verdict = "keeps up with" if result["headroom"] >= 1 else "would starve"
    lines.append(f"input pipeline: {result['examples_per_second']:.0f} examples/s, {verdict} a step that "
                 f"needs {result['needed_examples_per_second']:.0f} examples/s ({result['headroom']:.2f}x)")
  return "\n".join(lines)


def main(argv):
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  config = FLAGS.config
  with stop_on_input_errors():
    if FLAGS.what == "train":
      result = benchmark_train(config, FLAGS.repeats, FLAGS.warmup, FLAGS.profile_dir, FLAGS.profile_steps)
    elif FLAGS.what == "data":
      result = benchmark_data(config, FLAGS.repeats, FLAGS.warmup, FLAGS.needed_rate)
    else:
      result = benchmark_sample(config, FLAGS.steps, FLAGS.cfg_scale, FLAGS.batch_size or int(config.batch_size),
                                FLAGS.repeats, FLAGS.warmup, FLAGS.profile_dir, FLAGS.profile_steps)
  print(report(result, FLAGS.peak_tflops), flush=True)


def define_flags():
  """The command line's flags (absl's global FLAGS), separate from :func:`run` so that launch scripts'
  argument lists can be parsed in tests without running them."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).", lock_config=True)
  flags.DEFINE_enum("what", "train", ["train", "sample", "data"],
                    "Time the training step, the sampler or the training input pipeline.")
  flags.DEFINE_integer("steps", 1, "Sampling steps (--what=sample).")
  flags.DEFINE_float("cfg_scale", 1.0, "Guidance scale (--what=sample; 1 = no guidance pass).")
  flags.DEFINE_integer("batch_size", 0, "Sampling batch (default: config.batch_size).")
  flags.DEFINE_integer("repeats", 10, "Timed repeats (the median is reported; --what=data: timed batches).")
  flags.DEFINE_integer("warmup", 2, "Untimed repeats first (compilation, autotuning, worker start-up).")
  flags.DEFINE_float("needed_rate", None, "--what=data: examples/s the training step consumes on this host.")
  flags.DEFINE_float("peak_tflops", None, "Per-device peak TFLOP/s for the utilisation figure.")
  flags.DEFINE_string("profile_dir", None, "--what=train|sample: after timing, trace --profile_steps more calls "
                      "with jax.profiler into this folder and print where the device time goes.")
  flags.DEFINE_integer("profile_steps", 3, "Calls traced with --profile_dir.")
  flags.mark_flags_as_required(["config"])


def run():
  from absl import app  # pylint: disable=import-outside-toplevel

  from imm_jax.configs_loader import check_config_argv  # pylint: disable=import-outside-toplevel

  define_flags()
  check_config_argv(sys.argv)
  app.run(main)


if __name__ == "__main__":
  run()
