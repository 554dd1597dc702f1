"""Turning samples into pictures with numpy and Pillow only (no matplotlib on the training machines).

Everything here takes and returns ``uint8`` arrays in HWC (or HW) layout, the form that PNG files and
TensorBoard image summaries want, so that the trainer, the sampler and notebooks share one look.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from imm_jax.io_utils import atomic_open

__all__ = ["make_grid", "save_png", "upscale_nearest", "scatter_image", "side_by_side", "line_chart"]

SAMPLE_COLOR = (31, 58, 147)  # dark blue: the model's samples
REFERENCE_COLOR = (200, 200, 200)  # light grey: data, drawn underneath
FRAME_COLOR = (90, 90, 90)
# Line colours of line_chart, in the order series are given.
LINE_COLORS = ((31, 58, 147), (90, 140, 220), (150, 150, 150), (200, 30, 30), (20, 150, 60), (230, 140, 0),
               (140, 60, 170), (0, 150, 160))


def _check_uint8(images: np.ndarray, what: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8, got {images.dtype}")
    return images


def make_grid(
    images: np.ndarray, ncols: int | None = None, padding: int = 1, pad_value: int = 255
) -> np.ndarray:
    """Tiles ``(N, H, W, C)`` uint8 images into one ``(H', W', C)`` image, row-major.

    ``padding`` pixels of ``pad_value`` separate the tiles and frame the grid (as torchvision does), so
    dark digits on a dark background still read as separate tiles. Unused cells of the last row are
    left as padding. ``(N, H, W)`` input is treated as grayscale with C=1.
    """
    images = _check_uint8(images, "images")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) images, got shape {images.shape}")
    n, h, w, c = images.shape
    if n == 0:
        raise ValueError("make_grid needs at least one image")
    ncols = max(1, min(n, ncols if ncols is not None else math.ceil(math.sqrt(n))))
    nrows = math.ceil(n / ncols)
    grid = np.full(
        (nrows * (h + padding) + padding, ncols * (w + padding) + padding, c), pad_value, dtype=np.uint8
    )
    for i in range(n):
        r, col = divmod(i, ncols)
        y = padding + r * (h + padding)
        x = padding + col * (w + padding)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def save_png(path: str | os.PathLike, image: np.ndarray) -> str:
    """Writes a uint8 HW / HWC (C in 1, 3, 4) image as PNG, atomically.

    The PNG goes to a temporary file in the same directory and is moved into place with
    ``os.replace``, so a reader (or a crash) never sees a half-written file and an existing file
    is either the old picture or the new one. Returns the path.
    """
    from PIL import Image

    image = _check_uint8(image, "image")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
        raise ValueError(f"expected an HW or HWC (C in 1, 3, 4) image, got shape {image.shape}")
    path = os.fspath(path)
    with atomic_open(path, "wb") as f:
        Image.fromarray(np.ascontiguousarray(image)).save(f, format="PNG")
    return path


def upscale_nearest(image: np.ndarray, factor: int) -> np.ndarray:
    """Enlarges an HW or HWC image by an integer factor with nearest-neighbour (blocky) pixels.

    8x8 / 16x16 digits are unreadable at native size, and viewers blur them when they scale;
    repeating pixels keeps what the model actually produced visible.
    """
    image = np.asarray(image)
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if image.ndim not in (2, 3):
        raise ValueError(f"expected an HW or HWC image, got shape {image.shape}")
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def _parse_extent(extent: float | Sequence[float]) -> tuple[float, float, float, float]:
    if np.ndim(extent) == 0:
        e = float(extent)
        return -e, e, -e, e
    extent = tuple(float(v) for v in extent)
    if len(extent) == 2:
        return extent[0], extent[1], extent[0], extent[1]
    if len(extent) == 4:
        return extent
    raise ValueError("extent must be a number e ([-e, e]^2), (lo, hi) or (xmin, xmax, ymin, ymax)")


def _plot_points(canvas: np.ndarray, points: np.ndarray, bounds, color, dot: int) -> None:
    xmin, xmax, ymin, ymax = bounds
    size_y, size_x = canvas.shape[:2]
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    points = points[np.all(np.isfinite(points), axis=1)]
    col = np.floor((points[:, 0] - xmin) / (xmax - xmin) * size_x).astype(np.int64)
    row = np.floor((ymax - points[:, 1]) / (ymax - ymin) * size_y).astype(np.int64)  # y axis points up
    inside = (col >= 0) & (col < size_x) & (row >= 0) & (row < size_y)
    col, row = col[inside], row[inside]
    lo = -(dot // 2)
    for dy in range(lo, lo + dot):
        for dx in range(lo, lo + dot):
            r = np.clip(row + dy, 0, size_y - 1)
            c = np.clip(col + dx, 0, size_x - 1)
            canvas[r, c] = color


def scatter_image(
    points: np.ndarray,
    *,
    extent: float | Sequence[float],
    size: int = 256,
    reference: np.ndarray | None = None,
) -> np.ndarray:
    """A ``(size, size, 3)`` uint8 scatter plot of 2-D samples, the toy-data analogue of a sample grid.

    ``extent`` fixes the axes (``e`` for ``[-e, e]^2``, ``(lo, hi)`` or ``(xmin, xmax, ymin, ymax)``)
    so that pictures from different training steps are comparable; points outside it (and NaNs) are
    not drawn. ``reference`` points (e.g. the data) are drawn first in light grey, the samples on top
    in dark blue, inside a thin frame.
    """
    bounds = _parse_extent(extent)
    if not (bounds[1] > bounds[0] and bounds[3] > bounds[2]):
        raise ValueError(f"empty extent {bounds}")
    size = int(size)
    canvas = np.full((size, size, 3), 255, dtype=np.uint8)
    dot = max(1, size // 128)
    if reference is not None:
        _plot_points(canvas, reference, bounds, REFERENCE_COLOR, dot)
    _plot_points(canvas, points, bounds, SAMPLE_COLOR, dot)
    canvas[0, :] = canvas[-1, :] = FRAME_COLOR
    canvas[:, 0] = canvas[:, -1] = FRAME_COLOR
    return canvas


def _to_rgb(image: np.ndarray) -> np.ndarray:
    image = _check_uint8(image, "panel")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an HW or HWC (C in 1, 3, 4) panel, got shape {image.shape}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 4:
        image = image[..., :3]
    return image


def side_by_side(
    images: Sequence[np.ndarray],
    labels: Sequence[str] | None = None,
    *,
    gap: int = 8,
    background: int = 255,
) -> np.ndarray:
    """Puts panels next to each other (e.g. data | 1 step | 2 steps | 8 steps) as one RGB uint8 image.

    Panels may differ in size and channel count: all become RGB, shorter ones are padded at the
    bottom with ``background``. With ``labels`` each panel gets a caption strip above it, drawn with
    Pillow's default bitmap font so no font file is needed.
    """
    panels = [_to_rgb(im) for im in images]
    if not panels:
        raise ValueError("side_by_side needs at least one image")
    if labels is not None and len(labels) != len(panels):
        raise ValueError(f"{len(labels)} labels for {len(panels)} images")
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    label_h = 14 if labels is not None else 0
    out = np.full((label_h + height, width, 3), background, dtype=np.uint8)
    x = 0
    offsets = []
    for p in panels:
        out[label_h : label_h + p.shape[0], x : x + p.shape[1]] = p
        offsets.append(x)
        x += p.shape[1] + gap
    if labels is not None:
        from PIL import Image, ImageDraw

        pil = Image.fromarray(out)
        draw = ImageDraw.Draw(pil)
        text_color = (0, 0, 0) if background >= 128 else (255, 255, 255)
        for off, label in zip(offsets, labels):
            draw.text((off + 1, 1), str(label), fill=text_color)
        out = np.asarray(pil).copy()
    return out


def _tick_label(v: float) -> str:
    """50000 -> '50k', 1.5e6 -> '1.5M', 0.05 -> '0.05'."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:g}{suffix}"
    return f"{v:g}"


