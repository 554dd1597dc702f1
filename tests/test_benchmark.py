"""imm_jax.benchmark's code paths on CPU: bf16 compute against float32 for the training step and the
sampler it times (issues 4 and 8), and the input-pipeline rate of ``--what data``.

Tolerances are in units of bf16's precision, BF16_EPS = 2^-8 (8 significand bits; one rounding is off by
at most half of it). A tiny network rounds its activations a few dozen times along any path and the
errors partly cancel, so its output is off by about one to a few BF16_EPS relative to its scale (measured
with these random parameters: samples 0.5-0.7 BF16_EPS for the DiT, 2-3 for the UNet, whose
unnormalised random convolutions amplify more). The loss and the gradient norm average over every
example and parameter and came out 20x closer (0.03-1.1 BF16_EPS). Bounds: 4 BF16_EPS (1.6%) on the
loss, MMD and gradient norm, 8 BF16_EPS (3%) on the samples' relative RMS error. A float16 path (10
significand bits) would pass them too; a float32 path that drops to bf16 inside the loss is caught by
the dtype checks instead, and one where bf16 never ran by the ``> 0`` checks.
"""

from __future__ import annotations

import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import make_tiny_digits
from imm_jax import aot, benchmark
from imm_jax.builder import build_model
from imm_jax.configs_loader import load_config
from imm_jax.objectives import imm as imm_objective

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BF16_EPS = 2.0**-8

# A DDPM++-style UNet with both levels (resampling) and attention at 4x4, on the tiny digits config.
TINY_UNET = dict(name="unet", model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                 dropout=0.0, remat="none")


def _config(network: str, dtype: str, conditional: bool = False):
  c = make_tiny_digits()
  c.model.update(depth=2)
  c.optim.warmup_steps = 0  # the first step moves the parameters
  if network == "unet":
    c.model = ml_collections.ConfigDict(dict(TINY_UNET, class_conditional=False))
  c.model.dtype = dtype
  if conditional:
    c.model.class_conditional = True
    c.imm.label_dropout = 0.1
  return c


def _random_params(params, seed: int = 0, scale: float = 0.1):
  """Every parameter replaced by N(0, scale^2) (norm scales around 1): the initialisation's zero
  (DiT adaLN-Zero) and 1e-5-scaled (UNet) output layers make G = 0 there, which bf16 would reproduce
  exactly and so test nothing."""
  flat = flax.traverse_util.flatten_dict(params)
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in flat.items():
    value = scale * rng.standard_normal(leaf.shape) + (1.0 if path[-1] == "scale" else 0.0)
    out[path] = np.asarray(value, np.float32)
  return flax.traverse_util.unflatten_dict(out)


