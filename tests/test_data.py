"""Tests of imm_jax.data: grain pipelines over digits, toy 2-D points, image folders/arrays and TFDS (mocked)."""

import gc

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from imm_jax import data
from imm_jax.data import toy2d


def _cfg(**fields) -> ml_collections.ConfigDict:
    base = {'worker_count': 0, 'prefetch_buffer': 2}
    base.update(fields)
    return ml_collections.ConfigDict(base)


def _digits_cfg(**overrides):
    return _cfg(**{'name': 'digits', 'image_size': 16, 'holdout': 297, 'x_flip': False, **overrides})


def _toy_cfg(**overrides):
    return _cfg(**{'name': 'toy2d', 'toy': 'checkerboard', 'toy_size': 1000, 'holdout': 200, **overrides})


def _take(it, n):
    return [next(it) for _ in range(n)]


def _rows(x: np.ndarray) -> list[bytes]:
    """Each example as bytes, to compare collections of examples as multisets."""
    x = np.ascontiguousarray(x)
    return [row.tobytes() for row in x.reshape(len(x), -1)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p['x'], q['x'])
        np.testing.assert_array_equal(p['label'], q['label'])


# ---------------------------------------------------------------------------------------------------------
# digits


def test_digits_batches_shape_dtype_range_and_info():
    cfg = _digits_cfg()
    assert data.get_info(cfg) == data.DataInfo(shape=(16, 16, 1), num_classes=10, kind='image', name='digits')
    it = data.create_train_iterator(cfg, local_batch_size=32, seed=0)
    assert isinstance(it, grain.DatasetIterator)
    batch = next(it)
    assert set(batch) == {'x', 'label'}
    assert batch['x'].shape == (32, 16, 16, 1) and batch['x'].dtype == np.float32
    assert batch['label'].shape == (32,) and batch['label'].dtype == np.int32
    assert batch['x'].min() >= -1.0 and batch['x'].max() <= 1.0
    assert batch['x'].min() == -1.0 and batch['x'].max() > 0.9  # background -1, strokes bright
    assert set(batch['label'].tolist()) <= set(range(10)) and len(set(batch['label'].tolist())) > 3


def test_digits_native_size_values_are_v_over_16_and_upsampling_is_smooth():
    from sklearn.datasets import load_digits

    originals = set(_rows(load_digits().images.astype(np.float32) / 16.0 * 2.0 - 1.0))
    batch = next(data.create_train_iterator(_digits_cfg(image_size=8), local_batch_size=64, seed=1))
    assert batch['x'].shape == (64, 8, 8, 1)
    assert all(r in originals for r in _rows(batch['x'][..., 0]))

    x8, y8 = data.load_eval_set(_digits_cfg(image_size=8), 297)
    x16, y16 = data.load_eval_set(_digits_cfg(image_size=16), 297)
    np.testing.assert_array_equal(y8, y16)  # the held-out split does not depend on image_size
    pooled = x16.reshape(-1, 8, 2, 8, 2).mean(axis=(2, 4))
    assert np.corrcoef(pooled.ravel(), x8[..., 0].ravel())[0, 1] > 0.9
    # Bilinear upsampling: neighbouring pixels differ by at most the largest 8x8 neighbour step.
    assert np.abs(np.diff(x16, axis=2)).max() <= np.abs(np.diff(x8, axis=2)).max() + 1e-5


