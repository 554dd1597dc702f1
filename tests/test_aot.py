"""Ahead-of-time compilation (imm_jax.aot) and the paper configs (configs/imagenet256.py, configs/cifar10.py).

No encoded ImageNet latents are at hand, so the ImageNet configs are checked from shapes alone: Table 5's
sizes and FLOPs, and each variant (real width, one block, batch 4) compiled ahead of time and run for a
few real steps through that compiled step on random batches of the latents' shape. CIFAR-10 is compiled
here at one block per level; its real steps through the trainer on ``tfds.testing.mock_data`` are in
tests/test_configs.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from imm_jax import aot, benchmark
from imm_jax import data as data_lib
from imm_jax.builder import build_model
from imm_jax.configs_loader import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("S/2", "B/2", "L/2", "XL/2", "XL/2-ts-a2")

# Table 5: (parameters in millions, forward GFLOPs per example counting a multiply-add once).
TABLE5 = {"S/2": (33, 6.06), "B/2": (130, 23.01), "L/2": (458, 80.71), "XL/2": (675, 118.64)}


def imagenet(variant: str, **model):
  c = load_config("imagenet256", variant)
  c.model.update(model)
  return c


def test_imagenet_config_carries_table5_hyperparameters():
  for variant in VARIANTS:
    c = load_config("imagenet256", variant)
    best = variant == "XL/2-ts-a2"
    assert (c.batch_size, c.imm.group_size, c.num_steps) == (4096, 4, 1_200_000)
    assert (c.precond.interpolant, c.precond.f_type, c.precond.sigma_d) == ("ot_fm", "euler_fm", 0.5)
    assert c.precond.temb_type == ("stride" if best else "identity")
    assert (c.imm.eps, c.imm.T, c.imm.k, c.imm.weight_b, c.imm.kernel) == (0.0, 0.994, 12, 4.0, "laplace")
    assert (c.imm.weight_a, c.imm.min_gap) == ((2.0, 1e-4) if best else (1.0, 0.0))
    assert c.imm.label_dropout == 0.1 and c.model.class_conditional and c.model.num_classes == 1000
    assert (c.optim.name, c.optim.lr, c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay) == (
        "adamw", 1e-4, 0.9, 0.999, 1e-8, 0.0)
    assert (c.ema.decay, c.ema.warmup) == (0.9999, False)
    assert (tuple(c.sample.steps), c.sample.schedule, c.sample.cfg_scale) == ((8,), "uniform", 1.5)
    assert c.model.patch_size == 2 and c.model.depth == {"S": 12, "B": 12, "L": 24, "XL": 28}[variant.split("/")[0]]
    assert (c.data.name, c.data.image_size, c.data.channels, c.data.x_flip) == ("latents", 32, 4, False)
  assert load_config("imagenet256").precond.temb_type == "stride"  # no variant: the best run
  with pytest.raises(ValueError, match=r"unknown variant 'XL/4'.*S/2, B/2, L/2, XL/2, XL/2-ts-a2"):
    load_config("imagenet256", "XL/4")


def test_shapes_come_from_the_config_and_training_needs_the_latents_path(tmp_path):
  c = load_config("imagenet256", "S/2")
  assert aot.config_data_info(c) == data_lib.DataInfo((32, 32, 4), 1000, "latent", "latents")
  with pytest.raises(ValueError, match=r"config\.data\.path is empty"):
    data_lib.get_info(c.data)  # what the trainer does first
  cifar = load_config("cifar10")
  cifar.data.tfds_data_dir = str(tmp_path / "no_tfds_here")  # nothing is read, so nothing needs to exist
  assert aot.config_data_info(cifar).shape == (32, 32, 3)
  assert build_model(cifar, aot.config_data_info(cifar)).num_classes == 0  # unconditional
  assert aot.config_data_info(cifar, input_shape=(16, 16, 1), num_classes=10).shape == (16, 16, 1)
  assert aot.config_data_info(load_config("digits")).shape == (16, 16, 1)  # built in: asked, not guessed
  cifar.model.class_conditional = True  # no number of classes anywhere: asked for, not compiled with 0
  with pytest.raises(ValueError, match=r"class_conditional=True, .* pass --num_classes N"):
    aot.config_data_info(cifar)
  assert aot.config_data_info(cifar, num_classes=10).num_classes == 10


@pytest.mark.parametrize("variant", list(TABLE5))
def test_dit_sizes_and_flops_match_table5(variant):
  model = build_model(imagenet(variant), aot.config_data_info(imagenet(variant)))
  params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(model.abstract_params()))
  millions, gflops = TABLE5[variant]
  # One more timestep MLP than DiT (the s embedding, 1.5M) and the null-class row.
  assert params / 1e6 == pytest.approx(millions, rel=0.01, abs=2.0)
  assert aot.forward_flops(model) / 2e9 == pytest.approx(gflops, rel=0.01)
  # The benchmark's analytic count (its MFU figure) against the same table (XL/2: 237 GFLOP per sample).
  assert benchmark.dit_forward_flops(model.net, model.input_shape) / 2e9 == pytest.approx(gflops, rel=0.01)


def test_cifar10_unet_size_and_flops():
  c = load_config("cifar10")
  model = build_model(c, aot.config_data_info(c))
  params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(model.abstract_params()))
  assert params / 1e6 == pytest.approx(55.7, rel=0.01)  # DDPM++ 55.7M (+ the s embedding MLP)
  assert aot.forward_flops(model) / 2e9 == pytest.approx(21.28, rel=0.06)  # Table 5's 21.28 "GFLOPs"


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_imagenet_variant_compiles_and_steps_at_depth_1(variant):
  # Real width, one block, one group of 4. No latent data exists yet: the AOT-compiled update_fn runs
  # on random batches of the latents' shape (N(0, 0.5^2) like normalised latents, random classes).
  c = imagenet(variant, depth=1)
  c.batch_size = 4
  step = aot.compile_update_fn(c)
  assert step.memory["arguments"] > 0 and step.memory["total"] >= step.memory["arguments"]
  assert step.memory["aliased"] > 0  # the state is donated
  # A training step costs ~4 forward passes per example (online + target forward, backward ~2x).
  assert step.flops / 4 == pytest.approx(4 * aot.forward_flops(step.model), rel=0.1)
  assert "memory per device" in aot.describe(step, c)
  state, history, _ = aot.run_steps(step, 2)
  assert int(state.step) == 2
  assert all(np.isfinite(m["loss"]) and m["loss"] > 0 for m in history)
  assert history[0]["param_norm"] != history[1]["param_norm"]
  assert min(m["t_minus_r"] for m in history) >= (1e-4 if variant.endswith("a2") else 0.0)


def test_batch_layout_is_checked_before_compiling():
  c = imagenet("XL/2")
  c.batch_size = 6
  with pytest.raises(ValueError, match=r"multiple of devices \(1\) x config.imm.group_size \(4\)"):
    aot.compile_update_fn(c, devices=jax.devices()[:1])


@pytest.mark.slow
def test_cifar10_compiles_at_small_depth():
  c = load_config("cifar10")
  c.batch_size = 8
  c.model.num_blocks = 1
  step = aot.compile_update_fn(c)
  assert step.model.input_shape == (32, 32, 3) and step.memory["aliased"] > 0  # the state is donated
  # ~4 forward passes per example (online + target forward, backward ~2x), plus the augmentation.
  assert step.flops / 8 == pytest.approx(4 * aot.forward_flops(step.model), rel=0.1)


@pytest.mark.slow
def test_dit_s2_compiles_at_the_real_batch_with_accumulation():
  c = imagenet("S/2")
  c.grad_accum_steps = 8  # 4096 = 8 micro-batches of 512
  step = aot.compile_update_fn(c)
  assert step.batch_size == 4096 and step.num_params > 33e6
  # 2 forward passes + a backward ~ 4 forwards of 2 x 6.06 GFLOP per example: the accumulation loop,
  # which XLA's cost analysis counts once, is counted 8 times.
  assert step.flops / 4096 / 2e9 == pytest.approx(4 * 6.1, rel=0.05)
  assert step.memory["temporaries"] > 2**30


def test_cli_compiles_for_8_fake_devices_and_runs_steps():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, "-m", "imm_jax.aot", "--config", "configs/imagenet256.py:XL/2-ts-a2", "--num_devices=8",
         "--config.batch_size=64", "--config.grad_accum_steps=2", "--config.model.depth=1",
         "--config.model.hidden_size=64", "--config.model.num_heads=2", "--config.mesh.data=4",
         "--config.mesh.fsdp=2", "--config.mesh.fsdp_min_size=1", "--steps=2"]
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout
  assert "global batch 64 (8 per device, 2 micro-batches) on 8 cpu devices, mesh data=4 x fsdp=2" in out
  # The cross-device sums, and those XLA left in the accumulation loop (XLA:CPU: all of them).
  total, in_loop = (float(re.search(r"f32 ([0-9.]+) MB", line).group(1)) for line in out.splitlines()
                    if line.startswith(("summed across devices", "  of which inside the accumulation loop, "
                                        "once per micro-batch (2 times a step): ")))
  assert 0 < in_loop <= total
  assert "memory per device: arguments" in out and "temporaries" in out and "total" in out
  assert "FLOPs per step:" in out and "step 2: loss" in out


@pytest.mark.slow
def test_guided_sampler_compiles_from_shapes_and_counts_its_flops():
  """--what sample: the benchmark's sampler compiled from shapes alone; its FLOPs per batch are XLA's count
  of one network evaluation over the conditional and null rows, once per step: the analytic DiT count
  plus XLA's elementwise work (2.2% more in this small network)."""
  config = load_config("digits", "cond")
  sampler = aot.compile_sampler(config, steps=2, cfg_scale=1.5, batch_size=16)
  analytic = benchmark.dit_forward_flops(sampler.model.net, sampler.model.input_shape)
  assert 1.0 <= sampler.flops / (2 * (2 * 16) * analytic) <= 1.04
  assert sampler.memory is not None and sampler.memory["arguments"] > 4 * sampler.num_params
  text = aot.describe(sampler, config)
  assert "sampler: 2 step(s), guidance 1.5 (conditional and null rows in one pass), batch 16 (16 per device)" in text
  assert "FLOPs per batch:" in text and "roofline" not in text  # the roofline account is for GPU targets
  samples = sampler.compiled(sampler.model.init_params(jax.random.key(0)),
                             0.5 * np.random.default_rng(0).standard_normal((16,) + sampler.model.input_shape,
                                                                            dtype=np.float32),
                             np.arange(16, dtype=np.int32) % 10)
  assert samples.shape == (16,) + sampler.model.input_shape and bool(np.isfinite(samples).all())


def test_cli_sampler_bad_batch_is_one_line():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, "-m", "imm_jax.aot", "--config", "configs/digits.py", "--what", "sample",
         "--num_devices=2", "--batch_size=3"]
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      "error: --batch_size=3 does not split over 2 devices: give a multiple"]
