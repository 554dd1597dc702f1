"""IMM against a flow-matching baseline and moment-matching distillation, at equal sampling steps.

  python -m imm_jax.experiments.compare --datasets digits,checkerboard --out docs --workdir workdirs/compare

For each dataset (the built-in ``digits``, or a toy2d name) this trains, through the one trainer:
  * flow matching (configs/flow_matching.py), sampled with Euler and Heun at 1/2/4/8/32/100 steps and,
    as the undistilled baseline of the distillation rows, with the ancestral sampler at 1/2/4/8 steps;
  * IMM (configs/digits.py or configs/toy2d.py), pushforward at 1/2/4/8 steps;
  * moment-matching distillation of that flow-matching model (configs/mm_distill.py), both versions,
    one run per k in 1/2/4/8, each sampled with its k-step ancestral sampler;
and scores every sample set with one metric: the energy distance to held-out data (evaluation/distances;
lower is better), next to the distance between a training subset and the held-out set (the floor set by
finite samples). Training compute is steps x batch x network passes per example (a backward pass
counting two; objectives' ``passes_per_example``); a distilled model's total includes its teacher's.

Writes ``<out>/results/compare_<dataset>.json``, then, from every such file in ``<out>/results`` (so
datasets run with different budgets in separate invocations share one page), ``<out>/results/compare.png``
(energy distance against steps, one panel per dataset, drawn with numpy + PIL) and the tables into
``<out>/results.md`` between ``<!-- compare:begin -->`` and ``<!-- compare:end -->`` (other content of the
page is kept). Existing workdirs are resumed, finished ones only re-evaluated.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from imm_jax.io_utils import atomic_open, fail

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags, defined only when run as a program: importing this module as a library
  (tests, other tools) must not define flags that clash with other executables' (--workdir, --out)."""
  flags.DEFINE_list("datasets", ["digits", "checkerboard"], "digits and/or toy2d names (checkerboard, 8gaussians, moons).")
  flags.DEFINE_list("ks", ["1", "2", "4", "8"], "Step counts to distil (one run per k and version).")
  flags.DEFINE_integer("train_steps", 0, "Training steps of flow matching and IMM (0: the config's).")
  flags.DEFINE_integer("distill_steps", 0, "Training steps of each distillation run (0: the config's).")
  flags.DEFINE_integer("batch_size", 0, "Global batch of every run (0: the config's).")
  flags.DEFINE_list("model", [], "Overrides of config.model for every run, e.g. hidden=128 (toy MLP) or "
                    "hidden_size=64,depth=2 (digits DiT).")
  flags.DEFINE_float("distill_lr", 0.0, "Learning rate of the distillation runs (0: the config's).")
  flags.DEFINE_integer("eval_num", 0, "Samples per evaluation, and held-out examples they are compared with "
                       "(0: the config's eval.samples and eval.num).")
  flags.DEFINE_integer("seed", 0, "Seed of every run.")
  flags.DEFINE_string("out", "docs", "Folder of results.md; JSON and PNG go to <out>/results.")
  flags.DEFINE_string("workdir", "workdirs/compare", "Parent folder of the training workdirs.")


FM_STEPS = (1, 2, 4, 8, 32, 100)
FEW_STEPS = (1, 2, 4, 8)
BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"


def _configs(dataset: str):
  """(flow-matching variant, IMM config (name, arg), mm_distill data prefix) for a dataset name."""
  from imm_jax.data import TOY_NAMES

  if dataset == "digits":
    return "digits", ("digits", ""), "digits"
  if dataset in TOY_NAMES:
    return f"toy2d-{dataset}", ("toy2d", dataset), f"toy2d-{dataset}"
  raise ValueError(f"--datasets: unknown dataset {dataset!r}: use digits or one of {TOY_NAMES}")


