"""Random-access data sources behind the grain pipelines, and the dataset registry.

Every training/eval source is an index-able sequence of records ``{'x': array, 'label': np.int32}`` whose
``x`` already has the final spatial size: either uint8 HWC images (converted to model space per batch,
after batching, so that prefetch buffers and worker pipes carry bytes instead of floats) or float32
arrays already in model space (the digits and toy points). Sources are small picklable classes so that
grain worker processes can rebuild them; file-backed ones reopen their files lazily in each process.

Datasets (``config.data.name``):

* ``'digits'``: scikit-learn's 1797 8x8 handwritten digits (shipped inside the wheel, no download), values
  0..16 mapped to [-1, 1] by ``v / 16 * 2 - 1`` and upsampled to ``image_size`` with PIL BILINEAR on
  float32 images, 1 channel, 10 classes. A fixed, seed-independent permutation holds out ``holdout`` images.
* ``'toy2d'``: 2-D points from :mod:`imm_jax.data.toy2d` (std ~0.5 per coordinate). The training set is
  ``toy_size`` points drawn once from a fixed internal stream, the held-out set ``holdout`` points from
  another; neither is reproducible through ``sample_toy2d``'s public seeds.
* ``'images'``: a folder of images (recursive; >= 2 top-level subfolders holding all the images are
  classes, sorted by name) or a ``.npy``/``.npz`` array of uint8 images. A fixed fraction
  ``holdout_fraction`` is held out by a fixed permutation.
* ``'tfds'``: ``tfds.data_source`` (ArrayRecord, no TensorFlow), features ``'image'`` and ``'label'``.
* ``'latents'``: SD-VAE latents pre-encoded by ``python -m imm_jax.encode`` (``path`` = its ``--out``
  folder), see :mod:`imm_jax.data.latents`: records hold the posterior mean and std; a random transform
  draws ``mean + std * N(0, 1)`` per example and ``to_model_space`` normalises it per channel (x 0.5).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from imm_jax.data import toy2d

DATASET_NAMES = ('digits', 'toy2d', 'images', 'tfds', 'latents')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')

# Fixed seeds of the held-out splits: they must not depend on the training seed, so that the held-out
# set stays disjoint from the training records whatever seed a run uses.
_SPLIT_SEED = 0
_TOY_TRAIN_STREAM = 1
_TOY_EVAL_STREAM = 2

_REQUIRED = object()
_GRAY_MODES = frozenset({'1', 'L', 'LA', 'La', 'I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F'})


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What the model needs to know about a dataset."""

    shape: tuple[int, ...]  # per-example shape in model space: (H, W, C) for images, (2,) for toy2d
    num_classes: int  # 0 if the dataset has no labels
    kind: str  # 'image' or 'points'
    name: str


@dataclasses.dataclass(frozen=True)
class ResolvedDataset:
    """A dataset resolved from ``config.data``: its info, its train/held-out sources, its batch decoder."""

    info: DataInfo
    train: RecordSource | None  # None when not asked for (tfds)
    holdout: RecordSource | None
    to_model_space: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    reads_files: bool  # decoding happens per record (worth a few reader threads)
    x_flip: bool
    # Optional per-batch random step applied by the training pipeline right after the records are gathered
    # (before flips and to_model_space): ``random_transform(global_batch, rows)`` returns a grain random map
    # ``(batch, rng) -> batch`` (rng seeded by the batch index; rows = this process' rows of the global batch).
    random_transform: Callable[[int, tuple[int, int]], Callable[[dict, np.random.Generator], dict]] | None = None


# ----------------------------------------------------------------------------------------------------------
# Config access


def cfg_get(cfg, key: str, default: Any = _REQUIRED) -> Any:
    """Reads ``config.data.<key>``; a missing required field raises a ValueError naming it."""
    if key in cfg:
        return cfg[key]
    if default is _REQUIRED:
        name = cfg['name'] if 'name' in cfg else None
        raise ValueError(f'config.data.{key} is required for config.data.name={name!r} but is not set.')
    return default


def _positive_int(cfg, key: str) -> int:
    value = cfg_get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f'config.data.{key} must be a positive integer, got {value!r}.')
    return int(value)


# ----------------------------------------------------------------------------------------------------------
# Batch conversion to model space


