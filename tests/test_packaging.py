"""The install the README promises: pyproject's requirements resolve on every supported Python, and CI runs
the README's test command."""

import pathlib
import re
import tomllib

from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _requirements():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  reqs = [Requirement(r) for r in project["dependencies"]]
  for extra in project["optional-dependencies"].values():
    reqs += [Requirement(r) for r in extra]
  return reqs


def test_every_jax_requirement_carries_the_same_bounded_range():
  """`jax[cuda13]` / `jax[tpu]` without jax's range let pip walk back to 2021 jax releases on Python 3.12
  (when the newest jax's libtpu was not on the index) and stop on their URL dependencies."""
  jax_reqs = [r for r in _requirements() if r.name == "jax"]
  assert {frozenset(r.extras) for r in jax_reqs} >= {frozenset(), frozenset({"cuda13"}), frozenset({"tpu"})}
  ranges = {str(r.specifier) for r in jax_reqs}
  assert len(ranges) == 1, f"jax's requirements differ in range: {sorted(ranges)}"
  spec = jax_reqs[0].specifier
  assert any(s.operator in (">=", ">") for s in spec) and any(s.operator in ("<", "<=") for s in spec)
  # The versions these sessions checked: jax 0.10.2 (Python 3.11) and 0.11.2 / 0.12.0.1 (Python 3.12).
  assert all(spec.contains(v) for v in ("0.10.2", "0.11.2", "0.12.0.1"))
  assert not spec.contains("0.4.30")


def test_ci_runs_the_readme_test_command():
  readme = (ROOT / "README.md").read_text()
  section = readme.split("## Two commands for a fresh machine", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
  assert len(blocks) == 2, "the README's fresh-machine section should give two commands"
  install_and_train, install_and_test = (b.strip() for b in blocks)
  assert "imm_jax.train --config configs/digits.py" in install_and_train
  assert (ROOT / "configs" / "digits.py").exists()
  assert "pytest" in install_and_test
  ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
  assert install_and_test in ci_lines, ".ci/run must run the README's test command verbatim"