def _rel_rms(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


@pytest.mark.slow  # compiles the training step four times: ~25 s (DiT), ~60 s (UNet) on 2 cores
@pytest.mark.parametrize("network", ["dit", "unet"])
def test_bf16_training_step_matches_float32(network, monkeypatch):
  mmd_inputs = []
  real_group_mmd = imm_objective.group_mmd

  def spy(y_t, y_r, scale, *args):
    mmd_inputs.append((y_t.dtype, y_r.dtype, scale.dtype))
    return real_group_mmd(y_t, y_r, scale, *args)

  monkeypatch.setattr(imm_objective, "group_mmd", spy)
  metrics, states = {}, {}
  for dtype in ("float32", "bfloat16"):
    loop = benchmark.TrainLoop(_config(network, dtype))
    params = initial = _random_params(jax.device_get(loop.state.params))
    loop.state = jax.device_put(loop.state.replace(params=params, ema_params=params), loop.step.state_shardings)
    metrics[dtype] = {k: float(v) for k, v in jax.device_get(loop()).items()}
    states[dtype] = jax.device_get(loop.state)
  f32, bf16 = metrics["float32"], metrics["bfloat16"]

  # The kernel MMD sees float32 network outputs under bf16 compute (denoise casts G back).
  assert mmd_inputs and all(d == jnp.float32 for row in mmd_inputs for d in row), mmd_inputs
  # Parameters, EMA and optimizer state stay float32 after an optimizer step.
  for leaf in jax.tree.leaves((states["bfloat16"].params, states["bfloat16"].ema_params,
                               states["bfloat16"].opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32, leaf.dtype
  # Same loss within bf16 precision; bf16 really ran (the loss differs in its last bits).
  for key in ("loss", "mmd", "grad_norm"):
    err = abs(bf16[key] - f32[key]) / abs(f32[key])
    assert 0 < err < 4 * BF16_EPS, (key, f32[key], bf16[key])
  # The step was applied. (The updated values are not compared: Adam's first step moves each parameter
  # by lr * sign(grad), and bf16 noise flips the sign of the many near-zero gradient entries.)
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(states["bfloat16"].params),
                                               jax.tree.leaves(initial))]
  assert min(moved) > 0


@pytest.mark.parametrize("network", ["dit", "unet"])
def test_bf16_guided_samples_match_float32(network):
  samples = {}
  for dtype in ("float32", "bfloat16"):
    config = _config(network, dtype, conditional=True)
    for steps in (1, 2):
      params = _random_params(build_model(config, aot.config_data_info(config)).abstract_params())
      _, run = benchmark.make_sampler(config, steps, 1.5, 8, params=params)
      samples[dtype, steps] = np.asarray(jax.device_get(run()))
  for steps in (1, 2):
    f32, bf16 = samples["float32", steps], samples["bfloat16", steps]
    assert f32.dtype == bf16.dtype == np.float32 and f32.shape == (8, 8, 8, 1)
    assert np.all(np.isfinite(bf16))
    assert 0 < _rel_rms(bf16, f32) < 8 * BF16_EPS, (steps, _rel_rms(bf16, f32))


def test_guided_sampling_benchmark_counts_two_passes_per_step():
  """DiT-S/2 (Table 5: 6.06 GFLOPs, i.e. 12.1 GFLOP per forward) sampled with guidance, 1 step, 2 images:
  2 passes x 2 images x 12.1 GFLOP, by the analytic count and by XLA's, and both utilisation lines."""
  result = benchmark.benchmark_sample(load_config("imagenet256", "S/2"), 1, 1.5, 2, repeats=1, warmup=0)
  expected = 2 * 2 * 2 * 6.06e9 / 1e12
  assert result["analytic_tflop_per_batch"] == pytest.approx(expected, rel=0.01)
  assert result["xla_tflop_per_batch"] == pytest.approx(expected, rel=0.01)
  text = benchmark.report(result, 1.0)
  assert "model FLOPs utilisation (analytic)" in text and "model FLOPs utilisation (XLA count)" in text


def test_data_rate_of_the_training_iterator():
  c = make_tiny_digits()
  c.data.prefetch_buffer = 2
  result = benchmark.benchmark_data(c, batches=5, warmup=1, needed_rate=1.0)
  assert result["what"] == "data" and result["batch_size"] == 16 and result["example_shape"] == [8, 8, 1]
  assert result["examples_per_second"] > 0 and result["headroom"] == result["examples_per_second"]
  assert "keeps up with a step that needs 1 examples/s" in benchmark.report(result, None)


@pytest.mark.parametrize("argv,message", [
    (["imm_jax.aot", "--config", "configs/digits.py", "--config.batch_size=6"],
     "config.batch_size / config.grad_accum_steps = 6 must be a multiple of devices (1) x config.imm.group_size (4)"),
    (["imm_jax.benchmark", "--config", "configs/digits.py", "--config.model.attention_impl=cudnn", "--what",
      "sample"], "config.model.attention_impl='cudnn' needs an NVIDIA GPU, but JAX runs on cpu"),
    (["imm_jax.benchmark", "--config", "configs/digits.py", "--what", "data", "--repeats", "0"],
     "--what=data times at least one batch: set --repeats >= 1"),
])
def test_bad_input_is_one_line(argv, message):
  """The ahead-of-time compiler and the benchmark stop on a bad config as imm_jax.train does."""
  r = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr[-3000:]
  assert r.stderr.startswith(f"error: {message}"), r.stderr


def test_data_rate_command_line():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "imm_jax.benchmark", "--config", "configs/digits.py", "--what", "data",
         "--repeats", "3", "--warmup", "1", "--needed_rate", "1e9", "--config.data.image_size=8",
         # The execution options are config fields that flags set (the data mode builds no network).
         "--config.model.attention_impl=cudnn", "--config.model.remat=block"]
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert '"what": "data"' in r.stdout and "would starve a step that needs 1000000000 examples/s" in r.stdout
