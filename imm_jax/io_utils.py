"""Atomic file writes (a reader, or a crash, never sees a half-written file, and an existing file is
replaced only once its successor is complete) and the command-line tools' one-line stop on bad input."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import NoReturn


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", **open_kwargs):
  """Open a temporary file beside ``path``; on success it is fsynced and renamed over ``path``."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  suffix = os.path.splitext(path)[1]
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
  try:
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
    with os.fdopen(fd, mode, **open_kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def fail(message: str) -> NoReturn:
  """Stop a command-line tool on bad input: ``error: <message>`` as one line on stderr, exit status 2.

  Every ``python -m imm_jax.*`` entry point stops this way, before it writes anything."""
  first = str(message).strip().splitlines()
  print(f"error: {first[0] if first else 'bad input'}", file=sys.stderr, flush=True)
  raise SystemExit(2)


@contextlib.contextmanager
def input_errors():
  """Marks the errors raised inside as bad input (``err.input_error = True``, types kept: ValueError,
  FileNotFoundError, KeyError): wrap the setup that reads the config, data and workdir in it, and a
  command's ``main`` in :func:`stop_on_input_errors`, which prints those as one line."""
  try:
    yield
  except (ValueError, FileNotFoundError, KeyError) as e:
    e.input_error = True
    raise


@contextlib.contextmanager
def stop_on_input_errors():
  """Around a command's work: an error marked by :func:`input_errors` stops it with :func:`fail` (one
  line, exit 2); any other error keeps its traceback."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    if not getattr(e, "input_error", False):
      raise
    fail((str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)) or type(e).__name__)
