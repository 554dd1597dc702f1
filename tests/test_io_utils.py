"""io_utils: an interrupted write leaves the old file as it was; a bad-input stop is one line, exit 2."""

from __future__ import annotations

import os

import pytest

from imm_jax.io_utils import atomic_open, fail


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "samples.npz"
  path.write_bytes(b"old")
  with pytest.raises(KeyboardInterrupt):
    with atomic_open(str(path)) as f:
      f.write(b"half of the new")
      raise KeyboardInterrupt
  assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["samples.npz"]
  with atomic_open(str(path)) as f:
    f.write(b"new")
  assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["samples.npz"]


def test_fail_prints_one_line_and_exits_2(capsys):
  with pytest.raises(SystemExit) as e:
    fail("--out=x: file exists; pass --overwrite\nTraceback (most recent call last): ...")
  assert e.value.code == 2
  assert capsys.readouterr().err == "error: --out=x: file exists; pass --overwrite\n"