def test_digits_holdout_is_disjoint_and_complements_one_training_epoch():
    from sklearn.datasets import load_digits

    x_eval, y_eval = data.load_eval_set(_digits_cfg(image_size=8), 10_000)
    assert x_eval.shape == (297, 8, 8, 1) and y_eval.dtype == np.int32
    assert len(set(y_eval.tolist())) == 10
    # 1500 training records: a batch of 1500 is exactly one epoch.
    epoch = next(data.create_train_iterator(_digits_cfg(image_size=8), local_batch_size=1500, seed=0))
    train_rows, eval_rows = _rows(epoch['x']), _rows(x_eval)
    assert len(set(train_rows)) == 1500
    assert not set(train_rows) & set(eval_rows)
    all_rows = _rows(load_digits().images.astype(np.float32)[..., None] / 16.0 * 2.0 - 1.0)
    assert sorted(train_rows + eval_rows) == sorted(all_rows)
    # The held-out part is fixed: the same for any training seed, subsets chosen by the eval seed.
    a, la = data.load_eval_set(_digits_cfg(), 50, seed=0)
    b, lb = data.load_eval_set(_digits_cfg(), 50, seed=0)
    c, _ = data.load_eval_set(_digits_cfg(), 50, seed=1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert a.shape == (50, 16, 16, 1) and not np.array_equal(a, c)
    full, _ = data.load_eval_set(_digits_cfg(), 297)
    assert set(_rows(a)) <= set(_rows(full))


def test_train_examples_are_distinct_seeded_and_disjoint_from_the_held_out_set():
    # The real set a sample-quality figure's floor is measured with: no example twice (a batch of 2000
    # from the iterator repeats 500 of the 1500 training digits), never a held-out one.
    cfg = _digits_cfg(image_size=8)
    a, la = data.load_train_examples(cfg, 100, seed=0)
    b, _ = data.load_train_examples(cfg, 100, seed=0)
    c, _ = data.load_train_examples(cfg, 100, seed=1)
    assert a.shape == (100, 8, 8, 1) and la.dtype == np.int32 and len(set(_rows(a))) == 100
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    everything, _ = data.load_train_examples(cfg, 2000)
    assert len(set(_rows(everything))) == len(everything) == 1500
    held_out, _ = data.load_eval_set(cfg, 297)
    assert not set(_rows(everything)) & set(_rows(held_out))
    assert set(_rows(a)) <= set(_rows(everything))
    with pytest.raises(ValueError, match='num must be positive'):
        data.load_train_examples(cfg, 0)


# ---------------------------------------------------------------------------------------------------------
# determinism, epochs, sharding, checkpoints


def test_same_seed_same_batches_different_seed_different_batches():
    cfg = _digits_cfg(x_flip=True)
    a = _take(data.create_train_iterator(cfg, local_batch_size=16, seed=7), 3)
    b = _take(data.create_train_iterator(cfg, local_batch_size=16, seed=7), 3)
    c = _take(data.create_train_iterator(cfg, local_batch_size=16, seed=8), 3)
    _assert_same_batches(a, b)
    assert not np.array_equal(a[0]['x'], c[0]['x'])


def test_epochs_cover_every_record_once_and_are_reshuffled():
    cfg = _toy_cfg()
    train = next(data.create_train_iterator(cfg, local_batch_size=1000, seed=3))['x']
    it = data.create_train_iterator(cfg, local_batch_size=250, seed=3)
    epoch1 = np.concatenate([b['x'] for b in _take(it, 4)])
    epoch2 = np.concatenate([b['x'] for b in _take(it, 4)])
    assert sorted(_rows(epoch1)) == sorted(_rows(train)) == sorted(_rows(epoch2))
    assert len(set(_rows(epoch1))) == 1000
    assert not np.array_equal(epoch1, epoch2)  # reshuffled
    # The training records themselves do not depend on the seed, only their order.
    other = next(data.create_train_iterator(cfg, local_batch_size=1000, seed=4))['x']
    assert sorted(_rows(other)) == sorted(_rows(train)) and not np.array_equal(other, train)


def test_batches_larger_than_the_data_run_through_whole_epochs(tmp_path):
    np.save(tmp_path / 'ten.npy', np.broadcast_to(np.arange(10, dtype=np.uint8)[:, None, None], (10, 4, 4)).copy())
    cfg = _cfg(name='images', path=str(tmp_path / 'ten.npy'), image_size=4, holdout_fraction=0.0, x_flip=False)
    batches = _take(data.create_train_iterator(cfg, local_batch_size=25, seed=0, process_count=1), 2)
    ids = data.to_uint8(np.concatenate([b['x'] for b in batches]))[:, 0, 0, 0].astype(int)
    epochs = ids.reshape(5, 10)  # 50 records = 5 epochs of 10, back to back across batch boundaries
    assert all(sorted(e) == list(range(10)) for e in epochs.tolist())
    assert len({tuple(e) for e in epochs.tolist()}) > 1


def test_process_batches_concatenate_to_the_single_process_batch():
    # Process i of n yields rows [i * B / n, (i + 1) * B / n) of the one-process batch of B = n * local rows,
    # x-flips included and across epoch boundaries (digits: 1500 records, 28 batches of 64 = 1.2 epochs).
    for cfg, global_batch, n, steps in [(_digits_cfg(x_flip=True), 64, 4, 28), (_toy_cfg(toy_size=300), 300, 3, 3)]:
        single = _take(data.create_train_iterator(cfg, local_batch_size=global_batch, seed=0), steps)
        per_process = [
            _take(data.create_train_iterator(cfg, local_batch_size=global_batch // n, seed=0, process_index=i,
                                             process_count=n), steps)
            for i in range(n)
        ]
        assert all(b['x'].shape[0] == global_batch // n for p in per_process for b in p)
        joined = [{k: np.concatenate([p[b][k] for p in per_process]) for k in ('x', 'label')} for b in range(steps)]
        _assert_same_batches(joined, single)
    with pytest.raises(ValueError, match='process_index'):
        data.create_train_iterator(cfg, local_batch_size=4, seed=0, process_index=3, process_count=3)


def test_each_process_reads_only_its_rows_and_restores_them(monkeypatch):
    import dataclasses

    from imm_jax.data import sources

    gathered = []

    class CountingSource(sources.RecordSource):
        def __init__(self, base):
            self._base = base

        def __len__(self):
            return len(self._base)

        def gather(self, ids):
            gathered.append(len(ids))
            return self._base.gather(ids)

    original = sources.resolve

    def counting_resolve(cfg, **kwargs):
        resolved = original(cfg, **kwargs)
        return dataclasses.replace(resolved, train=CountingSource(resolved.train))

    monkeypatch.setattr(sources, 'resolve', counting_resolve)
    cfg = _digits_cfg(x_flip=True, prefetch_buffer=0)
    it = data.create_train_iterator(cfg, local_batch_size=16, seed=3, process_index=2, process_count=4)
    _take(it, 30)
    assert gathered == [16] * 30  # never the whole global batch of 64
    state = it.get_state()
    fresh = data.create_train_iterator(cfg, local_batch_size=16, seed=3, process_index=2, process_count=4)
    fresh.set_state(state)
    single = _take(data.create_train_iterator(cfg, local_batch_size=64, seed=3), 32)[30:]
    _assert_same_batches(_take(fresh, 2), [{k: v[32:48] for k, v in b.items()} for b in single])


def test_get_state_set_state_continues_exactly():
    cfg = _digits_cfg(x_flip=True)
    it = data.create_train_iterator(cfg, local_batch_size=64, seed=5)
    _take(it, 30)  # past the first epoch (1500 / 64 = 23.4 batches)
    state = it.get_state()
    expected = _take(it, 4)
    fresh = data.create_train_iterator(cfg, local_batch_size=64, seed=5)
    fresh.set_state(state)
    _assert_same_batches(_take(fresh, 4), expected)


def test_orbax_checkpoint_save_and_restore_into_fresh_iterator(tmp_path):
    cfg = _digits_cfg(x_flip=True)
    it = data.create_train_iterator(cfg, local_batch_size=32, seed=11)
    _take(it, 50)
    with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
        manager.save(50, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = _take(it, 5)

    fresh = data.create_train_iterator(cfg, local_batch_size=32, seed=11)
    next(fresh)  # restoring must also rewind an iterator that has moved
    with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
        assert manager.latest_step() == 50
        manager.restore(50, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_same_batches(_take(fresh, 5), expected)


def test_worker_processes_give_the_in_process_batches_and_checkpoint():
    cfg = _digits_cfg(x_flip=True, worker_count=2)
    reference = _take(data.create_train_iterator(_digits_cfg(x_flip=True), local_batch_size=32, seed=2), 8)
    it = data.create_train_iterator(cfg, local_batch_size=32, seed=2)
    first = _take(it, 5)
    state = it.get_state()
    rest = _take(it, 3)
    _assert_same_batches(first + rest, reference)
    assert type(first[0]['x']) is np.ndarray  # plain arrays, not grain's shared-memory views
    it.close()

    restored = data.create_train_iterator(cfg, local_batch_size=32, seed=2)
    restored.set_state(state)
    _assert_same_batches(_take(restored, 3), reference[5:])
    restored.close()
    del it, restored
    gc.collect()


# ---------------------------------------------------------------------------------------------------------
# toy2d


def test_toy2d_pipeline_info_and_holdout():
    cfg = _toy_cfg(toy='8gaussians')
    assert data.get_info(cfg) == data.DataInfo(shape=(2,), num_classes=0, kind='points', name='toy2d/8gaussians')
    batch = next(data.create_train_iterator(cfg, local_batch_size=128, seed=0))
    assert batch['x'].shape == (128, 2) and batch['x'].dtype == np.float32
    assert batch['label'].dtype == np.int32 and not batch['label'].any()
    x_eval, y_eval = data.load_eval_set(cfg, 10_000)
    assert x_eval.shape == (200, 2) and y_eval.shape == (200,) and not y_eval.any()
    train = next(data.create_train_iterator(cfg, local_batch_size=1000, seed=0))['x']
    assert not set(_rows(train)) & set(_rows(x_eval))
    # Neither set is what the public sampler draws for small seeds.
    assert not set(_rows(train)) & set(_rows(data.sample_toy2d('8gaussians', 1000, 0)))


def test_sample_toy2d_is_seeded_and_scaled_to_std_half():
    for name in data.TOY_NAMES:
        a = data.sample_toy2d(name, 20_000, seed=0)
        assert a.shape == (20_000, 2) and a.dtype == np.float32
        np.testing.assert_array_equal(a, data.sample_toy2d(name, 20_000, seed=0))
        assert not np.array_equal(a, data.sample_toy2d(name, 20_000, seed=1))
        np.testing.assert_allclose(a.std(axis=0), 0.5, atol=0.02)
        np.testing.assert_allclose(a.mean(axis=0), 0.0, atol=0.02)
    with pytest.raises(ValueError, match='checkerboard'):
        data.sample_toy2d('spirals', 10, 0)


def test_eight_gaussians_cluster_at_their_centres():
    x = data.sample_toy2d('8gaussians', 16_000, seed=3)
    dist = np.linalg.norm(x[:, None, :] - toy2d.GAUSSIANS_CENTERS[None], axis=-1)
    nearest = dist.argmin(axis=1)
    assert dist.min(axis=1).max() < 6 * toy2d.GAUSSIANS_STD
    counts = np.bincount(nearest, minlength=8)
    assert np.all(np.abs(counts - 2000) < 200), counts
    for k in range(8):
        np.testing.assert_allclose(x[nearest == k].mean(axis=0), toy2d.GAUSSIANS_CENTERS[k], atol=0.01)
        np.testing.assert_allclose(x[nearest == k].std(axis=0), toy2d.GAUSSIANS_STD, rtol=0.1)


def test_checkerboard_fills_even_cells_and_leaves_odd_cells_empty():
    x = data.sample_toy2d('checkerboard', 16_000, seed=4)
    half, cell = toy2d.CHECKERBOARD_HALF_WIDTH, toy2d.CHECKERBOARD_CELL
    assert np.abs(x).max() <= half + 1e-6
    ij = np.clip(np.floor((x + half) / cell).astype(int), 0, 3)
    counts = np.zeros((4, 4), int)
    np.add.at(counts, (ij[:, 0], ij[:, 1]), 1)
    even = (np.add.outer(np.arange(4), np.arange(4)) % 2) == 0
    assert counts[~even].sum() == 0
    assert np.all(np.abs(counts[even] - 2000) < 200), counts


def test_moons_are_two_separate_arcs():
    x = data.sample_toy2d('moons', 4000, seed=5)
    # Undo the per-coordinate scaling to sklearn's coordinates: outer arc radius 1 around (0, 0),
    # inner arc radius 1 around (1, 0.5).
    raw = x / 0.5 * toy2d._MOONS_STD + toy2d._MOONS_MEAN
    r_outer = np.linalg.norm(raw, axis=1)
    r_inner = np.linalg.norm(raw - np.array([1.0, 0.5]), axis=1)
    on_outer = np.abs(r_outer - 1) < 0.25
    on_inner = np.abs(r_inner - 1) < 0.25
    assert np.mean(on_outer | on_inner) > 0.99
    assert 0.4 < on_outer[raw[:, 1] > 0.5].mean() and raw[on_outer & ~on_inner, 1].min() > -0.3


# ---------------------------------------------------------------------------------------------------------
# image folders and arrays


def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)


def test_image_folder_with_class_subfolders(tmp_path):
    red = np.zeros((20, 20, 3), np.uint8)
    red[..., 0] = 255
    # Non-square RGBA: the central square is white, the side bands black -> center crop keeps only white.
    wide = np.zeros((16, 24, 4), np.uint8)
    wide[:, 4:20] = 255
    for i in range(4):
        _save(tmp_path / 'zebra' / f'{i}.png', red)  # sorted class names: apple=0, zebra=1
        _save(tmp_path / 'apple' / 'nested' / f'{i}.png', wide)
    cfg = _cfg(name='images', path=str(tmp_path), image_size=8, holdout_fraction=0.25, x_flip=False)
    info = data.get_info(cfg)
    assert info == data.DataInfo(shape=(8, 8, 3), num_classes=2, kind='image', name=f'images/{tmp_path.name}')

    batch = next(data.create_train_iterator(cfg, local_batch_size=6, seed=0))  # 6 training images
    assert batch['x'].shape == (6, 8, 8, 3) and batch['x'].dtype == np.float32
    for x, label in zip(batch['x'], batch['label']):
        expected = [1.0, 1.0, 1.0] if label == 0 else [1.0, -1.0, -1.0]
        np.testing.assert_allclose(x, np.broadcast_to(expected, x.shape), atol=1e-6)
    x_eval, y_eval = data.load_eval_set(cfg, 100)
    assert x_eval.shape == (2, 8, 8, 3)
    assert sorted(batch['label'].tolist() + y_eval.tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]


def test_flat_grayscale_folder_has_no_labels_and_one_channel(tmp_path):
    for i in range(5):
        _save(tmp_path / f'img_{i}.JPG' if i == 0 else tmp_path / f'img_{i}.png', np.full((8, 8), 40 * i, np.uint8))
    (tmp_path / 'notes.txt').write_text('not an image')
    cfg = _cfg(name='images', path=str(tmp_path), image_size=8, holdout_fraction=0.0, x_flip=False)
    assert data.get_info(cfg).shape == (8, 8, 1) and data.get_info(cfg).num_classes == 0
    batch = next(data.create_train_iterator(cfg, local_batch_size=5, seed=0))
    assert batch['x'].shape == (5, 8, 8, 1) and not batch['label'].any()
    np.testing.assert_allclose(np.sort(batch['x'][:, 0, 0, 0])[1:], (40 * np.arange(1, 5)) / 127.5 - 1, atol=0.05)
    with pytest.raises(ValueError, match='holdout_fraction'):
        data.load_eval_set(cfg, 10)


def test_npz_with_labels_holdout_fraction_and_resize(tmp_path):
    n = 50
    images = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None, None] * 5, 12, axis=1)
    images = np.repeat(np.repeat(images, 12, axis=2), 3, axis=3)  # (50, 12, 12, 3), image i == 5 i
    path = tmp_path / 'set.npz'
    np.savez(path, images=images, labels=np.arange(n) % 7)
    cfg = _cfg(name='images', path=str(path), image_size=8, holdout_fraction=0.2, x_flip=False)
    assert data.get_info(cfg) == data.DataInfo(shape=(8, 8, 3), num_classes=7, kind='image', name='images/set.npz')

    train = next(data.create_train_iterator(cfg, local_batch_size=40, seed=0))
    x_eval, y_eval = data.load_eval_set(cfg, 1000)
    assert train['x'].shape == (40, 8, 8, 3) and x_eval.shape == (10, 8, 8, 3)

    def ids(x):
        ids = np.round((x[:, 0, 0, 0] + 1) * 127.5 / 5).astype(int)
        np.testing.assert_allclose(x, np.broadcast_to(((5 * ids) / 127.5 - 1)[:, None, None, None], x.shape),
                                   atol=1e-6)  # constant images stay constant through the resize
        return ids

    train_ids, eval_ids = ids(train['x']), ids(x_eval)
    assert sorted(train_ids.tolist() + eval_ids.tolist()) == list(range(n))
    np.testing.assert_array_equal(train['label'], train_ids % 7)
    np.testing.assert_array_equal(y_eval, eval_ids % 7)
    # Deterministic held-out part: the same on a second call.
    np.testing.assert_array_equal(data.load_eval_set(cfg, 1000)[0], x_eval)


def test_npy_grayscale_and_rgba_arrays(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, (10, 8, 8), dtype=np.uint8)
    np.save(tmp_path / 'gray.npy', gray)
    cfg = _cfg(name='images', path=str(tmp_path / 'gray.npy'), image_size=8, holdout_fraction=0.0, x_flip=False)
    assert data.get_info(cfg).shape == (8, 8, 1) and data.get_info(cfg).num_classes == 0
    batch = next(data.create_train_iterator(cfg, local_batch_size=10, seed=0))
    assert sorted(_rows(data.to_uint8(batch['x'])[..., 0])) == sorted(_rows(gray))

    rgba = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 4), dtype=np.uint8)
    np.savez(tmp_path / 'rgba.npz', x=rgba)
    cfg = _cfg(name='images', path=str(tmp_path / 'rgba.npz'), image_size=8, holdout_fraction=0.0, x_flip=False)
    batch = next(data.create_train_iterator(cfg, local_batch_size=4, seed=0))
    assert batch['x'].shape == (4, 8, 8, 3)
    assert sorted(_rows(data.to_uint8(batch['x']))) == sorted(_rows(rgba[..., :3]))


