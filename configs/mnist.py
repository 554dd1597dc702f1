"""Class-conditional IMM on MNIST (TFDS `mnist`, 28x28x1): DiT-S/4 (49 tokens), Euler-FM, k = 12,
label dropout 0.1 and guidance 1.5 as in the paper's ImageNet setup. A real-data run for one GPU.

  python -m imm_jax.train --config configs/mnist.py --workdir workdirs/mnist
"""

from imm_jax.config_base import base_config


def get_config(arg: str = ""):
  c = base_config()
  c.num_steps = 50_000
  c.batch_size = 512
  c.log_every = 100
  c.sample_every = 5_000
  c.checkpoint.update(every=5_000, keep=3)
  c.data.update(name="tfds", tfds_name="mnist", split="train", eval_split="test", image_size=28,
                x_flip=False, worker_count=4)
  c.data.channels = 1  # channels and num_classes: for tools that read no data (imm_jax.aot)
  c.data.num_classes = 10
  c.model.update(name="dit", preset="S/4", class_conditional=True)
  c.precond.update(interpolant="ot_fm", f_type="euler_fm", temb_type="identity")
  c.imm.update(group_size=4, eps=0.0, T=0.994, k=12, weight_a=1.0, weight_b=4.0, label_dropout=0.1)
  c.optim.update(name="adamw", lr=2e-4, warmup_steps=1000, grad_clip=1.0)
  c.ema.update(decay=0.9995, warmup=True)
  c.sample.update(num=100, steps=(1, 2, 4), cfg_scale=1.5)
  c.eval.update(num=2000, steps=(1, 2, 4), every=10_000)
  if arg:
    raise ValueError(f"configs/mnist.py takes no variant, got {arg!r}")
  return c
