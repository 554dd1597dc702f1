import os

import numpy as np
import pytest
from PIL import Image

from imm_jax import images as images_mod
from imm_jax.images import (
    REFERENCE_COLOR,
    SAMPLE_COLOR,
    make_grid,
    save_png,
    scatter_image,
    side_by_side,
    upscale_nearest,
)


def _tiles(n, h=4, w=3, c=3):
    # Tile i is filled with the value 10 * (i + 1) so placement can be checked.
    return np.stack([np.full((h, w, c), 10 * (i + 1), np.uint8) for i in range(n)])


def test_make_grid_layout_and_padding():
    grid = make_grid(_tiles(5), padding=1, pad_value=255)  # ncols = ceil(sqrt(5)) = 3, 2 rows
    assert grid.dtype == np.uint8
    assert grid.shape == (2 * (4 + 1) + 1, 3 * (3 + 1) + 1, 3)
    for i in range(5):
        r, c = divmod(i, 3)
        y, x = 1 + r * 5, 1 + c * 4
        assert np.all(grid[y : y + 4, x : x + 3] == 10 * (i + 1))
    assert np.all(grid[0] == 255) and np.all(grid[:, 0] == 255)
    assert np.all(grid[6:10, 9:12] == 255)  # the unused sixth cell stays padding


def test_make_grid_grayscale_ncols_and_no_padding():
    gray = _tiles(6, c=1)
    grid = make_grid(gray, ncols=2, padding=0)
    assert grid.shape == (3 * 4, 2 * 3, 1)
    assert grid[0, 3, 0] == 20 and grid[11, 5, 0] == 60
    assert make_grid(gray[..., 0], ncols=6, padding=2, pad_value=0).shape == (4 + 4, 6 * 5 + 2, 1)
    assert make_grid(gray, ncols=100).shape[1] == 6 * 4 + 1  # more columns than images: one row


def test_make_grid_rejects_float():
    with pytest.raises(ValueError):
        make_grid(np.zeros((2, 4, 4, 3), np.float32))


def test_save_png_roundtrip_and_overwrite(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / "sub" / "grid.png"
    assert save_png(path, rgb) == str(path)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), rgb)
    gray = rgb[..., :1]
    save_png(path, gray)  # overwrite an existing file; HWC with C=1 becomes a grayscale PNG
    with Image.open(path) as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), gray[..., 0])
    assert sorted(os.listdir(path.parent)) == ["grid.png"]  # no temp files left behind


def test_save_png_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "grid.png"
    old = np.zeros((4, 4), np.uint8)
    save_png(path, old)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(images_mod.os, "replace", broken_replace)
    with pytest.raises(OSError):
        save_png(path, np.full((4, 4), 255, np.uint8))
    np.testing.assert_array_equal(np.asarray(Image.open(path)), old)
    assert os.listdir(tmp_path) == ["grid.png"]


def test_upscale_nearest():
    im = np.array([[1, 2], [3, 4]], np.uint8)
    big = upscale_nearest(im, 3)
    assert big.shape == (6, 6)
    assert np.all(big[:3, :3] == 1) and np.all(big[3:, 3:] == 4)
    assert upscale_nearest(np.zeros((8, 8, 3), np.uint8), 4).shape == (32, 32, 3)
    with pytest.raises(ValueError):
        upscale_nearest(im, 0)


def test_scatter_image_places_points_and_frame():
    img = scatter_image(
        np.array([[0.0, 0.0], [50.0, 50.0], [np.nan, 0.0]]),
        extent=2.0,
        size=64,
        reference=np.array([[-1.0, 1.0]]),
    )
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert tuple(img[32, 32]) == SAMPLE_COLOR  # origin in the centre
    assert tuple(img[16, 16]) == REFERENCE_COLOR  # (-1, 1): left, and up (y axis points up)
    assert np.all(img[0] == img[0, 0]) and tuple(img[0, 0]) != (255, 255, 255)  # frame
    # Only the two in-range points are drawn (the out-of-extent point and the NaN are dropped).
    inner = img[1:-1, 1:-1]
    assert np.sum(np.all(inner == SAMPLE_COLOR, axis=-1)) == 1
    assert np.sum(np.all(inner == REFERENCE_COLOR, axis=-1)) == 1


