"""Latent datasets end to end: encode an image folder with a (tiny, random) SD-VAE, read it back as
config.data.name='latents', train a tiny DiT on it, sample and decode to images."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from imm_jax import checkpoints, encode, vae as vae_lib
from imm_jax.builder import build_model
from imm_jax.config_base import base_config
from imm_jax.data import latents as latents_lib
from imm_jax.data import pipeline, sources
from imm_jax.trainer import generate_samples, sample_grid_noise, train_and_evaluate

RESOLUTION = 16  # the tiny VAE downsamples by 2: 8x8x4 latents
SHARD_SIZE = 5


def _reference_center_crop(image: Image.Image, size: int) -> np.ndarray:
  """ADM's center_crop_arr (guided-diffusion image_datasets.py), as EDM2 copies it."""
  pil_image = image
  while min(*pil_image.size) >= 2 * size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
  arr = np.array(pil_image)
  crop_y, crop_x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return arr[crop_y:crop_y + size, crop_x:crop_x + size]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("latents")
  rng = np.random.default_rng(0)
  for c in ("cats", "dogs"):
    (root / "images" / c).mkdir(parents=True)
    for i in range(6):
      w, h = int(rng.integers(12, 60)), int(rng.integers(12, 60))
      image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
      image = {1: image.convert("L"), 2: image.convert("RGBA")}.get(i, image)
      image.save(root / "images" / c / f"im{i}.png")
  cfg = vae_lib.small_config()
  params = jax.tree.map(lambda p: p + np.float32(0.05) * rng.standard_normal(p.shape, np.float32),
                        vae_lib.init_params(cfg, 0))
  vae_dir = vae_lib.save_vae(str(root / "vae"), cfg, params)
  out = str(root / "encoded")
  result = encode.encode_dataset(str(root / "images"), vae_lib.load_vae(vae_dir), out, resolution=RESOLUTION,
                                 batch_size=4, shard_size=SHARD_SIZE, progress=False)
  return {"root": root, "images": str(root / "images"), "vae_dir": vae_dir, "out": out, "result": result}


def _latents_cfg(path, **kw):
  return ml_collections.ConfigDict(dict(dict(name="latents", path=path, holdout_fraction=0.0, prefetch_buffer=0,
                                             x_flip=False), **kw))


def test_center_crop_matches_adm():
  rng = np.random.default_rng(1)
  for (w, h), size in (((600, 400), 64), ((50, 90), 32), ((64, 64), 64), ((20, 30), 32)):
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    got = encode.center_crop_dhariwal(image, size)
    assert got.shape == (size, size, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, _reference_center_crop(image, size))
  gray = Image.fromarray(np.full((40, 30), 77, np.uint8))
  np.testing.assert_array_equal(encode.center_crop_dhariwal(gray, 16), np.full((16, 16, 3), 77, np.uint8))


