"""Moment-matching distillation (Salimans et al. 2024; imm_jax/objectives/moment_matching.py) of a
flow-matching teacher trained with configs/flow_matching.py on the same data.

  python -m imm_jax.train --config configs/flow_matching.py:digits --workdir workdirs/fm_digits
  python -m imm_jax.train --config configs/mm_distill.py:digits-alt --workdir workdirs/mm_digits_alt_k8 \\
      --config.teacher.workdir=workdirs/fm_digits --config.moment_matching.k=8

Variants ``DATA-VERSION``: DATA is a configs/flow_matching.py variant (digits, digits-cond,
toy2d-checkerboard, toy2d-8gaussians, toy2d-moons) whose network the student and auxiliary share with
the teacher, VERSION is ``alt`` (Algorithm 2, auxiliary denoiser) or ``param`` (Algorithm 3,
parameter-space JVP with the teacher's Adam preconditioner). One run distils one step count k
(``moment_matching.k``, default 8). The paper's optimizer: Adam (b1 = 0, b2 = 0.99, eps = 1e-12), linear
warmup and linear decay to 0, gradient clipping at 1, no EMA; the weight w(s) is EDM's, except for
k <= 2, which use the flat w = 1 (``moment_matching.weight='auto'``). Samples: the k-step ancestral
sampler (Alg. 1) on a uniform grid from 1 to 0.
"""

from imm_jax.configs_loader import load_config

VERSIONS = {"alt": "alternating", "param": "parameter"}


def get_config(arg: str = "digits-alt"):
  data, _, version = arg.rpartition("-")
  if version not in VERSIONS or not data:
    raise ValueError(f"unknown variant {arg!r} for configs/mm_distill.py: use DATA-VERSION with VERSION in "
                     f"{tuple(VERSIONS)} (e.g. digits-alt, toy2d-checkerboard-param)")
  c = load_config("flow_matching", data)
  c.objective = "moment_matching"
  c.moment_matching.update(variant=VERSIONS[version], k=8, s_min=0.0, weight="auto", posterior="conditional",
                           aux_teacher_reg=True, preconditioner="adam", teacher_cfg_scale=1.0)
  c.teacher.workdir = ""
  toy = data.startswith("toy2d")
  c.num_steps = 2000 if toy else 1000
  c.optim.update(name="adam", lr=1e-4, b1=0.0, b2=0.99, eps=1e-12, weight_decay=0.0,
                 warmup_steps=100, schedule="linear", grad_clip=1.0)
  c.ema.update(decay=0.0, warmup=False)
  c.sample.update(sampler="ancestral", schedule="uniform", steps=(1, 2, 4, 8), cfg_scale=1.0)
  c.eval.steps = (1, 2, 4, 8)
  return c
