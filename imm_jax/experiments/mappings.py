"""How the mappings r(s, t) of config.imm.mapping spread their step over t (docs/ablations.md).

  python -m imm_jax.experiments.mappings --mappings eta:12,t:6,logsnr:6,inv_eta:12 --eps 0.001

Prints, for each mapping at its k, the step delta, the fraction of triples whose target is the data
(r = s, the base case), the mean gap t - r and its mean over three bands of t, from a million draws of
the training's (s, r, t) (OT-FM); and writes `<out>/mappings.png`: the step t - r(0, t) against t (log
scale), the gap a triple gets before r is clamped at s.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from imm_jax.io_utils import fail

FLAGS = flags.FLAGS
BANDS = ((0.0, 0.1), (0.45, 0.55), (0.9, 1.0))


def define_flags():
  flags.DEFINE_list("mappings", ["eta:12", "t:6", "logsnr:6", "inv_eta:12"], "MAPPING:K pairs to compare.")
  flags.DEFINE_float("eps", 0.001, "config.imm.eps (t ~ U(eps, T)).")
  flags.DEFINE_float("T", 0.994, "config.imm.T.")
  flags.DEFINE_integer("draws", 1_000_000, "Draws of (s, r, t) behind the table.")
  flags.DEFINE_string("out", "docs/results", "Folder for mappings.png.")


def gap_statistics(cfg, interpolant, draws: int = 1_000_000, seed: int = 0) -> dict:
  """delta, P(r = s), mean t - r overall and per band of t (BANDS), over draws of sample_times."""
  import jax

  from imm_jax.objectives.imm import mapping_delta, sample_times

  s, r, t = (np.asarray(v, np.float64) for v in sample_times(jax.random.key(seed), draws, cfg, interpolant))
  gap = t - r
  bands = [float(np.mean(gap[(t >= lo) & (t < hi)])) for lo, hi in BANDS]
  return {"delta": mapping_delta(cfg, interpolant), "base_case_frac": float(np.mean(r == s)),
          "mean_gap": float(np.mean(gap)), "band_gaps": bands}


def step_curve(cfg, interpolant, num: int = 60) -> dict:
  """{t: t - r(0, t)} at evenly spaced t in [eps, T]: the mapping's step before the clamp at s."""
  import jax.numpy as jnp

  from imm_jax.objectives.imm import mapped_r

  t = np.linspace(cfg.eps, cfg.T, num).astype(np.float32)
  r = np.asarray(mapped_r(jnp.zeros_like(t), jnp.asarray(t), cfg, interpolant), np.float64)
  return dict(zip(t.astype(np.float64).tolist(), (t - r).tolist()))


def main(argv):
  del argv
  from imm_jax import images as images_lib
  from imm_jax.interpolants import Interpolant
  from imm_jax.objectives.imm import IMMConfig

  ip = Interpolant("ot_fm")
  try:
    cfgs = []
    for item in FLAGS.mappings:
      mapping, _, k = item.partition(":")
      cfgs.append(IMMConfig(eps=FLAGS.eps, T=FLAGS.T, k=int(k), mapping=mapping))
  except ValueError as e:
    fail(f"--mappings/--eps/--T: {e.args[0]} (give MAPPING:K pairs, e.g. eta:12,t:6)")
  print("| mapping | k | delta | P(r = s) | mean t - r | " + " | ".join(f"mean t - r, t in [{lo}, {hi})" for lo, hi in BANDS) + " |")
  print("|---|---|---|---|---|" + "---|" * len(BANDS))
  series = {}
  for cfg in cfgs:
    st = gap_statistics(cfg, ip, FLAGS.draws)
    print(f"| {cfg.mapping} | {cfg.k} | {st['delta']:.4g} | {st['base_case_frac']:.3f} | {st['mean_gap']:.4f} | "
          + " | ".join(f"{v:.2g}" for v in st["band_gaps"]) + " |")
    series[f"{cfg.mapping}, k = {cfg.k}"] = step_curve(cfg, ip)
  chart = images_lib.line_chart(series, title="step t - r(0, t) against t (OT-FM, y: log scale)",
                                size=(640, 420))
  path = images_lib.save_png(os.path.join(FLAGS.out, "mappings.png"), chart)
  print(f"wrote {path}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
