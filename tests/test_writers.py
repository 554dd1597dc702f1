"""MetricWriter: metrics.jsonl and TensorBoard event files, read back with TensorBoard's own loader."""

import io
import json
import math
import os

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from imm_jax.writers import METRICS_FILENAME, MetricWriter, flatten_dict, read_metrics


def _accumulator(logdir):
    acc = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0,
                                    event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    return acc


def _no_tensorflow():
    import sys

    return "tensorflow" not in sys.modules


def test_scalars_jsonl_and_tensorboard(tmp_path):
    with MetricWriter(str(tmp_path)) as w:
        w.write_scalars(1, {"loss": 0.5, "lr": np.float32(1e-3), "examples": np.int64(64)})
        w.write_scalars(2, {"loss": 0.25, "lr": 2e-3, "examples": 128})
        # Each call is flushed: the row is on disk before close().
        assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]
    rows = read_metrics(str(tmp_path))
    assert rows[0] == {"step": 1, "loss": 0.5, "lr": pytest.approx(1e-3), "examples": 64}
    assert isinstance(rows[0]["lr"], float) and isinstance(rows[1]["examples"], int)

    acc = _accumulator(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
    assert [e.value for e in acc.Scalars("examples")] == [64.0, 128.0]
    assert _no_tensorflow()


def test_non_finite_values_keep_the_file_valid_json(tmp_path):
    with MetricWriter(str(tmp_path)) as w:
        w.write_scalars(3, {"a": float("nan"), "b": np.inf, "c": -np.inf, "d": 1.5})
    text = (tmp_path / METRICS_FILENAME).read_text()

    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    row = json.loads(text, parse_constant=reject)  # strict JSON: no bare NaN / Infinity
    assert row == {"step": 3, "a": "nan", "b": "inf", "c": "-inf", "d": 1.5}
    decoded = read_metrics(str(tmp_path))[0]
    assert math.isnan(decoded["a"]) and decoded["b"] == math.inf and decoded["c"] == -math.inf
    assert math.isnan(_accumulator(tmp_path).Scalars("a")[0].value)


def test_images_text_and_hparams(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    gray = np.arange(35, dtype=np.uint8).reshape(5, 7)
    with MetricWriter(str(tmp_path)) as w:
        w.write_images(10, {"samples/rgb": rgb, "samples/gray": gray, "samples/gray_c1": gray[..., None]})
        w.write_text(10, {"note": "hello *world*"})
        w.write_hparams({"model": {"depth": 4, "width": 128}, "lr": 1e-4})
        with pytest.raises(ValueError):
            w.write_images(11, {"bad": rgb.astype(np.float32)})

    acc = _accumulator(tmp_path)
    (ev,) = acc.Images("samples/rgb")
    assert (ev.step, ev.height, ev.width) == (10, 12, 20)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(ev.encoded_image_string))), rgb)
    for tag in ("samples/gray", "samples/gray_c1"):
        (ev,) = acc.Images(tag)
        assert (ev.height, ev.width) == (5, 7)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(ev.encoded_image_string))), gray)

    (note,) = acc.Tensors("note")
    assert note.step == 10 and note.tensor_proto.string_val[0].decode() == "hello *world*"
    assert acc.SummaryMetadata("note").plugin_data.plugin_name == "text"
    (hp,) = acc.Tensors("hparams")
    table = hp.tensor_proto.string_val[0].decode()
    assert "| model.depth | 4 |" in table and "| lr | 0.0001 |" in table


def test_flatten_dict_accepts_config_like_objects():
    class Cfg:
        def to_dict(self):
            return {"a": {"b": 1}, "c": [1, 2]}

    assert flatten_dict({"x": Cfg(), "y": 2}) == {"x.a.b": 1, "x.c": [1, 2], "y": 2}


def test_disabled_writer_touches_nothing(tmp_path):
    logdir = tmp_path / "not_created"
    w = MetricWriter(str(logdir), enabled=False)
    w.write_scalars(1, {"loss": 1.0})
    w.write_images(1, {"x": np.zeros((2, 2), np.uint8)})
    w.write_text(1, {"t": "x"})
    w.write_hparams({"a": 1})
    w.truncate_after(0)
    w.flush()
    w.close()
    assert not logdir.exists()
    assert read_metrics(str(logdir)) == []


def test_write_after_close_raises(tmp_path):
    w = MetricWriter(str(tmp_path))
    w.close()
    w.close()  # idempotent
    with pytest.raises(RuntimeError):
        w.write_scalars(1, {"loss": 1.0})


def test_resume_truncates_rerun_steps_in_both_sinks(tmp_path, monkeypatch):
    from tensorboard.summary.writer import event_file_writer

    # The two event files get the counters 9 and 10 in their names: within one second "10" sorts
    # before "9", which TensorBoard's loader would read first.
    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(9))
    logdir = str(tmp_path)
    with MetricWriter(logdir) as w:  # first run: checkpoint at step 3, crash after step 5
        for step in range(1, 6):
            w.write_scalars(step, {"loss": float(step)})

    with MetricWriter(logdir) as w:  # resumed from the step-3 checkpoint
        w.truncate_after(3)
        assert [r["step"] for r in read_metrics(logdir)] == [1, 2, 3]
        for step in range(4, 7):
            w.write_scalars(step, {"loss": 10.0 * step})

    rows = read_metrics(logdir)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    assert not [f for f in os.listdir(logdir) if f.startswith(".tmp")]
    # TensorBoard drops the orphaned steps 4 and 5 of the first run on seeing SessionLog.START at 4.
    scalars = [(e.step, e.value) for e in _accumulator(logdir).Scalars("loss")]
    assert scalars == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]


def test_torn_last_line_is_dropped_on_reopen(tmp_path):
    path = tmp_path / METRICS_FILENAME
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')  # crash mid-write
    assert read_metrics(str(tmp_path)) == [{"step": 1, "loss": 1.0}]
    with MetricWriter(str(tmp_path)) as w:
        w.write_scalars(2, {"loss": 2.0})
    assert read_metrics(str(tmp_path)) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]
    assert path.read_text().count("\n") == 2


def test_step_key_is_reserved(tmp_path):
    with MetricWriter(str(tmp_path)) as w:
        with pytest.raises(ValueError):
            w.write_scalars(1, {"step": 3})
