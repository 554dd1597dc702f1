"""The paper's particle-count claim: at equal compute, M = 1 is worse than M = 4 (Fig. 5).

  python -m imm_jax.experiments.group_size --config toy2d --variant 8gaussians --num_steps 1000 \
      --ks 4,6 --seeds 0,1,2 --group_sizes 1,4 --tag 8g_k4_k6
  python -m imm_jax.experiments.group_size --config toy2d --variant checkerboard --out docs/results
  python -m imm_jax.experiments.group_size --config digits --num_steps 1500 --out docs/results
  python -m imm_jax.experiments.group_size --config toy2d --variant checkerboard --ks 12,18 \
      --group_sizes 1,2,4,8 --seeds 0,1 --set optim.lr=3e-3 --tag lr3e-3

Trains IMM with the same global batch B and number of steps for each M (so B / M groups with M
particles each: the same network evaluations per step), then reports the energy distance of 1, 2 and
4-step samples to fresh true samples, next to the energy distance between two independent true sets
of the same size (the floor set by finite samples). The first command shows the claim on the toy
(M = 1 collapses at large gaps; at the configs' k = 12 the two are level; docs/group_size.md).
``--ks`` repeats the comparison for several gap sizes k of the eta-decrement mapping (spec section
3.2; larger k = smaller t - r), ``--seeds`` for several seeds, and ``--set key=value`` changes any
other config value for every run. A run whose
training metrics become non-finite is reported as diverged (NaN) rather than stopping the sweep.
This is ``imm_jax.experiments.sweep`` over imm.k and imm.group_size: each run trains in
`<workdir>/<config>_<variant>_<steps>steps[_<overrides>]_k<k>_M<M>_s<seed>`, a finished run found there
is only re-evaluated, and it writes `<out>/group_size_<name>.json`, the final 1-step samples of each run
(one row per k and seed, one column per M: `<out>/group_size_<name>.png`) and prints a Markdown table.
"""

from __future__ import annotations

from absl import app, flags
from absl import logging as absl_logging

from imm_jax.configs_loader import load_config
from imm_jax.experiments import sweep
from imm_jax.io_utils import fail

FLAGS = flags.FLAGS


def define_flags():
  sweep.define_common_flags()
  flags.DEFINE_list("group_sizes", ["1", "4"], "Values of M to compare.")
  flags.DEFINE_list("ks", [], "Gap exponents k (config.imm.k) to sweep; empty = the config's own k.")
  flags.DEFINE_string("workdir", "workdirs/group_size", "Parent folder of the training workdirs.")


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  try:
    ks = [int(k) for k in FLAGS.ks] or [int(sweep.apply_overrides(
        load_config(FLAGS.config, FLAGS.variant), sweep.parse_overrides(FLAGS.set)).imm.k)]
    grid = [(("imm.k",), [(k,) for k in ks]), (("imm.group_size",), [(int(m),) for m in FLAGS.group_sizes])]
  except (KeyError, ValueError) as e:
    fail(f"--set/--ks/--group_sizes: {e.args[0]}")
  sweep.run_and_report("group_size", grid, FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
