"""Flow matching (OT-FM velocity regression) on the networks of the IMM configs: the many-step baseline
and the teacher for moment-matching distillation (configs/mm_distill.py).

  python -m imm_jax.train --config configs/flow_matching.py:digits --workdir workdirs/fm_digits
  python -m imm_jax.train --config configs/flow_matching.py:toy2d-checkerboard --workdir workdirs/fm_checker

Variants: ``digits`` (default), ``digits-cond`` (class-conditional, label dropout 0.1) and ``toy2d-NAME``
for NAME in checkerboard, 8gaussians, moons. Each keeps the data, network, preconditioning (euler_fm,
so G is a velocity / sigma_d), optimizer, batch and step count of the IMM config it starts from, so the
two objectives are compared at equal training steps. Samples: Euler (``sample.sampler='heun'`` for
Heun) on a uniform grid from t = 1 to 0; sample quality at 1, 2, 4, 8, 32 and 100 steps after
training (not of the untrained network: on digits its 147 network passes over 2000 samples take ~2.5
minutes on a 2-core CPU).
"""

from imm_jax.configs_loader import load_config

TOYS = ("checkerboard", "8gaussians", "moons")
VARIANTS = ("digits", "digits-cond") + tuple(f"toy2d-{t}" for t in TOYS)


def get_config(arg: str = "digits"):
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r} for configs/flow_matching.py: choose one of {VARIANTS}")
  if arg.startswith("toy2d-"):
    c = load_config("toy2d", arg[len("toy2d-"):])
  else:
    c = load_config("digits", "cond" if arg == "digits-cond" else "")
  c.objective = "flow_matching"
  c.flow_matching.update(eps=0.0, T=1.0, prediction="velocity",
                         label_dropout=0.1 if arg == "digits-cond" else 0.0)
  c.sample.update(sampler="euler", schedule="uniform", steps=(1, 8, 100))
  c.eval.update(steps=(1, 2, 4, 8, 32, 100), at_start=False)
  return c
