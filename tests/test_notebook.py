"""notebooks/sample_imm.ipynb runs top to bottom (headless) on a checkpoint trained in the test."""

import os

import pytest

from imm_jax.trainer import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sample_notebook_executes(tmp_path, tiny_digits, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  workdir = str(tmp_path / "run")
  train_and_evaluate(tiny_digits(3), workdir)
  monkeypatch.setenv("IMM_WORKDIR", workdir)
  nb = nbformat.read(os.path.join(REPO, "notebooks", "sample_imm.ipynb"), as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  for steps in (1, 2, 4, 8):
    assert os.path.exists(os.path.join(workdir, "notebook_samples", f"samples_{steps}step.png"))
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert any("image/png" in o.get("data", {}) for o in outputs), "the grid was not displayed"