def test_x_flip_mirrors_about_half_the_examples_deterministically(tmp_path):
    ramp = np.broadcast_to(np.arange(8, dtype=np.uint8) * 30, (8, 8))  # increasing along W
    np.save(tmp_path / 'ramp.npy', np.broadcast_to(ramp, (40, 8, 8)).copy())
    cfg = _cfg(name='images', path=str(tmp_path / 'ramp.npy'), image_size=8, holdout_fraction=0.0, x_flip=True)
    batches = _take(data.create_train_iterator(cfg, local_batch_size=40, seed=0), 10)
    x = data.to_uint8(np.concatenate([b['x'] for b in batches]))[..., 0]
    flipped = np.all(x == ramp[:, ::-1], axis=(1, 2))
    unflipped = np.all(x == ramp, axis=(1, 2))
    assert np.all(flipped ^ unflipped)
    assert 0.4 < flipped.mean() < 0.6
    again = _take(data.create_train_iterator(cfg, local_batch_size=40, seed=0), 10)
    _assert_same_batches(batches, again)
    other = _take(data.create_train_iterator(cfg, local_batch_size=40, seed=1), 1)
    assert not np.array_equal(other[0]['x'], batches[0]['x'])
    no_flip = next(data.create_train_iterator(_cfg(**{**cfg.to_dict(), 'x_flip': False}), local_batch_size=40,
                                              seed=0))
    assert np.all(data.to_uint8(no_flip['x'])[..., 0] == ramp)