def _adjust(c, opts: dict, *, distill: bool):
  steps = opts["distill_steps"] if distill else opts["train_steps"]
  if steps:
    c.num_steps = steps
  if opts["batch_size"]:
    c.batch_size = opts["batch_size"]
  for item in opts["model"]:
    key, _, value = item.partition("=")
    if key not in c.model:
      raise ValueError(f"--model={item}: config.model has no field {key!r} (fields: {sorted(c.model)})")
    c.model[key] = type(c.model[key])(value)
  if distill and opts["distill_lr"]:
    c.optim.lr = opts["distill_lr"]
  c.seed = opts["seed"]
  c.sample_every = c.num_steps
  c.checkpoint.every = c.num_steps
  c.sample.steps = (max(FEW_STEPS),) if not distill else (int(c.moment_matching.k),)
  c.eval.update(num=0, at_start=False)
  return c


def _train(c, workdir: str) -> float:
  from imm_jax.trainer import train_and_evaluate

  t0 = time.perf_counter()
  train_and_evaluate(c, workdir)
  return time.perf_counter() - t0


def _evaluate(c, workdir: str, eval_x, num: int, samplers_steps) -> dict:
  """{'SAMPLER': {steps: energy distance}} of ``num`` samples from the EMA parameters of ``workdir``."""
  from imm_jax import checkpoints
  from imm_jax.builder import build_model
  from imm_jax.trainer import sample_quality

  model = build_model(c)
  params, _ = checkpoints.restore_ema_params(workdir, model.abstract_params())
  out = {}
  for sampler, steps in samplers_steps:
    cfg = c.copy_and_resolve_references()
    cfg.sample.sampler = sampler
    cfg.sample.schedule = "uniform" if sampler != "pushforward" else cfg.sample.schedule
    cfg.eval.samples = num
    figures = sample_quality(model, params, cfg, eval_x, steps)
    out[sampler] = {int(k): float(figures[f"energy_{k}step"]) for k in steps}
  return out


def _compute(c, objective_passes: float) -> float:
  return float(c.num_steps) * float(c.batch_size) * objective_passes