def test_encode_writes_resumable_shards_that_match_the_vae(setup):
  out, meta = setup["out"], setup["result"]["metadata"]
  assert setup["result"]["encoded"] == [encode.shard_name(i, 3) for i in range(3)]
  assert (meta["num_records"], meta["num_classes"], meta["class_names"]) == (12, 2, ["cats", "dogs"])
  assert meta["latent_shape"] == [8, 8, 4] and [s["count"] for s in meta["shards"]] == [5, 5, 2]
  assert meta["vae"]["source"] == setup["vae_dir"] and meta["crop"] == "center-crop-dhariwal"

  # Records hold the VAE's posterior of the cropped image in [-1, 1], and the class-folder label.
  vae = vae_lib.load_vae(setup["vae_dir"])
  folder = encode.FolderImages(setup["images"])
  pixels = np.stack([folder.load(i, RESOLUTION)[0] for i in range(12)])
  mean, std = vae.encode(pixels.astype(np.float32) / 127.5 - 1)
  source = latents_lib.LatentRecordSource(latents_lib.list_shards(out), (8, 8, 4), "float32", 12)
  records = source.gather(np.arange(12))
  np.testing.assert_allclose(records["x"], mean, atol=1e-5)
  np.testing.assert_allclose(records["std"], std, rtol=1e-5)
  np.testing.assert_array_equal(records["label"], [0] * 6 + [1] * 6)
  stats = latents_lib.dataset_stats(out)
  m = records["x"].reshape(-1, 4).astype(np.float64)
  s2 = (records["x"].astype(np.float64) ** 2 + records["std"].astype(np.float64) ** 2).reshape(-1, 4)
  np.testing.assert_allclose(stats["mean"], m.mean(0), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(stats["std"], np.sqrt(s2.mean(0) - m.mean(0) ** 2), rtol=1e-6)

  # Rerun: nothing to do. Lose a shard (and leave a half-written temp file): only that one is redone.
  kw = dict(resolution=RESOLUTION, batch_size=4, shard_size=SHARD_SIZE, progress=False)
  again = encode.encode_dataset(setup["images"], vae, out, **kw)
  assert again["encoded"] == [] and len(again["skipped"]) == 3
  files = [os.path.join(out, encode.shard_name(i, 3)) for i in range(3)]
  before = [open(f, "rb").read() for f in files]
  mtimes = [os.path.getmtime(f) for f in files]
  os.remove(files[1])
  with open(files[1] + ".tmp-0", "wb") as f:
    f.write(b"partial")
  redo = encode.encode_dataset(setup["images"], vae, out, **kw)
  assert redo["encoded"] == [encode.shard_name(1, 3)]
  assert [open(f, "rb").read() for f in files] == before
  assert [os.path.getmtime(files[i]) for i in (0, 2)] == [mtimes[0], mtimes[2]]

  # Two processes each encode their own shards (0, 2 and 1): together the same dataset.
  split = str(setup["root"] / "two_hosts")
  first = encode.encode_dataset(setup["images"], vae, split, process_index=0, process_count=2, **kw)
  second = encode.encode_dataset(setup["images"], vae, split, process_index=1, process_count=2, **kw)
  assert (first["encoded"], second["encoded"]) == ([os.path.basename(files[0]), os.path.basename(files[2])],
                                                   [os.path.basename(files[1])])
  assert [open(os.path.join(split, os.path.basename(f)), "rb").read() for f in files] == before

  # A different encoding into the same folder is refused.
  with pytest.raises(ValueError, match="already holds a different encoding.*resolution"):
    encode.encode_dataset(setup["images"], vae, out, **dict(kw, resolution=2 * RESOLUTION))


def test_cli_resumes_and_reports_missing_weights_in_one_line(setup, capsys):
  rc = encode.main(["--data", setup["images"], "--vae", setup["vae_dir"], "--out", setup["out"],
                    "--resolution", str(RESOLUTION), "--shard-size", str(SHARD_SIZE), "--no-progress"])
  assert rc == 0 and "encoded 0 shard(s)" in capsys.readouterr().out
  half = str(setup["root"] / "half")
  rc = encode.main(["--data", setup["images"], "--vae", setup["vae_dir"], "--out", half, "--resolution",
                    str(RESOLUTION), "--dtype", "float16", "--max-images", "3", "--batch_size", "4", "--no-progress"])
  assert rc == 0 and "encoded 1 shard(s)" in capsys.readouterr().out
  full = sources.resolve(_latents_cfg(setup["out"])).train.gather(np.arange(3))
  small = sources.resolve(_latents_cfg(half)).train.gather(np.arange(3))
  np.testing.assert_allclose(small["x"], full["x"], rtol=2e-3, atol=2e-3)
  np.testing.assert_array_equal(small["label"], full["label"])
  with pytest.raises(SystemExit) as e:
    encode.main(["--data", setup["images"], "--vae", str(setup["root"] / "no_vae"), "--out",
                 str(setup["root"] / "x")])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err
  assert "huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir DIR" in err and "--vae" in err


def test_latents_dataset_samples_and_normalises(setup):
  cfg = _latents_cfg(setup["out"], latent_mean=(1.0, 2.0, 3.0, 4.0), latent_std=(2.0, 2.0, 4.0, 4.0))
  data = sources.resolve(cfg)
  assert data.info == sources.DataInfo((8, 8, 4), 2, "latent", "latents/encoded")
  assert data.random_transform is not None and len(data.train) == 12
  batch = data.train.gather(np.arange(12))
  # z = mean + std * N(0, 1), per global-batch row: deterministic, the same on any number of hosts.
  transform = data.random_transform(12, (0, 12))
  drawn = transform(batch, np.random.default_rng(7))
  again = transform(batch, np.random.default_rng(7))
  halves = [data.random_transform(12, rows)({k: v[rows[0]:rows[1]] for k, v in batch.items()},
                                            np.random.default_rng(7)) for rows in ((0, 5), (5, 12))]
  np.testing.assert_array_equal(drawn["x"], again["x"])
  np.testing.assert_array_equal(drawn["x"], np.concatenate([h["x"] for h in halves]))
  assert "std" not in drawn
  eps = (drawn["x"] - batch["x"]) / batch["std"]
  assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05
  other = transform(batch, np.random.default_rng(8))["x"]
  assert not np.allclose(other, drawn["x"])
  # Model space: (z - mean) / std * 0.5 per channel.
  model = data.to_model_space(drawn)
  np.testing.assert_allclose(model["x"], (drawn["x"] - [1, 2, 3, 4]) / [2, 2, 4, 4] * 0.5, rtol=1e-6)
  assert model["label"].dtype == np.int32
  # Without explicit statistics, the dataset's own: then the model sees ~unit-variance * 0.5 latents.
  norm = latents_lib.latent_norm(_latents_cfg(setup["out"]))
  assert norm.scale == 0.5 and np.allclose(norm.mean, latents_lib.dataset_stats(setup["out"])["mean"])
  x = norm.to_model(latents_lib.SampleLatents(12, (0, 12))(batch, np.random.default_rng(0))["x"])
  assert abs(x.std() - 0.5) < 0.1
  assert latents_lib.latent_norm(ml_collections.ConfigDict(dict(name="none"))) == latents_lib.LatentNorm(
      latents_lib.IMAGENET_MEAN, latents_lib.IMAGENET_STD, 0.5)
  # Held-out sets use the posterior mean.
  eval_x, eval_labels = pipeline.load_eval_set(_latents_cfg(setup["out"], holdout_fraction=0.25), 3)
  assert eval_x.shape == (3, 8, 8, 4) and eval_labels.shape == (3,)


def test_train_iterator_draws_latents(setup):
  cfg = _latents_cfg(setup["out"])
  first = next(pipeline.create_train_iterator(cfg, local_batch_size=4, seed=0))
  means = latents_lib.LatentsToModelSpace(latents_lib.latent_norm(cfg))(
      sources.resolve(cfg).train.gather(np.arange(12)))["x"]
  assert not any(np.allclose(row, m) for row in first["x"] for m in means)  # drawn, not the posterior mean
  again = next(pipeline.create_train_iterator(cfg, local_batch_size=4, seed=0))
  hosts = [next(pipeline.create_train_iterator(cfg, local_batch_size=2, seed=0, process_index=i,
                                               process_count=2)) for i in range(2)]
  np.testing.assert_array_equal(first["x"], again["x"])
  np.testing.assert_array_equal(first["x"], np.concatenate([h["x"] for h in hosts]))


def test_decode_inverts_the_normalisation(setup):
  vae = vae_lib.load_vae(setup["vae_dir"])
  norm = latents_lib.LatentNorm()
  z = np.random.default_rng(0).standard_normal((3, 8, 8, 4)).astype(np.float32) * 4
  images = latents_lib.decode_latents(vae, norm.to_model(z), norm, batch_size=2)
  want = np.clip(np.round((np.asarray(vae.decode(z)) + 1) * 127.5), 0, 255).astype(np.uint8)
  assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
  assert np.mean(np.abs(images.astype(int) - want)) < 0.01  # equal up to rounding at .5


def test_train_sample_and_decode_end_to_end(setup, tmp_path):
  c = base_config()
  c.num_steps, c.batch_size, c.log_every, c.sample_every = 2, 8, 1, 100
  c.checkpoint.update(every=2, async_save=False)
  c.data = _latents_cfg(setup["out"])
  c.model = ml_collections.ConfigDict(dict(name="dit", patch_size=2, hidden_size=32, depth=1, num_heads=2,
                                           class_conditional=True, dtype="float32"))
  c.imm.update(eps=0.0, label_dropout=0.1)
  c.sample.update(num=4, steps=(1,), cfg_scale=1.5)
  c.eval.update(num=0)
  workdir = str(tmp_path / "run")
  train_and_evaluate(c, workdir)
  model = build_model(checkpoints.read_config(workdir))
  assert (model.input_shape, model.num_classes, model.kind) == ((8, 8, 4), 2, "latent")
  params, step = checkpoints.restore_ema_params(workdir, model.abstract_params())
  noise, labels = sample_grid_noise(model, 4, 0)
  samples = generate_samples(model, params, noise, labels, 1, c, rng=jax.random.key(0))  # as the final grid
  assert step == 2 and samples.shape == (4, 8, 8, 4) and np.all(np.isfinite(samples))
  decode = latents_lib.latent_decoder(checkpoints.read_config(workdir).data)  # the VAE recorded by encode
  images = decode(samples)
  assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
  assert latents_lib.maybe_latent_decoder(c.data, str(tmp_path / "no_vae")) is None
