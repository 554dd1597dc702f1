"""Toy 2-D point distributions, generated in numpy.

Scaling convention
------------------
IMM's prior is N(0, 0.5^2 I), so every toy distribution is scaled to roughly match it: **each coordinate
has mean ~0 and standard deviation ~0.5** (computed analytically, not estimated from samples):

* ``'checkerboard'``: the FFJORD checkerboard (a 4x4 board over [-4, 4]^2 whose 8 cells with even
    ``col + row`` are filled uniformly, the other 8 are empty) multiplied by ``1 / (4 sqrt(3))``, i.e. the
    board covers the square [-sqrt(3)/2, sqrt(3)/2]^2 with cells of side sqrt(3)/4 ~ 0.433. Each coordinate
    is uniform on that interval, so its std is exactly 0.5. Cell ``(i, j)`` (``i`` along x, ``j`` along y,
    both counted from the low corner) is filled iff ``(i + j)`` is even.
* ``'8gaussians'``: 8 isotropic Gaussians of std ``s`` centred at ``R (cos(k pi/4), sin(k pi/4))``,
    ``k = 0..7`` with ``s = R / 8`` (the FFJORD ratio 0.5 / 4). Per coordinate the variance is
    ``R^2 / 2 + s^2 = 0.25``, so ``R = sqrt(0.25 / (1/2 + 1/64)) ~ 0.696`` and ``s ~ 0.087``.
* ``'moons'``: scikit-learn's two moons (outer ``(cos t, sin t)``, inner ``(1 - cos t, 1/2 - sin t)``,
    ``t ~ U[0, pi]``) with isotropic Gaussian noise 0.05, then each coordinate is centred with its exact
    mean (0.5, 0.25) and divided by its exact std times 2 (x std = sqrt(3/4 + n^2),
    y std = sqrt(1/2 - 4/pi^2 + (4/pi - 1/2)^2 / 4 + n^2)). This rescales x and y differently.

All samples are float32 arrays of shape ``(n, 2)``; the same ``(name, n, seed)`` always gives the same array.
"""

from __future__ import annotations

import math

import numpy as np

TOY_NAMES = ('checkerboard', '8gaussians', 'moons')

# Checkerboard: raw board spans [-4, 4]; uniform std there is 8 / sqrt(12) = 4 / sqrt(3).
CHECKERBOARD_SCALE = 0.5 / (4.0 / math.sqrt(3.0))
CHECKERBOARD_HALF_WIDTH = 4.0 * CHECKERBOARD_SCALE  # sqrt(3) / 2
CHECKERBOARD_CELL = 2.0 * CHECKERBOARD_HALF_WIDTH / 4.0

# 8 gaussians.
GAUSSIANS_RADIUS = math.sqrt(0.25 / (0.5 + 1.0 / 64.0))
GAUSSIANS_STD = GAUSSIANS_RADIUS / 8.0
GAUSSIANS_CENTERS = np.stack(
        [GAUSSIANS_RADIUS * np.cos(np.arange(8) * np.pi / 4), GAUSSIANS_RADIUS * np.sin(np.arange(8) * np.pi / 4)],
        axis=1,
).astype(np.float32)

# Two moons.
MOONS_NOISE = 0.05
_MOONS_MEAN = np.array([0.5, 0.25])
_MOONS_STD = np.array([
        math.sqrt(0.75 + MOONS_NOISE**2),
        math.sqrt(0.5 - 4.0 / math.pi**2 + (4.0 / math.pi - 0.5) ** 2 / 4.0 + MOONS_NOISE**2),
])


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    x1 = rng.random(n) * 4.0 - 2.0
    x2 = rng.random(n) - rng.integers(0, 2, n) * 2.0
    x2 = x2 + np.floor(x1) % 2
    return np.stack([x1, x2], axis=1) * 2.0 * CHECKERBOARD_SCALE


def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    k = rng.integers(0, 8, n)
    return GAUSSIANS_CENTERS[k].astype(np.float64) + GAUSSIANS_STD * rng.standard_normal((n, 2))


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    t = rng.random(n) * np.pi
    outer = rng.random(n) < 0.5
    x = np.where(outer, np.cos(t), 1.0 - np.cos(t))
    y = np.where(outer, np.sin(t), 0.5 - np.sin(t))
    pts = np.stack([x, y], axis=1) + MOONS_NOISE * rng.standard_normal((n, 2))
    return (pts - _MOONS_MEAN) / _MOONS_STD * 0.5


_SAMPLERS = {'checkerboard': _checkerboard, '8gaussians': _eight_gaussians, 'moons': _moons}


def sample_toy2d(name: str, n: int, seed: int) -> np.ndarray:
    """Draws ``n`` true samples of toy distribution ``name`` as float32 ``(n, 2)`` (std ~0.5 per coordinate)."""
    if name not in _SAMPLERS:
        raise ValueError(f'Unknown toy distribution {name!r}; valid choices: {", ".join(TOY_NAMES)}.')
    if n < 0:
        raise ValueError(f'n must be >= 0, got {n}.')
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), TOY_NAMES.index(name)]))
    return _SAMPLERS[name](int(n), rng).astype(np.float32)