def run_dataset(dataset: str, opts: dict, workdir: str, ks) -> dict:
  from imm_jax import data as data_lib
  from imm_jax.configs_loader import load_config
  from imm_jax.experiments import sweep
  from imm_jax.objectives import IMM_PASSES_PER_EXAMPLE
  from imm_jax.objectives.flow_matching import PASSES_PER_EXAMPLE as FM_PASSES
  from imm_jax.objectives.moment_matching import PASSES_PER_EXAMPLE as MM_PASSES

  fm_variant, (imm_name, imm_arg), mm_prefix = _configs(dataset)
  runs = {}

  fm = _adjust(load_config("flow_matching", fm_variant), opts, distill=False)
  eval_cfg = load_config("flow_matching", fm_variant).eval
  eval_x, _ = data_lib.load_eval_set(fm.data, opts["eval_num"] or int(eval_cfg.num), seed=opts["seed"])
  n_eval = opts["eval_num"] or int(eval_cfg.samples) or len(eval_x)
  floor, n_floor = sweep.floor_draws(fm.data, eval_x, n_eval, seed=opts["seed"] + 1)

  fm_dir = os.path.join(workdir, dataset, "flow_matching")
  wall = _train(fm, fm_dir)
  fm_compute = _compute(fm, FM_PASSES)
  scores = _evaluate(fm, fm_dir, eval_x, n_eval, [("euler", FM_STEPS), ("heun", FM_STEPS), ("ancestral", FEW_STEPS)])
  runs["flow matching, Euler"] = dict(energy=scores["euler"], nfe={k: k for k in FM_STEPS},
                                      train_steps=fm.num_steps, batch=fm.batch_size, compute=fm_compute, wall_s=wall)
  runs["flow matching, Heun"] = dict(energy=scores["heun"], nfe={k: 2 * k - 1 for k in FM_STEPS},
                                     train_steps=fm.num_steps, batch=fm.batch_size, compute=fm_compute, wall_s=wall)
  runs["flow matching, ancestral (MM's sampler, undistilled)"] = dict(
      energy=scores["ancestral"], nfe={k: k for k in FEW_STEPS}, train_steps=fm.num_steps, batch=fm.batch_size,
      compute=fm_compute, wall_s=wall)

  imm = _adjust(load_config(imm_name, imm_arg), opts, distill=False)
  imm_dir = os.path.join(workdir, dataset, "imm")
  wall = _train(imm, imm_dir)
  scores = _evaluate(imm, imm_dir, eval_x, n_eval, [("pushforward", FEW_STEPS)])
  runs["IMM, pushforward"] = dict(energy=scores["pushforward"], nfe={k: k for k in FEW_STEPS},
                                  train_steps=imm.num_steps, batch=imm.batch_size,
                                  compute=_compute(imm, IMM_PASSES_PER_EXAMPLE), wall_s=wall)

  for version, label in (("alt", "alternating"), ("param", "parameter-space")):
    energy, computes, walls, steps_used = {}, [], 0.0, 0
    for k in ks:
      c = _adjust(load_config("mm_distill", f"{mm_prefix}-{version}"), opts, distill=True)
      c.teacher.workdir = fm_dir
      c.moment_matching.k = int(k)  # weight 'auto': flat for k <= 2, EDM otherwise
      c.sample.steps = (int(k),)
      mm_dir = os.path.join(workdir, dataset, f"mm_{version}_k{k}")
      walls += _train(c, mm_dir)
      energy[int(k)] = _evaluate(c, mm_dir, eval_x, n_eval, [("ancestral", (int(k),))])["ancestral"][int(k)]
      computes.append(_compute(c, MM_PASSES[c.moment_matching.variant]))
      steps_used, batch = c.num_steps, c.batch_size
    runs[f"MM distillation, {label}"] = dict(
        energy=energy, nfe={int(k): int(k) for k in ks}, train_steps=steps_used, batch=batch,
        compute=float(np.mean(computes)), compute_with_teacher=float(np.mean(computes)) + fm_compute,
        wall_s=walls / max(len(ks), 1), per_k_run=True)
  return {"dataset": dataset, "eval_num": int(n_eval), "num_reference": len(eval_x), "num_floor": n_floor,
          "floor_energy": float(np.mean(floor)), "floor_draws": floor, "runs": runs}


# -- report ----------------------------------------------------------------------------------------------------


def _fmt_compute(v: float) -> str:
  exp = int(np.floor(np.log10(v))) if v > 0 else 0
  return f"{v / 10**exp:.1f}e{exp}"


def markdown_table(results: dict) -> str:
  steps = sorted({k for r in results["runs"].values() for k in r["energy"]})
  head = "| method | " + " | ".join(f"{k} step{'s' if k > 1 else ''}" for k in steps) + \
      " | train steps x batch | training compute (passes) |"
  lines = [head, "|" + "---|" * (len(steps) + 3)]
  for name, r in results["runs"].items():
    cells = []
    for k in steps:
      v = r["energy"].get(k)
      cells.append("" if v is None else f"{v:.5f}" + (f" ({r['nfe'][k]} NFE)" if r["nfe"].get(k, k) != k else ""))
    compute = _fmt_compute(r["compute"])
    if "compute_with_teacher" in r:
      compute += f" per k (+ teacher: {_fmt_compute(r['compute_with_teacher'])})"
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['train_steps']} x {r['batch']} | {compute} |")
  return "\n".join(lines)


def _sizes_text(res: dict) -> str:
  if "num_reference" not in res:  # results written before the sample and held-out counts were told apart
    return f"{res['eval_num']} samples; train subset vs held-out: {res['floor_energy']:.5f}"
  return (f"{res['eval_num']} samples against {res['num_reference']} held-out; {res['num_floor']} distinct "
          f"training examples against the same: {res['floor_energy']:.5f}")


