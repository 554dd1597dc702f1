"""The paper's ImageNet-256 runs (Table 5) on 32x32x4 SD-VAE latents: DiT with patch 2, OT-FM + Euler-FM,
k = 12, p(t) = U(0, 0.994), a = 1, b = 4, AdamW 1e-4, label dropout 0.1 (class-conditional, 1000 classes),
batch 4096 with M = 4, EMA 0.9999, 1.2M steps; sampled with 8-step uniform pushforward and guidance 1.5.

Variants (``--config configs/imagenet256.py:VARIANT``; 8-step FID at w = 1.5 in the paper):

  S/2          33M params,   6.06 GFLOPs   FID 20.36     second time input s (temb_type 'identity')
  B/2         130M params,  23.01 GFLOPs   FID  9.69
  L/2         458M params,  80.71 GFLOPs   FID  2.80
  XL/2        675M params, 118.64 GFLOPs   FID  2.13
  XL/2-ts-a2  the best run (FID 1.99, the default): second time input t - s (temb_type 'stride'),
              a = 2, and r <= t - 1e-4 (min_gap), which keeps t - r representable in fp16 (App. I.6)

Precision: float32 (the paper's TF32 on GPUs). The best run was trained in FP16 (Table 8); the
network's compute dtype is ``--config.model.dtype`` (no loss scaling is implemented). On H100s use
``--config.model.dtype=bfloat16 --config.model.attention_impl=cudnn``; ``--config.model.remat=block``
(or a ``grad_accum_steps`` > 1) when a device's share of the batch does not fit; the paper's batch on
8 x 80 GB GPUs: ``--config.grad_accum_steps=8``, 8 x 64 per GPU in 40 GiB (docs/benchmarks.md).

Data: SD-VAE latents pre-encoded by ``python -m imm_jax.encode`` (imm_jax.data.latents); set
``--config.data.path`` to its ``--out`` folder. Each step draws z = mean + std * N(0, 1) per example and
normalises it per channel with the paper's statistics below, times 0.5. With no path, training stops at
once with an error naming config.data.path. Ahead-of-time compilation (per-device memory and FLOPs, a few
steps on random batches) needs no data: it takes the shapes from config.data.image_size / channels and
config.model.num_classes::

  python -m imm_jax.aot --config configs/imagenet256.py:XL/2 --num_devices 8
"""

import ml_collections

from imm_jax.config_base import base_config
from imm_jax.models.dit import DIT_PRESETS

VARIANTS = ("S/2", "B/2", "L/2", "XL/2", "XL/2-ts-a2")

# SD-VAE latent statistics (spec section 1): x = (z - mean) / std * 0.5, so each channel has std ~0.5.
LATENT_MEAN = (0.86488, -0.27787343, 0.21616915, 0.3738409)
LATENT_STD = (4.85503674, 5.31922414, 3.93725398, 3.9870003)


def get_config(arg: str = "XL/2-ts-a2"):
  variant = arg or "XL/2-ts-a2"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r} for configs/imagenet256.py: choose one of {', '.join(VARIANTS)}")
  best = variant == "XL/2-ts-a2"
  c = base_config()
  c.num_steps = 1_200_000
  c.batch_size = 4096
  c.log_every = 100
  c.sample_every = 10_000
  c.checkpoint.update(every=10_000, keep=3, keep_period=100_000)
  c.data.update(name="latents", path="", image_size=32, x_flip=False, worker_count=8, prefetch_buffer=4)
  c.data.channels = 4  # channels and num_classes: for tools that read no data (imm_jax.aot)
  c.data.num_classes = 1000
  c.data.latent_mean = LATENT_MEAN
  c.data.latent_std = LATENT_STD
  c.data.latent_scale = 0.5
  # The preset's fields spelled out (patch_size, hidden_size, depth, num_heads), so each can be overridden.
  c.model = ml_collections.ConfigDict(dict(name="dit", **DIT_PRESETS[variant.split("-")[0]],
                                           class_conditional=True, num_classes=1000, augment_dim=0,
                                           dtype="float32", remat="none",
                                           attention_impl=ml_collections.config_dict.placeholder(str)))
  c.precond.update(interpolant="ot_fm", f_type="euler_fm", temb_type="stride" if best else "identity",
                   sigma_d=0.5, time_scale=1000.0)
  c.imm.update(group_size=4, eps=0.0, T=0.994, k=12, eta_max=160.0, eta_min=0.0,
               min_gap=1e-4 if best else 0.0, kernel="laplace", weight_a=2.0 if best else 1.0, weight_b=4.0,
               label_dropout=0.1)
  c.optim.update(name="adamw", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0,
                 schedule="constant", grad_clip=0.0)
  c.ema.update(decay=0.9999, warmup=False)
  c.sample.update(num=64, steps=(8,), schedule="uniform", cfg_scale=1.5, sampler="pushforward")
  c.eval.update(num=0)
  return c
