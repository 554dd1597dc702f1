"""notebooks/sample_imm.ipynb runs top to bottom (headless): on a checkpoint trained in the test, and on
an empty workdir, which the notebook trains itself."""

import json
import os

import pytest

from imm_jax.trainer import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _execute(tmp_path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(os.path.join(REPO, "notebooks", "sample_imm.ipynb"), as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _pictures(outputs) -> int:
  return sum("image/png" in o.get("data", {}) for o in outputs)


def test_sample_notebook_executes(tmp_path, tiny_digits, monkeypatch):
  workdir = str(tmp_path / "run")
  train_and_evaluate(tiny_digits(3), workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    config_before = json.load(f)
  monkeypatch.setenv("IMM_WORKDIR", workdir)
  outputs = _execute(tmp_path)
  for steps in (1, 2, 4, 8):
    assert os.path.exists(os.path.join(workdir, "notebook_samples", f"samples_{steps}step.png"))
  assert _pictures(outputs) == 2, "the loss curve and the grid were not both displayed"
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f) == config_before  # a workdir with a checkpoint is not trained again


@pytest.mark.slow
def test_notebook_trains_an_empty_workdir(tmp_path, monkeypatch):
  from imm_jax import checkpoints
  workdir = str(tmp_path / "new")
  monkeypatch.setenv("IMM_WORKDIR", workdir)
  monkeypatch.setenv("IMM_TRAIN_STEPS", "60")  # logged at steps 50 and 60: a curve
  # 60 steps and the evaluations of the default config run long enough that XLA's backend optimisation
  # (off in the suite, conftest.py) pays for itself.
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")
  outputs = _execute(tmp_path)
  assert checkpoints.saved_steps(workdir) == [60]
  assert checkpoints.read_config(workdir).data.name == "digits"
  assert os.path.exists(os.path.join(workdir, "notebook_samples", "samples_8step.png"))
  assert _pictures(outputs) == 2
