"""Pre-encoded SD-VAE latents (``config.data.name = 'latents'``) and decoding latents back to pixels.

``python -m imm_jax.encode`` writes a folder of ArrayRecord shards, one record per image holding the VAE
posterior's mean and std of the *raw* latents and the class label, plus ``latents.json`` (metadata) and,
per finished shard, ``<shard>.stats.json`` (per-channel sums for the dataset's latent statistics).

Training draws a latent ``z = mean + std * N(0, 1)`` per example and per draw (EDM2's
``StabilityVAEEncoder.encode_latents``) and maps it to model space (spec section 1)::

    x = (z - raw_mean) / raw_std * scale        # per channel; scale = 0.5, so x has std ~0.5

and decoding inverts that before the VAE decoder, whose output is in [-1, 1]::

    z = x / scale * raw_std + raw_mean  ->  VAE decoder  ->  uint8 = clip(round((y + 1) * 127.5))

The decoder takes the raw latent as is: the SD config's ``scaling_factor`` 0.18215 is *not* applied. The
paper's statistics (std ~4-5 per channel) are those of unscaled latents; after dividing by 0.18215 a latent
would have std ~25 and decode to noise. (0.18215 is the factor Stable Diffusion uses to bring raw latents
to unit variance; the per-channel normalisation here replaces it.)

``raw_mean``/``raw_std`` come from ``config.data.latent_mean``/``latent_std`` (the ImageNet-256 config
sets the paper's values, :data:`IMAGENET_MEAN`/:data:`IMAGENET_STD`) or, when those are empty, from the
encoded dataset's own statistics; ``scale`` from ``config.data.latent_scale`` (default 0.5).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from imm_jax.data import sources
from imm_jax.data.sources import DataInfo, ResolvedDataset, cfg_get

log = logging.getLogger(__name__)

# Per-channel statistics of the raw sd-vae-ft-ema latents of ImageNet-256 (spec section 1).
IMAGENET_MEAN = (0.86488, -0.27787343, 0.21616915, 0.3738409)
IMAGENET_STD = (4.85503674, 5.31922414, 3.93725398, 3.9870003)
DEFAULT_SCALE = 0.5

METADATA = 'latents.json'
FORMAT = 'imm_jax.latents'
VERSION = 1
STATS_SUFFIX = '.stats.json'

# ----------------------------------------------------------------------------------------------------------
# Record format: int32 label (little-endian), then mean and std, each (H, W, C) NHWC in the stored dtype.


def encode_record(mean: np.ndarray, std: np.ndarray, label: int) -> bytes:
    return np.int32(label).astype('<i4').tobytes() + np.ascontiguousarray(mean).tobytes() + \
        np.ascontiguousarray(std).tobytes()


def decode_records(records: Sequence[bytes], shape: tuple[int, ...], dtype: str) -> dict[str, np.ndarray]:
    """Raw records -> ``{'x': posterior means, 'std': posterior stds (float32 (N, H, W, C)), 'label'}``."""
    n = int(np.prod(shape))
    item = np.dtype(dtype).newbyteorder('<')
    size = 4 + 2 * n * item.itemsize
    buf = b''.join(records)
    if len(buf) != size * len(records):
        raise ValueError(f'latent records have {len(buf) // max(len(records), 1)} bytes, expected {size} '
                         f'(shape {shape}, dtype {dtype}): the shards do not match {METADATA}')
    raw = np.frombuffer(buf, np.uint8).reshape(len(records), size)
    labels = raw[:, :4].copy().view('<i4')[:, 0].astype(np.int32)
    values = raw[:, 4:].copy().view(item).astype(np.float32).reshape((len(records), 2) + tuple(shape))
    return {'x': values[:, 0], 'std': values[:, 1], 'label': labels}


# ----------------------------------------------------------------------------------------------------------
# Normalisation


@dataclasses.dataclass(frozen=True)
class LatentNorm:
    """``x = (z - mean) / std * scale`` per channel (last axis), and its inverse."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    scale: float = DEFAULT_SCALE

    def __post_init__(self):
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f'latent mean {self.mean} and std {self.std} must have one value per channel')
        if min(self.std) <= 0 or self.scale <= 0:
            raise ValueError(f'latent std {self.std} and scale {self.scale} must be positive')

    def to_model(self, z):
        """Raw latents -> model space (numpy or jax arrays, channels last)."""
        mean, factor = np.float32(self.mean), np.float32(self.scale) / np.float32(self.std)
        return (z - mean) * factor

    def to_raw(self, x):
        """Model space -> raw latents (the decoder's input)."""
        mean, factor = np.float32(self.mean), np.float32(self.std) / np.float32(self.scale)
        return x * factor + mean


