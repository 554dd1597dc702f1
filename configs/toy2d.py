"""IMM on 2-D toy distributions generated in code: checkerboard (default), 8gaussians, moons.

  python -m imm_jax.train --config configs/toy2d.py:moons --workdir workdirs/moons

A residual MLP with sinusoidal time embeddings; the sample 'grids' are scatter plots of 1, 2 and 4-step
samples over the true distribution (grey). Sample quality is the energy distance to fresh true
samples; compare it with the distance between two independent true sets (docs/results.md).
"""

import ml_collections

from imm_jax.config_base import base_config

TOYS = ("checkerboard", "8gaussians", "moons")


def get_config(arg: str = ""):
  toy = arg or "checkerboard"
  if toy not in TOYS:
    raise ValueError(f"unknown toy {toy!r} for configs/toy2d.py: choose one of {TOYS}")
  c = base_config()
  c.num_steps = 4000
  c.batch_size = 1024
  c.log_every = 100
  c.sample_every = 2000
  c.checkpoint.every = 2000
  c.data.update(name="toy2d", toy=toy, holdout=4096)
  c.model = ml_collections.ConfigDict(dict(name="mlp", hidden=256, depth=4, class_conditional=False,
                                           dtype="float32"))
  c.precond.update(f_type="euler_fm", temb_type="identity")
  # Low-dimensional data: eps = 0 like the latent runs, k = 12 (ImageNet's gap).
  c.imm.update(group_size=4, eps=0.0, T=0.994, k=12, weight_a=1.0, weight_b=4.0)
  c.optim.update(name="adamw", lr=1e-3, warmup_steps=200, grad_clip=1.0)
  c.ema.update(decay=0.999, warmup=True)
  c.sample.num = 2048
  c.eval.update(num=4096, steps=(1, 2, 4))
  return c
