"""Turning samples into pictures with numpy and Pillow only (no matplotlib on the training machines).

Everything here takes and returns ``uint8`` arrays in HWC (or HW) layout, the form that PNG files and
TensorBoard image summaries want, so that the trainer, the sampler and notebooks share one look.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from imm_jax.io_utils import atomic_open

__all__ = ["make_grid", "save_png", "upscale_nearest", "scatter_image", "side_by_side"]

SAMPLE_COLOR = (31, 58, 147)  # dark blue: the model's samples
REFERENCE_COLOR = (200, 200, 200)  # light grey: data, drawn underneath
FRAME_COLOR = (90, 90, 90)


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