def uint8_batch_to_model_space(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """uint8 pixels -> float32 in [-1, 1] (pixel / 255 * 2 - 1)."""
    return {
        'x': batch['x'].astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0),
        'label': np.asarray(batch['label'], np.int32),
    }


def float_batch_to_model_space(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Records that are already in model space (digits, toy points): only fix dtypes."""
    return {'x': np.asarray(batch['x'], np.float32), 'label': np.asarray(batch['label'], np.int32)}


# ----------------------------------------------------------------------------------------------------------
# Generic sources


class RecordSource:
    """Random access to records; ``gather`` reads a whole batch (overridden where it can be vectorised)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        records = [self[int(i)] for i in indices]
        return {
            'x': np.stack([r['x'] for r in records]),
            'label': np.array([r['label'] for r in records], np.int32),
        }


class ArraySource(RecordSource):
    """In-memory records ``x[i]``, ``labels[i]`` (labels 0 when None)."""

    def __init__(self, x: np.ndarray, labels: np.ndarray | None = None):
        self._x = x
        self._labels = labels

    def __len__(self) -> int:
        return len(self._x)

    def __getitem__(self, index: int) -> dict[str, Any]:
        label = 0 if self._labels is None else self._labels[index]
        return {'x': self._x[index], 'label': np.int32(label)}

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        labels = np.zeros(len(indices), np.int32) if self._labels is None else self._labels[indices]
        return {'x': self._x[indices], 'label': np.asarray(labels, np.int32)}


class SubsetSource(RecordSource):
    """The records ``base[indices[i]]``."""

    def __init__(self, base: RecordSource, indices: np.ndarray):
        self._base = base
        self._indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._base[int(self._indices[index])]

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return self._base.gather(self._indices[np.asarray(indices, np.int64)])


def fixed_split(n: int, num_holdout: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, holdout) index arrays, each sorted: a fixed permutation, independent of any run seed."""
    perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
    return np.sort(perm[num_holdout:]), np.sort(perm[:num_holdout])


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Crops the central square and resizes it to ``size`` (BICUBIC, antialiased when shrinking)."""
    w, h = image.size
    if (w, h) == (size, size):
        return image
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        image = image.crop((left, top, left + s, top + s))
    return image.resize((size, size), Image.Resampling.BICUBIC)


def resize_uint8(x: np.ndarray, size: int) -> np.ndarray:
    """uint8 HWC -> uint8 (size, size, C), via :func:`center_crop_resize` (no-op at the right size)."""
    if x.shape[0] == size and x.shape[1] == size:
        return x
    image = Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x)
    out = np.asarray(center_crop_resize(image, size), np.uint8)
    return out[..., None] if out.ndim == 2 else out


# ----------------------------------------------------------------------------------------------------------
# digits


@functools.lru_cache(maxsize=4)
def _digits_arrays(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0  # (1797, 8, 8) in [-1, 1]
    if image_size != images.shape[1]:
        images = np.stack([
            np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.Resampling.BILINEAR))
            for im in images
        ])
    images = np.clip(images, -1.0, 1.0).astype(np.float32)[..., None]
    images.setflags(write=False)
    return images, digits.target.astype(np.int32)


def _digits(cfg) -> ResolvedDataset:
    image_size = _positive_int(cfg, 'image_size')
    holdout = int(cfg_get(cfg, 'holdout'))
    x, labels = _digits_arrays(image_size)
    if not 0 <= holdout < len(x):
        raise ValueError(f'config.data.holdout must be in [0, {len(x)}) for the digits, got {holdout}.')
    train_idx, eval_idx = fixed_split(len(x), holdout)
    return ResolvedDataset(
        info=DataInfo(shape=(image_size, image_size, 1), num_classes=10, kind='image', name='digits'),
        train=ArraySource(x[train_idx], labels[train_idx]),
        holdout=ArraySource(x[eval_idx], labels[eval_idx]),
        to_model_space=float_batch_to_model_space,
        reads_files=False,
        x_flip=bool(cfg_get(cfg, 'x_flip')),
    )


# ----------------------------------------------------------------------------------------------------------
# toy2d


@functools.lru_cache(maxsize=8)
def _toy_points(toy: str, n: int, stream: int) -> np.ndarray:
    # A separate stream of SeedSequence keeps these sets apart from every public sample_toy2d(seed).
    rng = np.random.default_rng(np.random.SeedSequence([_SPLIT_SEED, toy2d.TOY_NAMES.index(toy), stream]))
    points = toy2d._SAMPLERS[toy](n, rng).astype(np.float32)  # pylint: disable=protected-access
    points.setflags(write=False)
    return points


