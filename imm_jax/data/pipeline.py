"""Grain training pipeline, held-out sets and conversions.

The training pipeline is a ``grain.MapDataset`` whose element ``b`` is batch ``b`` of an infinite stream,
so that its position is one integer and the iterator is checkpointable (``get_state``/``set_state``, or
``grain.checkpoint.CheckpointSave``/``CheckpointRestore`` through orbax)::

    MapDataset.source(ShuffledBatchIndices(len(train), global_batch, seed, rows))  # this process' record ids
      .map(GatherRecords(train))                                  # reads only those records
      .random_map(random_transform(global_batch, rows))           # the dataset's own, if any (latents)
      .random_map(RandomXFlip(global_batch, rows))                # images with config.data.x_flip only
      .map(to_model_space)                                        # uint8 -> float32 [-1, 1] per batch
      .to_iter_dataset(ReadOptions)                               # reader threads + prefetch buffer
      [.mp_prefetch(worker_count)]                                # worker processes when worker_count > 0

Many hosts: the global batch ``B = process_count * local_batch_size`` is defined once, by the seed, as
if one process read it; process ``i`` yields its rows ``[i * B / n, (i + 1) * B / n)`` and gathers only
those records. Random stages draw for the whole global batch (grain seeds them by the batch index) and
keep their rows. So a run on n hosts sees exactly the batches (flips, latent draws) of a run on one host
with the same global batch, and ``parallel.global_batch`` reassembles them in process order.

Why not ``.shuffle(seed).repeat().batch(b)``: in grain 0.2.18 every record then pays grain's per-element
bookkeeping (~25 us per stage: prometheus metrics, byte-size estimates) and ``index_shuffle`` (50 us per
record on 1500 records, 1.7 ms on 40), i.e. ~33 ms per 256-digit batch and ~90 ms per 1024-point toy
batch, held under the GIL. Here the shuffle is one numpy permutation per epoch (seeded by ``(seed,
epoch)``, so every epoch is reshuffled and the stream depends only on the seed) and in-memory data is
gathered with one fancy-indexing call per batch. Semantics are those of shuffle -> repeat -> batch with
``drop_remainder``: consecutive batches run through the epochs back to back.

``config.data.prefetch_buffer`` is the number of batches prepared ahead (per worker process when
``worker_count > 0``); 0 reads synchronously in the calling thread. Reader threads (each builds whole
batches): 1 for in-memory data, 4 for data decoded from files (folders, TFDS).
"""

from __future__ import annotations

import concurrent.futures
import sys
import threading

import grain
import numpy as np

from imm_jax.data import sources
from imm_jax.data.sources import DataInfo, cfg_get

_FILE_READER_THREADS = 4


def get_info(data_cfg) -> DataInfo:
    """Shape (model space), number of classes, kind and name of the dataset in ``config.data``."""
    return sources.resolve(data_cfg).info


class ShuffledBatchIndices:
    """Random-access source whose element ``b`` holds this process' record ids of global batch ``b``.

    The ids of the global batches (``batch_size`` each) run through an infinite sequence of epochs, each a
    fresh permutation of ``range(num_records)`` drawn from ``np.random.default_rng([seed, epoch])``;
    element ``b`` is rows ``rows = (start, stop)`` of global batch ``b`` (all of it by default).
    """

    def __init__(self, num_records: int, batch_size: int, seed: int, rows: tuple[int, int] | None = None):
        self._n = int(num_records)
        self._batch_size = int(batch_size)
        self._seed = int(seed)
        self._rows = (0, self._batch_size) if rows is None else (int(rows[0]), int(rows[1]))
        if not 0 <= self._rows[0] < self._rows[1] <= self._batch_size:
            raise ValueError(f'rows={self._rows} must be a non-empty range within the batch of {batch_size}.')
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        return {'n': self._n, 'batch_size': self._batch_size, 'seed': self._seed, 'rows': self._rows}

    def __setstate__(self, state):
        self.__init__(state['n'], state['batch_size'], state['seed'], state['rows'])

    def __len__(self) -> int:
        return sys.maxsize // self._batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self._seed, epoch]).permutation(self._n)
                self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # keep ~2 epochs
                self._perms[epoch] = perm
            return perm

    def __getitem__(self, index: int) -> np.ndarray:
        start, stop = self._rows
        positions = index * self._batch_size + np.arange(start, stop, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self._n)
        ids = np.empty(stop - start, np.int64)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            ids[in_epoch] = self._permutation(int(epoch))[offsets[in_epoch]]
        return ids