def write_report(all_results: list, out: str):
  os.makedirs(os.path.join(out, "results"), exist_ok=True)
  parts = [BEGIN, "## IMM vs flow matching vs moment-matching distillation", "",
           "Produced by `python -m imm_jax.experiments.compare` (the command of each dataset is given "
           "below its heading). Metric: energy distance between samples and held-out data "
           "(lower is better; the same noise for every sampler). Training compute = steps x batch x network "
           "passes per example (backward = 2 passes): IMM 4, flow matching 3, MM alternating 10, MM "
           "parameter-space 4.5; each MM row is one distillation run per k, so its compute is per run, "
           "plus the teacher's. NFE is shown where it differs from the step count (Heun).", "",
           "Notes: one seed per run; the energy distance is an unbiased estimate, so values near the floor "
           "(and the floor itself) are noisy and can be slightly negative. Flow matching is sampled from t = 1 "
           "to 0; IMM with its paper schedule (2 steps through eta = 1.4, else uniform); each distilled model "
           "with its own k-step ancestral sampler (k <= 2 distilled with the flat weight w = 1, k >= 4 with "
           "the EDM weight). The undistilled-ancestral row is the distillation's starting point.", "",
           "![energy distance against sampling steps](results/compare.png)", ""]
  for res in all_results:
    parts += [f"### {res['dataset']} ({_sizes_text(res)})", "", f"`{res.get('command', '')}`", "", markdown_table(res), ""]
  parts.append(END)
  block = "\n".join(parts)
  path = os.path.join(out, "results.md")
  text = open(path).read() if os.path.exists(path) else "# Results\n"
  if BEGIN in text and END in text:
    text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
  else:
    text = text.rstrip("\n") + "\n\n" + block + "\n"
  with atomic_open(path, "w") as f:
    f.write(text)
  from imm_jax import images as images_lib

  panels = [images_lib.line_chart({name: r["energy"] for name, r in res["runs"].items()},
                                  title=f"{res['dataset']}: energy distance vs steps (x: steps, y: log scale)",
                                  x_scale="log2", floor=res["floor_energy"], floor_label="train vs held-out")
            for res in all_results]
  images_lib.save_png(os.path.join(out, "results", "compare.png"), images_lib.side_by_side(panels))


def load_results(out: str) -> list:
  """Every ``<out>/results/compare_*.json`` (digits first), step keys back to ints."""
  import glob

  results = []
  for path in sorted(glob.glob(os.path.join(out, "results", "compare_*.json")),
                     key=lambda p: (not p.endswith("compare_digits.json"), p)):
    with open(path) as f:
      res = json.load(f)
    for r in res["runs"].values():
      r["energy"] = {int(k): v for k, v in r["energy"].items()}
      r["nfe"] = {int(k): v for k, v in r["nfe"].items()}
    results.append(res)
  return results


def main(argv):
  import sys

  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  opts = dict(train_steps=FLAGS.train_steps, distill_steps=FLAGS.distill_steps, batch_size=FLAGS.batch_size,
              model=FLAGS.model, distill_lr=FLAGS.distill_lr, eval_num=FLAGS.eval_num, seed=FLAGS.seed)
  command = "python -m imm_jax.experiments.compare " + " ".join(sys.argv[1:])
  for dataset in FLAGS.datasets:  # every name is checked before anything trains
    try:
      _configs(dataset)
    except ValueError as e:
      fail(str(e))
  for dataset in FLAGS.datasets:
    res = run_dataset(dataset, opts, FLAGS.workdir, [int(k) for k in FLAGS.ks])
    res["command"] = command
    with atomic_open(os.path.join(FLAGS.out, "results", f"compare_{dataset}.json"), "w") as f:
      json.dump(res, f, indent=2)
    print(markdown_table(res), flush=True)
  write_report(load_results(FLAGS.out), FLAGS.out)


if __name__ == "__main__":
  define_flags()
  app.run(main)
