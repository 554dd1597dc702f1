"""The paper's CIFAR-10 run (Table 5): DDPM++ (SongUNet, 55.7M), OT-FM + simple-EDM, `identity` (s)
second time input, k = 15, a = 1, b = 5, RAdam 1e-4, dropout 0.2, x-flip, batch 4096 with M = 4,
EMA 0.9999, 400K steps; sampled with 2-step pushforward through eta = 1.4 (FID 1.98 in the paper).

  python -m imm_jax.train --config configs/cifar10.py --workdir workdirs/cifar10

Data: TFDS `cifar10` through tfds.data_source (prepare it once; the error message says how).
Augmentation: EDM's CIFAR-10 recipe (imm_jax/augment.py): each geometric transform with probability
0.12, a labelled x-flip on every image, and the 9 augmentation labels given to the network
(model.augment_dim=9), which samples at labels zero. Whether IMM fed the labels to its network is
UNCONFIRMED: the released CIFAR-10 network has no augmentation input. `--config.model.augment_dim=0`
trains that network's exact shape (the transforms are then not conditioned on and can show in
samples); `--config.augment.p=0 --config.augment.xflip=False` turns the augmentation off.
"""

import ml_collections

from imm_jax.config_base import base_config


def get_config(arg: str = ""):
  c = base_config()
  c.num_steps = 400_000
  c.batch_size = 4096
  c.log_every = 100
  c.sample_every = 10_000
  c.checkpoint.update(every=10_000, keep=3, keep_period=50_000)
  c.data.update(name="tfds", tfds_name="cifar10", split="train", eval_split="test", image_size=32,
                x_flip=True, worker_count=8, prefetch_buffer=4)
  c.model = ml_collections.ConfigDict(dict(
      name="unet", class_conditional=False, dtype="float32", model_channels=128, channel_mult=(2, 2, 2),
      num_blocks=4, attn_resolutions=(16,), dropout=0.2, embedding_type="positional",
      channel_mult_noise=1, resample_filter=(1, 1), s_embed=True, remat="none", augment_dim=9))
  # EDM's augmentation settings (spec: "x-flip; EDM augment: True; True"). Its labelled x-flip comes on
  # top of data.x_flip's unlabelled one, as when EDM's trainer runs with both.
  c.augment.update(p=0.12, xflip=True)
  c.precond.update(interpolant="ot_fm", f_type="simple_edm", temb_type="identity")
  c.imm.update(group_size=4, eps=0.006, T=0.994, k=15, weight_a=1.0, weight_b=5.0)
  c.optim.update(name="radam", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
  c.ema.update(decay=0.9999, warmup=False)
  c.sample.update(num=64, steps=(1, 2, 4))
  c.eval.update(num=0)
  if arg:
    raise ValueError(f"configs/cifar10.py takes no variant, got {arg!r}")
  return c