def _floats(value) -> tuple[float, ...]:
    return tuple(float(v) for v in (value or ()))


def latent_norm(data_cfg) -> LatentNorm:
    """The normalisation of ``config.data``: explicit ``latent_mean``/``latent_std`` if set, else the
    statistics measured on the encoded dataset at ``config.data.path`` (for ``name='latents'``), else the
    paper's ImageNet values; ``latent_scale`` (default 0.5)."""
    mean = _floats(cfg_get(data_cfg, 'latent_mean', None))
    std = _floats(cfg_get(data_cfg, 'latent_std', None))
    scale = float(cfg_get(data_cfg, 'latent_scale', None) or DEFAULT_SCALE)
    if bool(mean) != bool(std):
        raise ValueError('config.data.latent_mean and config.data.latent_std must be set together '
                         f'(got {mean} and {std}).')
    if not mean:
        if cfg_get(data_cfg, 'name') == 'latents':
            stats = dataset_stats(_dataset_dir(data_cfg))
            mean, std = stats['mean'], stats['std']
        else:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
    return LatentNorm(tuple(mean), tuple(std), scale)


# ----------------------------------------------------------------------------------------------------------
# The encoded dataset on disk


def _dataset_dir(data_cfg) -> str:
    path_cfg = cfg_get(data_cfg, 'path')
    if not path_cfg:
        raise ValueError('config.data.path is empty; for config.data.name=\'latents\' it must be the --out '
                         'folder of python -m imm_jax.encode.')
    return os.path.abspath(os.path.expanduser(str(path_cfg)))


def read_metadata(path: str) -> dict[str, Any]:
    """``latents.json`` of an encoded dataset, with a clear error when the folder is not one."""
    meta_file = os.path.join(path, METADATA)
    if not os.path.isfile(meta_file):
        raise FileNotFoundError(f'{path} is not an encoded latent dataset (no {METADATA}); create it with '
                                f'python -m imm_jax.encode --data IMAGES --vae VAE_DIR --out {path}')
    with open(meta_file) as f:
        meta = json.load(f)
    if meta.get('format') != FORMAT or int(meta.get('version', 0)) > VERSION:
        raise ValueError(f'{meta_file}: not a {FORMAT} v{VERSION} dataset (format {meta.get("format")!r}, '
                         f'version {meta.get("version")!r})')
    return meta


