"""The default job: IMM on scikit-learn's bundled handwritten digits (1797 8x8 images, no download).

Images are upsampled to 16x16 (1 channel) and a small DiT (patch 2, 64 tokens) is trained from scratch
on a CPU in a few minutes; 1-step samples are recognisable digits. 297 digits are held out to measure
sample quality at 1, 2 and 4 steps: the energy distance of 2000 samples to them (from 297 samples the
figure would move by ~0.014 from one draw of samples to the next; from 2000 by ~0.004).

  python -m imm_jax.train --config configs/digits.py --workdir workdirs/digits
  python -m imm_jax.train --config configs/digits.py:cond ...   # class-conditional, guidance-ready
"""

import ml_collections

from imm_jax.config_base import base_config


def get_config(arg: str = ""):
  c = base_config()
  c.num_steps = 1500
  c.batch_size = 128
  c.log_every = 25
  c.sample_every = 500
  c.checkpoint.every = 500
  c.data.name = "digits"
  c.data.image_size = 16
  c.model = ml_collections.ConfigDict(dict(name="dit", patch_size=4, hidden_size=128, depth=4, num_heads=4,
                                           class_conditional=False, augment_dim=0, dtype="float32",
                                           remat="none", attention_impl=ml_collections.config_dict.placeholder(str)))
  c.precond.update(f_type="euler_fm", temb_type="identity")
  c.imm.update(group_size=4, eps=0.006, T=0.994, k=12, weight_a=1.0, weight_b=4.0)
  c.optim.update(name="adamw", lr=1e-3, warmup_steps=100, grad_clip=1.0)
  c.ema.update(decay=0.999, warmup=True)
  c.sample.num = 100
  c.eval.update(num=297, samples=2000, steps=(1, 2, 4))
  if arg == "cond":
    c.model.class_conditional = True
    c.imm.label_dropout = 0.1
    c.sample.cfg_scale = 1.5
  elif arg:
    raise ValueError(f"unknown variant {arg!r} for configs/digits.py: use '' or 'cond'")
  return c
