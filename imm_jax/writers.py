"""The one place that writes training measurements: a JSON-lines file and TensorBoard events.

Why not ``clu.metric_writers``: it imports TensorFlow at import time, and TensorFlow is neither a
dependency nor installed on the GPU machines. TensorBoard's own pure-Python ``EventFileWriter`` plus
its vendored protos (the route ``torch.utils.tensorboard`` takes) write the same event files.

Two sinks, on purpose:

* ``metrics.jsonl`` is the record of truth that scripts, notebooks and tests read (``read_metrics``).
  It is appended and flushed on every call so that a crash loses nothing already written, and it is
  always valid JSON (NaN/Inf are stored as the strings ``"nan"``, ``"inf"``, ``"-inf"``).
* TensorBoard event files are for looking at curves and sample grids.

Resuming after a crash re-runs the steps after the last checkpoint. ``truncate_after(step)`` drops the
orphaned ``metrics.jsonl`` rows and writes a TensorBoard ``SessionLog.START`` at ``step + 1``, which
makes TensorBoard discard its orphaned events too, so neither sink shows a step twice.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from imm_jax.io_utils import atomic_open

METRICS_FILENAME = "metrics.jsonl"

__all__ = ["METRICS_FILENAME", "MetricWriter", "flatten_dict", "read_metrics"]


def _encode_value(value: Any) -> Any:
    """Makes a value JSON-safe; integers stay exact, non-finite floats become strings."""
    if hasattr(value, "item") and np.ndim(value) == 0:  # numpy / jax scalars and 0-d arrays
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _decode_row(row: dict) -> dict:
    return {k: (_NON_FINITE[v] if isinstance(v, str) and v in _NON_FINITE else v) for k, v in row.items()}


def _parse_lines(text: str) -> list[dict]:
    """Parses JSON lines, skipping a torn (unparsable) line left by a crash mid-write."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_metrics(logdir: str) -> list[dict]:
    """Rows of ``logdir/metrics.jsonl`` in file order, with ``"nan"``/``"inf"`` decoded back to floats.

    A missing file reads as no rows, so callers need not special-case a fresh run.
    """
    path = os.path.join(logdir, METRICS_FILENAME)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [_decode_row(row) for row in _parse_lines(f.read())]