def _toy2d(cfg) -> ResolvedDataset:
    toy = cfg_get(cfg, 'toy')
    if toy not in toy2d.TOY_NAMES:
        raise ValueError(f'config.data.toy={toy!r} is not valid; choose one of {", ".join(toy2d.TOY_NAMES)}.')
    size = _positive_int(cfg, 'toy_size')
    holdout = int(cfg_get(cfg, 'holdout'))
    if holdout < 0:
        raise ValueError(f'config.data.holdout must be >= 0, got {holdout}.')
    return ResolvedDataset(
        info=DataInfo(shape=(2,), num_classes=0, kind='points', name=f'toy2d/{toy}'),
        train=ArraySource(_toy_points(toy, size, _TOY_TRAIN_STREAM)),
        holdout=ArraySource(_toy_points(toy, holdout, _TOY_EVAL_STREAM)),
        to_model_space=float_batch_to_model_space,
        reads_files=False,
        x_flip=False,
    )


# ----------------------------------------------------------------------------------------------------------
# images: folders and .npy/.npz arrays

_EXPECTED = (
    'a folder of images (png/jpg/jpeg/bmp/webp, optionally in class subfolders), a .npy of uint8 NHWC '
    '(or NHW) images, or a .npz with uint8 NHWC images under "images"/"x" (optional "labels"/"y")'
)


class ImageFolderSource(RecordSource):
    """Decodes image files on access: RGB (RGBA/palette -> RGB) or grayscale, center crop, resize."""

    def __init__(self, files: Sequence[str], labels: np.ndarray | None, channels: int, image_size: int):
        self._files = list(files)
        self._labels = labels
        self._mode = 'L' if channels == 1 else 'RGB'
        self._size = image_size

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self._files[index]
        try:
            with Image.open(path) as image:
                image = center_crop_resize(image.convert(self._mode), self._size)
                x = np.asarray(image, np.uint8)
        except OSError as e:
            raise ValueError(f'config.data.path: cannot read image {path}: {e}') from e
        if x.ndim == 2:
            x = x[..., None]
        label = 0 if self._labels is None else self._labels[index]
        return {'x': x, 'label': np.int32(label)}


def _list_image_folder(root: str, path_cfg: str) -> tuple[list[str], np.ndarray | None, list[str]]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
        files.extend(
            os.path.join(dirpath, f)
            for f in sorted(filenames)
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.')
        )
    if not files:
        raise ValueError(
            f'config.data.path={path_cfg!r}: the folder {root} holds no image files; expected {_EXPECTED}.'
        )
    tops = [os.path.relpath(f, root).split(os.sep) for f in files]
    class_names = sorted({parts[0] for parts in tops if len(parts) > 1})
    if all(len(parts) > 1 for parts in tops) and len(class_names) >= 2:
        index = {name: i for i, name in enumerate(class_names)}
        return files, np.array([index[parts[0]] for parts in tops], np.int32), class_names
    return files, None, []