def test_scatter_image_extent_forms_and_dot_size():
    pts = np.array([[1.0, 1.0]])
    a = scatter_image(pts, extent=(0.0, 2.0), size=256)
    b = scatter_image(pts, extent=(0.0, 2.0, 0.0, 2.0), size=256)
    np.testing.assert_array_equal(a, b)
    assert np.sum(np.all(a == SAMPLE_COLOR, axis=-1)) == 4  # 2x2 dots at 256 px
    with pytest.raises(ValueError):
        scatter_image(pts, extent=(1.0, 1.0))


def test_side_by_side_mixed_panels_and_labels():
    a = np.zeros((10, 6), np.uint8)  # grayscale, shorter
    b = np.full((20, 8, 3), 100, np.uint8)
    out = side_by_side([a, b], gap=4)
    assert out.shape == (20, 6 + 4 + 8, 3) and out.dtype == np.uint8
    assert np.all(out[:10, :6] == 0) and np.all(out[10:, :6] == 255)  # padded at the bottom
    assert np.all(out[:, 6:10] == 255) and np.all(out[:, 10:] == 100)

    labelled = side_by_side([a, b], labels=["data", "1 step"], gap=4)
    assert labelled.shape[0] > 20 and labelled.shape[1] == 18
    strip = labelled[: labelled.shape[0] - 20]
    assert np.any(strip != 255)  # some caption text was drawn
    np.testing.assert_array_equal(labelled[-20:], out)
    with pytest.raises(ValueError):
        side_by_side([a, b], labels=["only one"])


def _dot_centre(chart, color):
    """Centre of the dot drawn in ``color`` (the topmost cluster of that colour: the legend's swatch of
    the same colour lies below the axes)."""
    rows, cols = np.nonzero(np.all(chart == np.array(color, np.uint8), axis=-1))
    order = np.argsort(rows)
    rows, cols = rows[order], cols[order]
    gaps = np.nonzero(np.diff(rows) > 2)[0]
    end = gaps[0] + 1 if len(gaps) else len(rows)
    return rows[:end].mean(), cols[:end].mean()


def test_line_chart_places_points_on_its_scales():
    # One point per series (each its own colour, no connecting line to blur the dot). The text's
    # anti-aliased edges are grey, so the grey series colour (LINE_COLORS[2]) goes to a series with no
    # point on a log axis.
    colors = [c for c in images_mod.LINE_COLORS if len(set(c)) > 1]
    assert images_mod.LINE_COLORS[2] not in colors and len(colors) == len(images_mod.LINE_COLORS) - 1
    chart = images_mod.line_chart({"a": {0: 1.0}, "b": {10_000: 100.0}, "grey": {0: -1.0}, "c": {5_000: 10.0},
                                   "d": {10_000: 1.0}}, title="log y, linear x")
    assert chart.dtype == np.uint8 and chart.shape == (400, 560, 3)
    (ra, ca), (rb, cb), (rc, cc), (rd, cd) = (_dot_centre(chart, colors[i]) for i in range(4))
    assert rb < rc < ra  # larger y is higher up
    assert abs(rc - (ra + rb) / 2) <= 1  # 10 is halfway between 1 and 100 on a log axis
    assert abs(cc - (ca + cb) / 2) <= 1  # 5k is halfway between 0 and 10k on a linear axis
    assert abs(cd - cb) <= 0.5 and abs(rd - ra) <= 0.5

    chart = images_mod.line_chart({"a": {1: 0.0}, "b": {2: 5.0}, "grey": {1: float("nan")}, "c": {8: 10.0}}, title="linear y, log2 x",
                                  x_scale="log2", y_scale="linear")
    (ra, ca), (rb, cb), (rc, cc) = (_dot_centre(chart, colors[i]) for i in range(3))
    assert abs(rb - (ra + rc) / 2) <= 1  # 5 halfway between 0 and 10
    assert abs((cb - ca) * 3 - (cc - ca)) <= 1.5  # log2: 1 -> 2 is a third of 1 -> 8

    # Values a log axis cannot show are left out; a chart with nothing to show is an error.
    chart = images_mod.line_chart({"a": {1: 0.0, 2: 3.0, 3: float("nan")}}, title="t")
    assert np.all(chart == np.array(colors[0], np.uint8), axis=-1).any()
    with pytest.raises(ValueError, match="no point"):
        images_mod.line_chart({"a": {1: -1.0}}, title="t")
    with pytest.raises(ValueError, match="x_scale"):
        images_mod.line_chart({"a": {1: 1.0}}, title="t", x_scale="log")