def test_to_uint8_inverts_model_space_and_clips():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    np.testing.assert_array_equal(data.to_uint8(pixels.astype(np.float32) / 255 * 2 - 1), pixels)
    out = data.to_uint8(np.array([[-3.0, -1.0, 0.0, 1.0, 7.0]], np.float32))
    np.testing.assert_array_equal(out, [[0, 0, 128, 255, 255]])
    assert out.dtype == np.uint8


# ---------------------------------------------------------------------------------------------------------
# errors


def test_unknown_dataset_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"config\.data\.name='cifar'.*digits, toy2d, images, tfds"):
        data.get_info(_cfg(name='cifar'))
    with pytest.raises(ValueError, match=r'config\.data\.toy=.*checkerboard, 8gaussians, moons'):
        data.get_info(_toy_cfg(toy='spiral'))
    with pytest.raises(ValueError, match=r'config\.data\.holdout is required'):
        data.get_info(_cfg(name='digits', image_size=8, x_flip=False))


def test_image_path_errors_name_the_option_the_file_and_the_expectation(tmp_path):
    missing = tmp_path / 'nowhere'
    with pytest.raises(FileNotFoundError, match=rf'config\.data\.path=.*{missing}.*does not exist.*uint8'):
        data.get_info(_cfg(name='images', path=str(missing), image_size=8, holdout_fraction=0.1, x_flip=False))

    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match=r'config\.data\.path=.*empty.*no image files'):
        data.get_info(_cfg(name='images', path=str(tmp_path / 'empty'), image_size=8, holdout_fraction=0.1,
                           x_flip=False))

    np.save(tmp_path / 'float.npy', np.zeros((3, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r'config\.data\.path=.*float\.npy has dtype float32; expected uint8'):
        data.get_info(_cfg(name='images', path=str(tmp_path / 'float.npy'), image_size=8, holdout_fraction=0.1,
                           x_flip=False))

    np.savez(tmp_path / 'flat.npz', images=np.zeros((3, 64), np.uint8))
    with pytest.raises(ValueError, match=r"array 'images' in .*flat\.npz has shape \(3, 64\); expected"):
        data.get_info(_cfg(name='images', path=str(tmp_path / 'flat.npz'), image_size=8, holdout_fraction=0.1,
                           x_flip=False))

    np.savez(tmp_path / 'badlabels.npz', images=np.zeros((3, 8, 8, 3), np.uint8), labels=np.zeros(2, int))
    with pytest.raises(ValueError, match=r'labels in .*badlabels\.npz.*expected non-negative integers of shape'):
        data.get_info(_cfg(name='images', path=str(tmp_path / 'badlabels.npz'), image_size=8,
                           holdout_fraction=0.1, x_flip=False))


# ---------------------------------------------------------------------------------------------------------
# tfds (offline, through tfds.testing.mock_data)


def _tfds_cfg(name, image_size, **overrides):
    return _cfg(**{'name': 'tfds', 'tfds_name': name, 'tfds_data_dir': None, 'split': 'train',
                   'eval_split': 'test', 'image_size': image_size, 'x_flip': False, **overrides})


@pytest.mark.parametrize('name,image_size,shape', [('cifar10', 32, (32, 32, 3)), ('mnist', 16, (16, 16, 1))])
def test_tfds_mock_data(name, image_size, shape):
    import tensorflow_datasets as tfds

    cfg = _tfds_cfg(name, image_size, x_flip=True)
    with tfds.testing.mock_data(num_examples=24):
        info = data.get_info(cfg)
        assert info == data.DataInfo(shape=shape, num_classes=10, kind='image', name=f'tfds/{name}')
        it = data.create_train_iterator(cfg, local_batch_size=8, seed=0)
        batches = _take(it, 4)
        state = it.get_state()
        expected = _take(it, 2)
        fresh = data.create_train_iterator(cfg, local_batch_size=8, seed=0)
        fresh.set_state(state)
        _assert_same_batches(_take(fresh, 2), expected)

        x_eval, y_eval = data.load_eval_set(cfg, 5)
        source = tfds.data_source(name, split='test', download=False)
        pool = [source[i] for i in range(len(source))]
    for b in batches:
        assert b['x'].shape == (8, *shape) and b['x'].dtype == np.float32
        assert -1.0 <= b['x'].min() and b['x'].max() <= 1.0 and b['label'].dtype == np.int32
        assert set(b['label'].tolist()) <= set(range(10))
    assert x_eval.shape == (5, *shape) and y_eval.dtype == np.int32
    if name == 'cifar10':  # native size: the eval examples are the test records, exactly
        records = {r['image'].tobytes(): int(r['label']) for r in pool}
        for x, y in zip(data.to_uint8(x_eval), y_eval):
            assert records[x.tobytes()] == y


def test_tfds_not_prepared_says_where_and_how(tmp_path):
    cfg = _tfds_cfg('cifar10', 32, tfds_data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf'not prepared: looked in {tmp_path}.*tfds build cifar10 '
                                                rf'--data_dir {tmp_path} --file_format=array_record'):
        data.get_info(cfg)
    with pytest.raises(ValueError, match=r"config\.data\.tfds_name='no_such_dataset_xyz'"):
        data.get_info(_tfds_cfg('no_such_dataset_xyz', 32, tfds_data_dir=str(tmp_path)))