def _atomic_write_text(path: str, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def flatten_dict(config: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Flattens nested mappings (or anything with ``to_dict()``, e.g. a ConfigDict) to dotted keys."""
    if hasattr(config, "to_dict") and not isinstance(config, Mapping):
        config = config.to_dict()
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if hasattr(value, "to_dict") and not isinstance(value, Mapping):
            value = value.to_dict()
        if isinstance(value, Mapping):
            flat.update(flatten_dict(value, name, sep))
        else:
            flat[name] = value
    return flat


def _png_bytes(image: np.ndarray) -> tuple[bytes, int, int, int]:
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {image.dtype}; convert (e.g. with np.clip + astype) first")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        channels = 1
    elif image.ndim == 3 and image.shape[-1] in (3, 4):
        channels = image.shape[-1]
    else:
        raise ValueError(f"expected an HW or HWC (C in 1, 3, 4) image, got shape {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue(), image.shape[0], image.shape[1], channels


_EVENT_FILE = re.compile(r"^events\.out\.tfevents\.(\d+)\.")


def _wait_for_a_later_second(logdir: str) -> None:
    """TensorBoard reads a run's event files in name order. A name starts with its creation second,
    then host, pid and a counter compared as text ("10" < "9"), so a file made in the same second as
    an earlier one (a resume right after a stop) can sort first, and the resumed run's SessionLog.START
    would then be read before the steps it drops. When the newest existing file was made in this very
    second, waits (under a second) for the next one. (Clock skew, a file from a later second, is left
    as it is.)"""
    seconds = [int(m.group(1)) for m in map(_EVENT_FILE.match, os.listdir(logdir)) if m]
    latest = max(seconds, default=-1)
    while int(time.time()) == latest:
        time.sleep(0.02)


class MetricWriter:
    """Writes scalars to ``metrics.jsonl`` and TensorBoard; images, text and hparams to TensorBoard.

    Construct with ``enabled=jax.process_index() == 0`` so that in multi-process runs only one process
    writes; a disabled writer touches no files and every method is a no-op, which keeps call sites free
    of ``if process_index == 0`` branches.

    Each instance opens a new event file in ``logdir`` (TensorBoard merges all files in a directory), and
    appends to the existing ``metrics.jsonl``, so re-opening the same ``logdir`` on resume is expected.
    """

    def __init__(self, logdir: str, *, enabled: bool = True, flush_secs: float = 30.0):
        self.logdir = logdir
        self.enabled = enabled
        self._event_writer = None
        self._jsonl = None
        self._closed = False
        if not enabled:
            return
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        os.makedirs(logdir, exist_ok=True)
        self._metrics_path = os.path.join(logdir, METRICS_FILENAME)
        self._drop_torn_tail()
        self._jsonl = open(self._metrics_path, "a", encoding="utf-8")
        _wait_for_a_later_second(logdir)
        self._event_writer = EventFileWriter(logdir, max_queue_size=100, flush_secs=flush_secs)

    # -- internals ---------------------------------------------------------------------------------

    def _active(self) -> bool:
        """False for a disabled writer; raises after close() so late writes are not silently lost."""
        if self._closed:
            raise RuntimeError(f"MetricWriter({self.logdir!r}) is closed")
        return self.enabled

    def _drop_torn_tail(self) -> None:
        """A crash mid-write can leave a partial last line; appending to it would corrupt the next row."""
        if not os.path.exists(self._metrics_path):
            return
        with open(self._metrics_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
        with open(self._metrics_path, encoding="utf-8", errors="replace") as f:
            rows = _parse_lines(f.read())
        _atomic_write_text(self._metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def _add_summary(self, step: int, values: list) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(value=values)
        self._event_writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    @staticmethod
    def _text_value(tag: str, text: str):
        from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text", content=b"")
        )
        tensor = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING,
            string_val=[text.encode("utf-8")],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]),
        )
        return summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)

    # -- public API --------------------------------------------------------------------------------

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Appends one ``{"step": step, **scalars}`` row and flushes it; also TensorBoard simple_values."""
        if not self._active():
            return
        from tensorboard.compat.proto import summary_pb2

        row: dict[str, Any] = {"step": int(step)}
        for name, value in scalars.items():
            if name == "step":
                raise ValueError("'step' is reserved for the row's step")
            row[str(name)] = _encode_value(value)
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        values = []
        for name, value in scalars.items():
            value = value.item() if hasattr(value, "item") else value
            values.append(summary_pb2.Summary.Value(tag=str(name), simple_value=float(value)))
        self._add_summary(step, values)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """PNG-encoded image summaries; each image is uint8 HW or HWC with 1, 3 or 4 channels."""
        if not self._active():
            return
        from tensorboard.compat.proto import summary_pb2

        values = []
        for name, image in images.items():
            png, height, width, channels = _png_bytes(np.asarray(image))
            img = summary_pb2.Summary.Image(
                height=height, width=width, colorspace=channels, encoded_image_string=png
            )
            values.append(summary_pb2.Summary.Value(tag=str(name), image=img))
        self._add_summary(step, values)

    def write_text(self, step: int, texts: Mapping[str, str]) -> None:
        """Text-plugin summaries (rendered as Markdown by TensorBoard)."""
        if not self._active():
            return
        self._add_summary(step, [self._text_value(str(k), str(v)) for k, v in texts.items()])

    def write_hparams(self, hparams: Any, step: int = 0) -> None:
        """Records the (flattened) config as a Markdown table in the text tab, so a run documents itself.

        ``hparams`` may be a nested mapping or an ``ml_collections.ConfigDict``.
        """
        if not self._active():
            return
        flat = flatten_dict(hparams)
        lines = ["| key | value |", "|---|---|"]
        for key in sorted(flat):
            value = str(flat[key]).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {key} | {value} |")
        self.write_text(step, {"hparams": "\n".join(lines)})

    def truncate_after(self, step: int) -> None:
        """Forgets everything logged after ``step``; call when resuming from a checkpoint at ``step``.

        ``metrics.jsonl`` is rewritten atomically (temp file + ``os.replace``) keeping rows with
        ``"step" <= step``. For TensorBoard a ``SessionLog.START`` event at ``step + 1`` is written; its
        loaders then drop previously seen events with a step greater than ``step``.
        """
        if not self._active():
            return
        from tensorboard.compat.proto import event_pb2

        self._jsonl.close()
        with open(self._metrics_path, encoding="utf-8", errors="replace") as f:
            rows = _parse_lines(f.read())
        kept = [r for r in rows if isinstance(r.get("step"), int) and r["step"] <= step]
        _atomic_write_text(self._metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        self._jsonl = open(self._metrics_path, "a", encoding="utf-8")
        self._event_writer.add_event(
            event_pb2.Event(
                wall_time=time.time(),
                step=int(step) + 1,
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
            )
        )
        self._event_writer.flush()

    def flush(self) -> None:
        if not self._active():
            return
        self._jsonl.flush()
        self._event_writer.flush()

    def close(self) -> None:
        """Flushes and closes both sinks; safe to call twice."""
        self._closed = True
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._event_writer is not None:
            self._event_writer.close()
            self._event_writer = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