def _linear_ticks(lo: float, hi: float, count: int = 5, min_step: float = 0.0) -> list[float]:
    """Round values (1, 2 or 5 times a power of ten apart, at least ``min_step``) in [lo, hi]."""
    raw = (hi - lo) / max(count, 1)
    step = 10.0 ** math.floor(math.log10(raw))
    step = max(step * next(m for m in (1, 2, 5, 10) if m * step >= raw), min_step)
    first = math.ceil(lo / step - 1e-9)
    return [k * step for k in range(first, int(math.floor(hi / step + 1e-9)) + 1)]


def line_chart(
    series: Mapping[str, Mapping[float, float]],
    *,
    title: str,
    x_scale: str = "linear",
    y_scale: str = "log",
    floor: float | None = None,
    floor_label: str = "",
    size: tuple[int, int] = (560, 400),
) -> np.ndarray:
    """A line chart as an RGB uint8 image: one polyline with dots per named series of ``{x: y}``
    points, in :data:`LINE_COLORS` order, with a legend under the axes.

    ``x_scale``: ``linear`` (round ticks, e.g. training steps) or ``log2`` (a tick at every x, e.g.
    sampling steps 1, 2, 4, 8). ``y_scale``: ``log`` (ticks at 1, 2, 5 times powers of ten; values
    <= 0 are left out) or ``linear``. ``floor``: a horizontal grey line (e.g. what real data scores),
    captioned ``floor_label``. Non-finite values are left out.
    """
    if x_scale not in ("linear", "log2") or y_scale not in ("linear", "log"):
        raise ValueError(f"x_scale must be linear|log2 and y_scale linear|log, got {x_scale!r}, {y_scale!r}")
    from PIL import Image, ImageDraw

    def usable(x, y):
        return (math.isfinite(x) and math.isfinite(y) and (x_scale == "linear" or x > 0)
                and (y_scale == "linear" or y > 0))

    lines = {name: sorted((float(x), float(y)) for x, y in points.items() if usable(float(x), float(y)))
             for name, points in series.items()}
    xs = [x for pts in lines.values() for x, _ in pts]
    ys = [y for pts in lines.values() for _, y in pts]
    if not xs:
        raise ValueError(f"line_chart {title!r}: no point to draw")
    show_floor = floor is not None and usable(xs[0], floor)
    if show_floor:
        ys.append(floor)
    fx = math.log2 if x_scale == "log2" else float
    fy = math.log10 if y_scale == "log" else float
    x_lo, x_hi = fx(min(xs)), fx(max(xs))
    y_lo, y_hi = fy(min(ys)), fy(max(ys))
    pad = 0.1 if y_scale == "log" else 0.05 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - (pad or 0.5), y_hi + (pad or 0.5)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    x_pad = 0.03 * (x_hi - x_lo)  # dots at the ends stay clear of the frame
    x_lo, x_hi = x_lo - x_pad, x_hi + x_pad
    w, h = size
    left, right, top, bottom = 60, 20, 24, 40 + 12 * len(lines)
    plot_w, plot_h = w - left - right, h - top - bottom

    def to_xy(x, y):
        return (left + plot_w * (fx(x) - x_lo) / (x_hi - x_lo), top + plot_h * (1 - (fy(y) - y_lo) / (y_hi - y_lo)))

    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=FRAME_COLOR)
    y_ticks = []
    if y_scale == "log":
        y_ticks = [m * 10.0**e for e in range(math.floor(y_lo), math.ceil(y_hi) + 1) for m in (1, 2, 5)
                   if y_lo <= math.log10(m * 10.0**e) <= y_hi]
    if len(y_ticks) < 2:  # a linear axis, or a log one spanning less than a 1-2-5 step
        y_ticks = [v for v in _linear_ticks(*(10**v if y_scale == "log" else v for v in (y_lo, y_hi)))
                   if y_scale == "linear" or v > 0]
    for v in y_ticks:
        _, y = to_xy(min(xs), v)
        draw.line([left - 4, y, left, y], fill=FRAME_COLOR)
        draw.text((2, y - 6), _tick_label(v), fill=(0, 0, 0))
    integers = all(float(x).is_integer() for x in xs)
    x_ticks = sorted(set(xs)) if x_scale == "log2" else _linear_ticks(x_lo, x_hi, min_step=1.0 if integers else 0.0)
    for v in x_ticks:
        x, _ = to_xy(v, ys[0])
        draw.line([x, top + plot_h, x, top + plot_h + 4], fill=FRAME_COLOR)
        label = _tick_label(v)
        draw.text((x - 3 * len(label), top + plot_h + 6), label, fill=(0, 0, 0))
    if show_floor:
        _, y = to_xy(min(xs), floor)
        draw.line([left, y, left + plot_w, y], fill=REFERENCE_COLOR)
        draw.text((left + plot_w - 6 * len(floor_label) - 4, y - 12), floor_label, fill=(120, 120, 120))
    for i, (name, pts) in enumerate(lines.items()):
        color = LINE_COLORS[i % len(LINE_COLORS)]
        xy = [to_xy(x, y) for x, y in pts]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for x, y in xy:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        ly = top + plot_h + 20 + 12 * i
        draw.line([left, ly + 5, left + 20, ly + 5], fill=color, width=2)
        draw.text((left + 26, ly), name, fill=(0, 0, 0))
    draw.text((left, 4), title, fill=(0, 0, 0))
    return np.asarray(img)
