"""The authors' three released IMM checkpoints as imm_jax configs (sampling; see
docs/released_checkpoints.md). ``get_config(name)`` is what ``python -m imm_jax.convert --name NAME``
writes into the workdir's config.json:

* ``cifar10``: DDPM++ (SongUNet, 128 channels, mult [2,2,2], 4 blocks, attention at 16, 55.7M),
  OT-FM + simple_edm, second time input s (``identity``), eps 0.006, T 0.994, unconditional; sampled
  with 1 step or 2 steps through eta = 1.4 (schedule 'default').
* ``imagenet256_ts_a2``: DiT-XL/2 on 32x32x4 SD-VAE latents, 1000 classes, euler_fm, second time
  input t - s (``stride``), eps 0, T 0.994; sampled with 1/2/4/8 uniform steps and guidance 1.5.
* ``imagenet256_s_a1``: the same with second time input s (``identity``).

There is no dataset behind these configs (``data.name='none'`` with the example shape), so they
sample converted checkpoints; training them needs a data section (ImageNet latents are not provided).

  python -m imm_jax.convert --name imagenet256_ts_a2 --out workdirs/in256_ts_a2
  python -m imm_jax.sample --workdir workdirs/in256_ts_a2 --steps 4 --num 16 --out s.npz
"""

from imm_jax.convert.released import NAMES, released_config


def get_config(arg: str = "cifar10"):
  if arg not in NAMES:
    raise ValueError(f"configs/released.py takes one of {NAMES}, got {arg!r}")
  return released_config(arg)