class GatherRecords:
    """Batch of record ids -> ``{'x': stacked, 'label': int32}``."""

    def __init__(self, source: sources.RecordSource):
        self._source = source

    def __call__(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        return self._source.gather(ids)


class RandomXFlip:
    """Mirrors each image (NHWC) along W with probability 1/2.

    The coin flips are drawn for the whole global batch (grain seeds ``rng`` by the batch index, the same
    on every process) and this process keeps its rows', so flips do not depend on the number of hosts.
    """

    def __init__(self, batch_size: int, rows: tuple[int, int]):
        self._batch_size = int(batch_size)
        self._start = int(rows[0])

    def __call__(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        n = len(batch['x'])
        flip = rng.random(self._batch_size)[self._start:self._start + n] < 0.5
        x = batch['x'].copy()
        x[flip] = x[flip, :, ::-1]
        return dict(batch, x=x)


def _derived_seeds(seed: int, n: int) -> list[int]:
    """Independent seeds for the pipeline's random stages (shuffle, flips, the dataset's random transform)
    from the run seed; a longer list keeps the first seeds unchanged."""
    return [int(s) for s in np.random.SeedSequence(int(seed)).generate_state(n, np.uint32)]


def create_train_iterator(data_cfg, *, local_batch_size: int, seed: int, process_index: int = 0,
                          process_count: int = 1) -> grain.DatasetIterator:
    """Infinite, shuffled, checkpointable iterator over this process' rows of the global batches.

    Yields ``{'x': float32 (local_batch_size, *info.shape), 'label': int32 (local_batch_size,)}`` in model
    space; labels are 0 for unlabeled data. Same seed, same batches. With ``process_count = n`` the global
    batch is ``B = n * local_batch_size`` and process ``i`` yields rows ``[i * B / n, (i + 1) * B / n)``
    of the batch that ``process_count=1, local_batch_size=B`` yields (all processes use the same seed),
    reading only its own records. Call ``close()`` on the iterator when done with it if it uses worker
    processes.
    """
    if local_batch_size <= 0:
        raise ValueError(f'local_batch_size must be positive, got {local_batch_size}.')
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index={process_index} must be in [0, process_count={process_count}).')
    worker_count = int(cfg_get(data_cfg, 'worker_count', 0))
    prefetch_buffer = int(cfg_get(data_cfg, 'prefetch_buffer'))
    if worker_count < 0 or prefetch_buffer < 0:
        raise ValueError(f'config.data.worker_count={worker_count} and config.data.prefetch_buffer='
                         f'{prefetch_buffer} must be >= 0.')
    data = sources.resolve(data_cfg)
    shuffle_seed, flip_seed, transform_seed = _derived_seeds(seed, 3)

    global_batch = local_batch_size * process_count
    rows = (process_index * local_batch_size, (process_index + 1) * local_batch_size)
    ds = grain.MapDataset.source(ShuffledBatchIndices(len(data.train), global_batch, shuffle_seed, rows))
    ds = ds.map(GatherRecords(data.train))
    random_transform = getattr(data, 'random_transform', None)
    if random_transform is not None:  # e.g. latents: z = mean + std * N(0, 1) per global-batch row
        ds = ds.random_map(random_transform(global_batch, rows), seed=transform_seed)
    if data.x_flip:
        ds = ds.random_map(RandomXFlip(global_batch, rows), seed=flip_seed)
    ds = ds.map(data.to_model_space)

    threads = 0 if prefetch_buffer == 0 else (_FILE_READER_THREADS if data.reads_files else 1)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch_buffer))
    if worker_count > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=worker_count, per_worker_buffer_size=max(prefetch_buffer, 1)))
        # Batches arrive in grain's shared-memory arrays, unlinked when garbage collected; a copy into
        # ordinary arrays keeps their lifetime independent of grain (one memcpy per batch).
        it_ds = it_ds.map(_copy_out_of_shared_memory)
    return iter(it_ds)


def _copy_out_of_shared_memory(batch: dict) -> dict:
    return {k: np.array(v) for k, v in batch.items()}


def _ensure_absl_flags_parsed() -> None:
    # grain's worker processes read absl flags; a library caller (tests, notebooks) may never parse them.
    from absl import flags  # pylint: disable=import-outside-toplevel

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def load_eval_set(data_cfg, num: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``num`` held-out examples ``(x float32 model space, labels int32)``, disjoint from training.

    The held-out pool is fixed (digits/toy2d: ``config.data.holdout`` examples; images:
    ``config.data.holdout_fraction`` of the files; tfds: ``config.data.eval_split``). When ``num`` is
    smaller than the pool, ``seed`` picks which examples (returned in pool order); otherwise the whole pool.
    """
    if num <= 0:
        raise ValueError(f'num must be positive, got {num}.')
    data = sources.resolve(data_cfg, need_train=False, need_eval=True)
    pool = data.holdout
    if len(pool) == 0:
        name = cfg_get(data_cfg, 'name')
        if name == 'tfds':
            raise ValueError(f'{data.info.name}: config.data.eval_split={cfg_get(data_cfg, "eval_split")!r} '
                             'is empty.')
        key = 'holdout_fraction' if name == 'images' else 'holdout'
        raise ValueError(f'{data.info.name}: no held-out examples (config.data.{key} is 0).')
    return _distinct_examples(data, pool, num, seed)


def load_train_examples(data_cfg, num: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``num`` distinct training examples ``(x float32 model space, labels int32)``, unaugmented:
    a real set to compare with the held-out one (the floor of a sample-quality figure). Unlike a batch
    of :func:`create_train_iterator`, which wraps into a second epoch, no example appears twice (exact
    repeats would make a set look farther from the held-out one than model samples, which never repeat)."""
    if num <= 0:
        raise ValueError(f'num must be positive, got {num}.')
    data = sources.resolve(data_cfg, need_train=True, need_eval=False)
    return _distinct_examples(data, data.train, num, seed)


def _distinct_examples(data, pool, num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``min(num, len(pool))`` examples of ``pool`` without replacement (``seed`` picks them; all of
    them, in pool order, when ``num`` covers the pool), in model space."""
    if num >= len(pool):
        indices = np.arange(len(pool))
    else:
        indices = np.sort(np.random.default_rng(seed).choice(len(pool), size=num, replace=False))
    if data.reads_files:  # decode files in parallel, 256 at a time
        chunks = np.array_split(indices, max(1, len(indices) // 256))
        with concurrent.futures.ThreadPoolExecutor(_FILE_READER_THREADS) as executor:
            parts = list(executor.map(pool.gather, chunks))
        batch = {k: np.concatenate([p[k] for p in parts]) for k in ('x', 'label')}
    else:
        batch = pool.gather(indices)
    batch = data.to_model_space(batch)
    return batch['x'], batch['label']


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Model-space images in [-1, 1] -> uint8 (clipped, rounded); NHWC stays NHWC."""
    x = np.asarray(x, np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
