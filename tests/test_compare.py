"""The comparison report (imm_jax.experiments.compare): table, plot and the results page's own block.
Training is exercised by tests/test_flow_matching.py and tests/test_moment_matching.py; here the report
is built from a hand-made results dict."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from imm_jax.experiments import compare


def fake_results(dataset="checkerboard"):
  return {
      "dataset": dataset, "eval_num": 64, "floor_energy": 0.001, "command": "python -m ... --datasets x",
      "runs": {
          "flow matching, Euler": dict(energy={1: 0.3, 2: 0.05, 100: 0.0003}, nfe={1: 1, 2: 2, 100: 100},
                                       train_steps=10, batch=8, compute=240.0, wall_s=1.0),
          "flow matching, Heun": dict(energy={1: 0.3, 2: 0.01}, nfe={1: 1, 2: 3}, train_steps=10, batch=8,
                                      compute=240.0, wall_s=1.0),
          "MM distillation, alternating": dict(energy={1: 0.02, 2: 0.004}, nfe={1: 1, 2: 2}, train_steps=5,
                                               batch=8, compute=400.0, compute_with_teacher=640.0, wall_s=1.0),
      },
  }


def test_table_lists_steps_nfe_and_compute():
  table = compare.markdown_table(fake_results())
  lines = table.splitlines()
  assert lines[0] == ("| method | 1 step | 2 steps | 100 steps | train steps x batch | "
                      "training compute (passes) |")
  assert "| flow matching, Euler | 0.30000 | 0.05000 | 0.00030 | 10 x 8 | 2.4e2 |" in lines
  assert "0.01000 (3 NFE)" in table                      # Heun's NFE differ from its steps
  assert "4.0e2 per k (+ teacher: 6.4e2)" in table


def test_report_keeps_the_rest_of_the_page(tmp_path):
  out = str(tmp_path)
  os.makedirs(os.path.join(out, "results"))
  for name in ("checkerboard", "digits"):
    with open(os.path.join(out, "results", f"compare_{name}.json"), "w") as f:
      json.dump(fake_results(name), f)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("# Results\n\nother section\n")
  loaded = compare.load_results(out)
  assert [r["dataset"] for r in loaded] == ["digits", "checkerboard"]
  assert loaded[0]["runs"]["flow matching, Heun"]["nfe"] == {1: 1, 2: 3}
  compare.write_report(loaded, out)
  compare.write_report(loaded, out)                      # replaces its own block, once
  text = open(os.path.join(out, "results.md")).read()
  assert text.startswith("# Results\n\nother section\n")
  assert text.count(compare.BEGIN) == 1 and text.count("### digits") == 1
  assert "### digits (64 samples; train subset vs held-out: 0.00100)" in text  # results of before the counts
  loaded[0].update(eval_num=2000, num_reference=297, num_floor=1500)
  compare.write_report(loaded, out)
  text = open(os.path.join(out, "results.md")).read()
  assert ("### digits (2000 samples against 297 held-out; 1500 distinct training examples against the same: "
          "0.00100)") in text
  from PIL import Image

  png = np.asarray(Image.open(os.path.join(out, "results", "compare.png")))
  assert png.ndim == 3 and png.shape[1] > 1000 and png.std() > 10   # two panels with something drawn


def test_an_unknown_dataset_stops_in_one_line_before_any_training(tmp_path):
  r = subprocess.run([sys.executable, "-m", "imm_jax.experiments.compare", "--datasets", "moons,nope",
                      f"--workdir={tmp_path / 'w'}", f"--out={tmp_path / 'o'}"], capture_output=True, text=True,
                     timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      "error: --datasets: unknown dataset 'nope': use digits or one of ('checkerboard', '8gaussians', 'moons')"]
  assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()