def _check_complete(path: str, meta: dict[str, Any]) -> list[str]:
    files = [os.path.join(path, s['file']) for s in meta['shards']]
    missing = [os.path.basename(f) for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(
            f'{path}: {len(missing)} of {len(files)} latent shards are not written yet (e.g. {missing[0]}); '
            f'finish the encoding (rerunning python -m imm_jax.encode with the same arguments resumes it).')
    return files


def dataset_stats(path: str) -> dict[str, list[float]]:
    """Per-channel mean and std of the raw latents ``mean + std * N(0, 1)`` over the whole dataset."""
    meta = read_metadata(path)
    files = _check_complete(path, meta)
    return _stats_cached(tuple(files), tuple(os.path.getmtime(f + STATS_SUFFIX) for f in files))


@functools.lru_cache(maxsize=8)
def _stats_cached(files: tuple[str, ...], mtimes: tuple[float, ...]) -> dict[str, list[float]]:
    del mtimes
    count, s1, s2 = 0, 0.0, 0.0
    for f in files:
        with open(f + STATS_SUFFIX) as fh:
            st = json.load(fh)
        count += int(st['count'])
        s1 = s1 + np.asarray(st['sum'], np.float64)
        s2 = s2 + np.asarray(st['sum_sq'], np.float64)
    mean = s1 / count
    std = np.sqrt(np.maximum(s2 / count - mean ** 2, 1e-12))
    return {'mean': mean.tolist(), 'std': std.tolist()}


def shard_stats(mean: np.ndarray, std: np.ndarray) -> dict[str, Any]:
    """Per-channel sums over (N, H, W) of E[z] and E[z^2] for z = mean + std * N(0, 1)."""
    m = mean.astype(np.float64).reshape(-1, mean.shape[-1])
    s = std.astype(np.float64).reshape(-1, std.shape[-1])
    return {'count': int(m.shape[0]), 'sum': m.sum(0).tolist(), 'sum_sq': (m ** 2 + s ** 2).sum(0).tolist()}


class LatentRecordSource(sources.RecordSource):
    """Random access to the records of an encoded dataset (ArrayRecord shards, opened lazily per process)."""

    def __init__(self, files: Sequence[str], shape: tuple[int, ...], dtype: str, num_records: int):
        self._files = list(files)
        self._shape = tuple(shape)
        self._dtype = dtype
        self._len = int(num_records)
        self._source = None

    def __getstate__(self):
        return dict(self.__dict__, _source=None)

    def _open(self):
        if self._source is None:
            import grain  # pylint: disable=import-outside-toplevel
            self._source = grain.sources.ArrayRecordDataSource(self._files)
            if len(self._source) != self._len:
                raise ValueError(f'the latent shards hold {len(self._source)} records but {METADATA} says '
                                 f'{self._len}')
        return self._source

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        batch = self.gather(np.array([index]))
        return {k: v[0] for k, v in batch.items()}

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        source = self._open()
        indices = [int(i) for i in indices]
        records = source.__getitems__(indices) if hasattr(source, '__getitems__') else [source[i] for i in indices]
        return decode_records(records, self._shape, self._dtype)


# ----------------------------------------------------------------------------------------------------------
# Per-example sampling (a grain random map) and the conversion to model space


class SampleLatents:
    """``x = mean + std * N(0, 1)`` for each row of a batch ``{'x': mean, 'std', 'label'}``; drops ``std``.

    Seed-deterministic and independent of the number of hosts: grain seeds ``rng`` by the batch index (the
    same on every process); one integer drawn from it and the row's index in the *global* batch key a
    Philox stream per row, so row ``r`` of global batch ``b`` gets the same noise whatever process reads it.
    """

    def __init__(self, global_batch: int, rows: tuple[int, int]):
        self._global_batch = int(global_batch)
        self._start = int(rows[0])

    def __call__(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        if 'std' not in batch:
            return batch
        base = int(rng.integers(0, 2 ** 63, dtype=np.int64))
        mean, std = batch['x'], batch['std']
        x = np.empty(mean.shape, np.float32)
        for i in range(len(mean)):
            gen = np.random.Generator(np.random.Philox(key=np.array([base, self._start + i], np.uint64)))
            x[i] = mean[i] + std[i] * gen.standard_normal(mean.shape[1:], np.float32)
        out = {k: v for k, v in batch.items() if k != 'std'}
        out['x'] = x
        return out


def sample_latents_transform(global_batch: int, rows: tuple[int, int]) -> SampleLatents:
    """The ``ResolvedDataset.random_transform`` of latent datasets."""
    return SampleLatents(global_batch, rows)


class LatentsToModelSpace:
    """Batch of raw latents -> model space. Records not sampled by :class:`SampleLatents` (the held-out set,
    or a pipeline without the random transform) still carry ``std`` and use the posterior mean."""

    def __init__(self, norm: LatentNorm):
        self._norm = norm

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = self._norm.to_model(np.asarray(batch['x'], np.float32)).astype(np.float32)
        return {'x': x, 'label': np.asarray(batch['label'], np.int32)}


def resolve_latents(cfg) -> ResolvedDataset:
    """``config.data.name = 'latents'``: ``config.data.path`` is an encoded dataset folder."""
    path = _dataset_dir(cfg)
    if not os.path.isdir(path):
        raise FileNotFoundError(f'config.data.path={cfg_get(cfg, "path")!r}: {path} does not exist; create '
                                f'it with python -m imm_jax.encode --data IMAGES --vae VAE_DIR --out {path}')
    meta = read_metadata(path)
    files = _check_complete(path, meta)
    fraction = float(cfg_get(cfg, 'holdout_fraction', 0.0))
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f'config.data.holdout_fraction must be in [0, 1), got {fraction}.')
    shape = tuple(int(d) for d in meta['latent_shape'])
    n = int(meta['num_records'])
    source = LatentRecordSource(files, shape, meta['dtype'], n)
    num_holdout = int(round(fraction * n))
    if num_holdout >= n:
        raise ValueError(f'config.data.holdout_fraction={fraction} leaves no training records out of {n} '
                         f'in {path}.')
    train_idx, eval_idx = sources.fixed_split(n, num_holdout)
    norm = latent_norm(cfg)
    if len(norm.mean) != shape[-1]:
        raise ValueError(f'config.data.latent_mean/latent_std have {len(norm.mean)} channels but the latents '
                         f'in {path} have {shape[-1]}.')
    base = os.path.basename(path.rstrip(os.sep)) or path
    return ResolvedDataset(
        info=DataInfo(shape=shape, num_classes=int(meta['num_classes']), kind='latent', name=f'latents/{base}'),
        train=sources.SubsetSource(source, train_idx),
        holdout=sources.SubsetSource(source, eval_idx),
        to_model_space=LatentsToModelSpace(norm),
        reads_files=True,
        x_flip=bool(cfg_get(cfg, 'x_flip', False)),
        random_transform=sample_latents_transform,
    )


# ----------------------------------------------------------------------------------------------------------
# Decoding


def decode_latents(vae, latents, norm: LatentNorm | None = None, *, batch_size: int = 64) -> np.ndarray:
    """Model-space latents (N, h, w, C) -> uint8 RGB images (N, H, W, 3) through the VAE decoder.

    ``vae`` is an :class:`imm_jax.vae.VAE` (module + params); ``norm`` defaults to the paper's ImageNet
    normalisation. Runs in jitted batches of ``batch_size`` (the last one padded)."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    norm = norm or LatentNorm()
    latents = np.asarray(latents, np.float32)
    if latents.ndim != 4 or latents.shape[-1] != vae.config.latent_channels:
        raise ValueError(f'latents have shape {latents.shape}; expected (N, h, w, '
                         f'{vae.config.latent_channels}) channels-last')
    decode = _jitted_decoder(vae.module)
    out = []
    for start in range(0, len(latents), batch_size):
        chunk = latents[start:start + batch_size]
        n = len(chunk)
        if n < batch_size and len(latents) > batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
        y = decode(vae.params, jnp.asarray(norm.to_raw(chunk)))
        out.append(np.asarray(jax.device_get(y))[:n])
    if not out:
        size = latents.shape[1] * vae.config.downsample_factor
        return np.zeros((0, size, size, vae.config.out_channels), np.uint8)
    return np.concatenate(out)


@functools.lru_cache(maxsize=4)
def _jitted_decoder(module):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    def fn(params, z):
        y = module.apply({'params': params}, z, method=type(module).decode)
        return jnp.clip(jnp.round((y.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    return jax.jit(fn)


def vae_path_for(data_cfg, vae_path: str | None = None) -> str:
    """Which VAE decodes this data: ``vae_path``, else ``config.data.vae``, else the VAE the dataset at
    ``config.data.path`` was encoded with (recorded in its ``latents.json``); '' when none is known."""
    if vae_path:
        return str(vae_path)
    configured = cfg_get(data_cfg, 'vae', None)
    if configured:
        return str(configured)
    if cfg_get(data_cfg, 'name', None) == 'latents' and cfg_get(data_cfg, 'path', None):
        try:
            return str(read_metadata(_dataset_dir(data_cfg)).get('vae', {}).get('source', ''))
        except (OSError, ValueError):
            return ''
    return ''


def latent_decoder(data_cfg, vae_path: str | None = None, *, download: bool = False,
                   batch_size: int = 64, option: str = '--vae') -> Callable[[np.ndarray], np.ndarray]:
    """``decode(latents) -> uint8 images`` for the latents of ``config.data`` (normalisation from
    :func:`latent_norm`, VAE from :func:`vae_path_for`). Raises :class:`imm_jax.vae.MissingVAEWeights`
    (one line saying how to get the weights and to pass ``option``) when no VAE is found."""
    from imm_jax import vae as vae_lib  # pylint: disable=import-outside-toplevel

    vae = vae_lib.load_vae(vae_path_for(data_cfg, vae_path), download=download, option=option)
    norm = latent_norm(data_cfg)
    return functools.partial(decode_latents, vae, norm=norm, batch_size=batch_size)


def maybe_latent_decoder(data_cfg, vae_path: str | None = None, **kwargs) -> Callable | None:
    """:func:`latent_decoder`, or None (with a warning) when the VAE weights are not available."""
    from imm_jax import vae as vae_lib  # pylint: disable=import-outside-toplevel

    try:
        return latent_decoder(data_cfg, vae_path, **kwargs)
    except (vae_lib.MissingVAEWeights, FileNotFoundError, ValueError) as e:
        log.warning('latent samples will not be decoded: %s', e)
        return None


def list_shards(path: str) -> list[str]:
    """The finished shard files of an encoded dataset folder (for tools and tests)."""
    return sorted(glob.glob(os.path.join(path, '*.array_record')))