@functools.lru_cache(maxsize=2)
def _load_array_file(path: str, mtime: float) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(images NHWC uint8 as stored or memory-mapped, labels or None, array name)."""
    del mtime  # cache key only: a rewritten file is reloaded
    labels = None
    try:
        if path.endswith('.npy'):
            x, key = np.load(path, mmap_mode='r', allow_pickle=False), 'the array'
        else:
            with np.load(path, allow_pickle=False) as z:
                names = list(z.files)
                if not names:
                    raise ValueError('the .npz holds no arrays')
                key = next((k for k in ('images', 'x') if k in names), None)
                key = key or next((k for k in names if k not in ('labels', 'y')), names[0])
                x = z[key]
                label_key = next((k for k in ('labels', 'y') if k in names), None)
                labels = None if label_key is None else z[label_key]
    except (OSError, ValueError) as e:
        raise ValueError(f'config.data.path: cannot read {path}: {e}; expected {_EXPECTED}.') from e
    return x, labels, key


def _check_array_file(path_cfg: str, path: str) -> tuple[np.ndarray, np.ndarray | None]:
    x, labels, key = _load_array_file(path, os.path.getmtime(path))
    what = key if key == 'the array' else f'array {key!r}'
    if x.dtype != np.uint8:
        raise ValueError(
            f'config.data.path={path_cfg!r}: {what} in {path} has dtype {x.dtype}; expected uint8 images '
            'NHWC (or NHW for grayscale) with values 0..255.'
        )
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3, 4)) or len(x) == 0:
        raise ValueError(
            f'config.data.path={path_cfg!r}: {what} in {path} has shape {x.shape}; expected uint8 images '
            'NHWC with C in {1, 3, 4} or NHW for grayscale, N >= 1.'
        )
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(x),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise ValueError(
                f'config.data.path={path_cfg!r}: labels in {path} have shape {labels.shape} and dtype '
                f'{labels.dtype}; expected non-negative integers of shape ({len(x)},).'
            )
        labels = labels.astype(np.int32)
    return x, labels


class ArrayFileSource(RecordSource):
    """Images from a .npy (memory-mapped) or .npz file, reopened lazily in each process."""

    def __init__(self, path: str, labels: np.ndarray | None, image_size: int):
        self._path = path
        self._labels = labels
        self._size = image_size
        self._len = len(_load_array_file(path, os.path.getmtime(path))[0])

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        images = _load_array_file(self._path, os.path.getmtime(self._path))[0]
        x = np.asarray(images[index])
        if x.ndim == 2:
            x = x[..., None]
        if x.shape[-1] == 4:  # RGBA -> RGB
            x = x[..., :3]
        x = np.ascontiguousarray(resize_uint8(x, self._size))
        label = 0 if self._labels is None else self._labels[index]
        return {'x': x, 'label': np.int32(label)}


def _images(cfg) -> ResolvedDataset:
    path_cfg = cfg_get(cfg, 'path')
    image_size = _positive_int(cfg, 'image_size')
    fraction = float(cfg_get(cfg, 'holdout_fraction'))
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f'config.data.holdout_fraction must be in [0, 1), got {fraction}.')
    if not path_cfg:
        raise ValueError(f'config.data.path is empty; expected {_EXPECTED}.')
    path = os.path.abspath(os.path.expanduser(str(path_cfg)))
    if not os.path.exists(path):
        raise FileNotFoundError(f'config.data.path={path_cfg!r}: {path} does not exist; expected {_EXPECTED}.')

    if os.path.isdir(path):
        files, labels, class_names = _list_image_folder(path, path_cfg)
        try:
            with Image.open(files[0]) as first:
                channels = 1 if first.mode in _GRAY_MODES else 3
        except OSError as e:
            raise ValueError(f'config.data.path={path_cfg!r}: cannot read image {files[0]}: {e}') from e
        source = ImageFolderSource(files, labels, channels, image_size)
        num_classes = len(class_names)
    elif path.endswith(('.npy', '.npz')):
        x, labels = _check_array_file(path_cfg, path)
        channels = 1 if x.ndim == 3 or x.shape[-1] == 1 else 3
        source = ArrayFileSource(path, labels, image_size)
        num_classes = 0 if labels is None else int(labels.max()) + 1
    else:
        raise ValueError(f'config.data.path={path_cfg!r}: {path} is neither a folder nor a .npy/.npz file; '
                         f'expected {_EXPECTED}.')

    n = len(source)
    num_holdout = int(round(fraction * n))
    if num_holdout >= n:
        raise ValueError(
            f'config.data.holdout_fraction={fraction} leaves no training images out of {n} in {path}.'
        )
    train_idx, eval_idx = fixed_split(n, num_holdout)
    base = os.path.basename(path.rstrip(os.sep)) or path
    return ResolvedDataset(
        info=DataInfo(shape=(image_size, image_size, channels), num_classes=num_classes, kind='image',
                      name=f'images/{base}'),
        train=SubsetSource(source, train_idx),
        holdout=SubsetSource(source, eval_idx),
        to_model_space=uint8_batch_to_model_space,
        reads_files=os.path.isdir(path),
        x_flip=bool(cfg_get(cfg, 'x_flip')),
    )


# ----------------------------------------------------------------------------------------------------------
# tfds


class TfdsSource(RecordSource):
    """Records of a ``tfds.data_source`` as ``{'x': uint8 HWC at image_size, 'label'}``."""

    def __init__(self, source: Sequence[dict[str, Any]], image_size: int, has_label: bool):
        self._source = source
        self._size = image_size
        self._has_label = has_label

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        x = np.asarray(record['image'], np.uint8)
        if x.ndim == 2:
            x = x[..., None]
        x = np.ascontiguousarray(resize_uint8(x, self._size))
        return {'x': x, 'label': np.int32(record['label'] if self._has_label else 0)}


def _open_tfds(name: str, split: str, data_dir: str | None, split_key: str):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    # download=False: never start a download from the training job. file_format='array_record' also when a
    # data_dir is given (tfds only defaults to it without one), since only ArrayRecord has random access.
    kwargs = dict(split=split, data_dir=data_dir, download=False, builder_kwargs={'file_format': 'array_record'})
    try:
        return tfds.data_source(name, **kwargs)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f'config.data.tfds_name={name!r} is not a registered TFDS dataset.') from e
    except Exception as e:  # pylint: disable=broad-except
        try:
            builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
            prepared, where = builder.is_prepared(), builder.data_dir
        except Exception:  # pylint: disable=broad-except
            prepared, where = False, (data_dir or '~/tensorflow_datasets')
        root = data_dir or os.path.dirname(os.path.dirname(where))
        how = (f'TFDS encodes images with TensorFlow, so prepare it on a machine with internet and TensorFlow: '
               f'pip install tensorflow tensorflow-datasets && tfds build {name} --data_dir {root} '
               f'--file_format=array_record, then copy {root} here and set config.data.tfds_data_dir')
        detail = ' '.join(str(e).split())
        if not prepared:
            raise FileNotFoundError(
                f'TFDS dataset {name!r} is not prepared: looked in {where} (config.data.tfds_data_dir='
                f'{data_dir!r}). {how}.'
            ) from e
        raise ValueError(
            f'TFDS dataset {name!r} at {where} cannot be read as config.data.{split_key}={split!r} in the '
            f'ArrayRecord format ({type(e).__name__}: {detail}). If it was built as TFRecord: {how}.'
        ) from e


def _tfds(cfg, *, need_train: bool = True, need_eval: bool = False) -> ResolvedDataset:
    name = cfg_get(cfg, 'tfds_name')
    data_dir = cfg_get(cfg, 'tfds_data_dir', None)
    image_size = _positive_int(cfg, 'image_size')
    split, eval_split = cfg_get(cfg, 'split'), cfg_get(cfg, 'eval_split')
    train_src = _open_tfds(name, split, data_dir, 'split') if need_train else None
    eval_src = _open_tfds(name, eval_split, data_dir, 'eval_split') if need_eval else None
    features = (train_src if train_src is not None else eval_src).dataset_info.features
    if 'image' not in features:
        raise ValueError(f'TFDS dataset {name!r} has no "image" feature (features: {list(features)}).')
    channels = features['image'].shape[-1]
    if channels not in (1, 3):
        raise ValueError(f'TFDS dataset {name!r}: image feature shape {features["image"].shape}; '
                         'expected 1 or 3 channels.')
    has_label = 'label' in features
    num_classes = int(getattr(features['label'], 'num_classes', 0) or 0) if has_label else 0
    wrap = lambda src: None if src is None else TfdsSource(src, image_size, has_label)  # noqa: E731
    return ResolvedDataset(
        info=DataInfo(shape=(image_size, image_size, int(channels)), num_classes=num_classes, kind='image',
                      name=f'tfds/{name}'),
        train=wrap(train_src),
        holdout=wrap(eval_src),
        to_model_space=uint8_batch_to_model_space,
        reads_files=True,
        x_flip=bool(cfg_get(cfg, 'x_flip')),
    )


# ----------------------------------------------------------------------------------------------------------


def resolve(data_cfg, *, need_train: bool = True, need_eval: bool = False) -> ResolvedDataset:
    """Builds the dataset named by ``config.data.name`` (tfds opens only the splits it is asked for)."""
    name = cfg_get(data_cfg, 'name')
    if name == 'digits':
        return _digits(data_cfg)
    if name == 'toy2d':
        return _toy2d(data_cfg)
    if name == 'images':
        return _images(data_cfg)
    if name == 'tfds':
        return _tfds(data_cfg, need_train=need_train, need_eval=need_eval)
    if name == 'latents':
        from imm_jax.data import latents  # pylint: disable=import-outside-toplevel

        return latents.resolve_latents(data_cfg)
    raise ValueError(f'config.data.name={name!r} is not valid; choose one of {", ".join(DATASET_NAMES)}.')
