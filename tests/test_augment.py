"""Non-leaking geometric augmentation (imm_jax/augment.py): geometry against closed forms, the drawn
parameters' statistics against their distributions, the labels' meaning, and its path through the
networks and objectives."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from imm_jax import augment as A
from imm_jax.configs_loader import load_config
from imm_jax.interpolants import Interpolant
from imm_jax.models import DiT, SongUNet
from imm_jax.models.precond import Precond
from imm_jax.objectives import make_objective
from imm_jax.objectives.flow_matching import FlowMatchingConfig, FlowMatchingObjective
from imm_jax.objectives.imm import IMMConfig, IMMObjective, sample_times


def _params(n=1, **values):
  p = dict(xflip=jnp.zeros(n), yflip=jnp.zeros(n), log2_scale=jnp.zeros(n), angle=jnp.zeros(n),
           log2_stretch=jnp.zeros(n), direction=jnp.zeros(n), shift=jnp.zeros((n, 2)))
  p.update({k: jnp.asarray(v, jnp.float32).reshape(p[k].shape) for k, v in values.items()})
  return p


def _smooth(h=32, w=32, c=2):
  yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
  img = np.stack([np.cos(2 * np.pi * xx) * np.sin(2 * np.pi * yy), np.cos(np.pi * xx) + 0.3 * yy][:c], -1)
  return jnp.asarray(img[None], jnp.float32)


def _ramp(a, b, c, size=16):
  """f(col, row) = a col + b row + c: bilinear interpolation reproduces it exactly."""
  rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
  return (a * cols + b * rows + c)[None, :, :, None].astype(np.float32)


def _forward_matrix(log2_scale, angle, log2_stretch, direction):
  """The forward linear map built independently: content scaled, stretched along `direction`, then
  rotated counter-clockwise on screen (y down: [[c, s], [-s, c]])."""
  def rot_screen(t):  # counter-clockwise on screen with y pointing down
    return np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])

  def rot_math(t):
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])

  stretch = rot_math(direction) @ np.diag([2.0**log2_stretch, 2.0**-log2_stretch]) @ rot_math(-direction)
  return rot_screen(angle) @ stretch * 2.0**log2_scale


def test_inverse_matrix_inverts_the_forward_transform():
  rng = np.random.default_rng(0)
  for _ in range(5):
    s, a, st, w = rng.normal(0, 0.3), rng.uniform(-np.pi, np.pi), rng.normal(0, 0.3), rng.uniform(-np.pi, np.pi)
    shift = rng.normal(0, 0.1, 2)
    inv = np.asarray(A.inverse_matrix(_params(log2_scale=s, angle=a, log2_stretch=st, direction=w,
                                              shift=shift)))[0]
    fwd = _forward_matrix(s, a, st, w)
    np.testing.assert_allclose(inv[:, :2] @ fwd, np.eye(2), atol=1e-5)
    p = rng.uniform(-0.3, 0.3, 2)  # a content point moves to fwd p + shift, and maps back to p
    np.testing.assert_allclose(inv[:, :2] @ (fwd @ p + shift) + inv[:, 2], p, atol=1e-5)


def test_rotation_by_a_quarter_turn_is_rot90():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 12, 12, 3)), jnp.float32)
  out = A.warp(x, A.inverse_matrix(_params(angle=np.pi / 2)), supersample=1)
  np.testing.assert_allclose(out[0], np.rot90(np.asarray(x[0]), 1), atol=1e-5)  # counter-clockwise
  # 2x supersampled (the pipeline's path) on a smooth image: within the low-pass filter's error.
  smooth = _smooth()
  out = A.warp(smooth, A.inverse_matrix(_params(angle=-np.pi / 2)))
  err = np.abs(np.asarray(out[0]) - np.rot90(np.asarray(smooth[0]), -1))
  assert err.max() < 0.03 and err[4:-4, 4:-4].max() < 3e-3


def test_one_pixel_shift_reflects_at_the_border():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 8, 8, 1)), jnp.float32)
  right = A.warp(x, A.inverse_matrix(_params(shift=[1 / 8, 0])), supersample=1)[0, ..., 0]
  np.testing.assert_allclose(right[:, 1:], x[0, :, :-1, 0], atol=1e-6)
  np.testing.assert_allclose(right[:, 0], x[0, :, 1, 0], atol=1e-6)  # reflected about column 0
  down = A.warp(x, A.inverse_matrix(_params(shift=[0, -2 / 8])), supersample=1)[0, ..., 0]  # 2 rows up
  np.testing.assert_allclose(down[:-2], x[0, 2:, :, 0], atol=1e-6)
  np.testing.assert_allclose(down[-2:], x[0, [6, 5], :, 0], atol=1e-6)  # reflected about row 7


@pytest.mark.parametrize("name,values", [
    ("scale", dict(log2_scale=0.4)), ("aniso", dict(log2_stretch=0.3, direction=0.7)),
    ("all", dict(log2_scale=-0.2, angle=0.3, log2_stretch=0.2, direction=-1.0, shift=[0.05, -0.03]))])
def test_affine_warp_of_a_linear_image_is_exact(name, values):
  """Bilinear sampling is exact on a linear image: every output pixel whose source lies inside the image
  equals the image's formula at the source computed from the closed-form inverse."""
  size = 16
  img = _ramp(0.3, -0.2, 0.1, size)
  out = np.asarray(A.warp(jnp.asarray(img), A.inverse_matrix(_params(**values)), supersample=1))[0, ..., 0]
  p = _params(**values)
  fwd = _forward_matrix(*(float(np.asarray(p[k])[0]) for k in ("log2_scale", "angle", "log2_stretch", "direction")))
  inv = np.linalg.inv(fwd)
  rows, cols = np.mgrid[0:size, 0:size]
  u = np.stack([(cols + 0.5) / size - 0.5, (rows + 0.5) / size - 0.5], -1) - np.asarray(p["shift"])[0]
  src = (u @ inv.T + 0.5) * size - 0.5  # (col, row) pixel indices in the input
  inside = np.all((src >= 0) & (src <= size - 1), axis=-1)
  assert inside.mean() > 0.5
  expected = 0.3 * src[..., 0] - 0.2 * src[..., 1] + 0.1
  np.testing.assert_allclose(out[inside], expected[inside], atol=2e-5)


@pytest.mark.parametrize("factor", [2, 3])
@pytest.mark.parametrize("up", [True, False])
def test_resizes_are_jax_image_lanczos3_on_the_reflected_image(factor, up):
  """The truth is jax.image.resize (Lanczos-3, antialiased) of the image reflect-padded by more than the
  kernel reaches, cropped back: the same resampling, computed with matrix products."""
  low = (6, 9)
  shape = (2,) + ((low[0], low[1]) if up else (low[0] * factor, low[1] * factor)) + (3,)
  x = jnp.asarray(np.random.default_rng(factor).normal(size=shape), jnp.float32)
  pad = 4 if up else 4 * factor  # the kernel reaches 3 low-resolution pixels
  padded = np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
  out_pad = pad * factor if up else pad // factor
  size = (low[0] * factor, low[1] * factor) if up else low
  want = jax.image.resize(padded, (2, size[0] + 2 * out_pad, size[1] + 2 * out_pad, 3), "lanczos3",
                          antialias=True)[:, out_pad:out_pad + size[0], out_pad:out_pad + size[1]]
  got = A._resize_reflect(x, factor, up)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-5)  # jax computes its weights in float32


def test_untouched_images_pass_bit_exact_and_flips_are_reversals():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(256, 8, 8, 3)), jnp.float32)
  aug = A.Augment(p=0.3, xflip=True)
  out, labels = aug(jax.random.key(0), x)
  out, labels, x = np.asarray(out), np.asarray(labels), np.asarray(x)
  flips_only = np.all(labels[:, 2:] == 0, axis=1)
  assert 20 < flips_only.sum() < 256
  for i in np.flatnonzero(flips_only):
    expected = x[i][:, ::-1] if labels[i, 0] else x[i]
    expected = expected[::-1] if labels[i, 1] else expected
    np.testing.assert_array_equal(out[i], expected)
  assert np.all(np.isin(labels[:, :2], [0.0, 1.0]))
  # Nothing drawn at all: a no-op.
  same, none = A.Augment(p=0.0, xflip=False)(jax.random.key(1), jnp.asarray(x))
  np.testing.assert_array_equal(same, x)
  assert not np.any(np.asarray(none))


def test_draws_follow_their_distributions_and_labels_encode_them():
  n, p = 40_000, 0.12
  aug = A.Augment(p=p, xflip=True, scale_std=0.2, aniso_std=0.3, translate_std=0.125)
  d = {k: np.asarray(v, np.float64) for k, v in aug.draw(jax.random.key(5), n).items()}
  tol = 4 * np.sqrt(p * (1 - p) / n)
  assert abs(d["xflip"].mean() - 0.5) < 4 * np.sqrt(0.25 / n)          # a fair coin on every image
  assert abs(d["yflip"].mean() - p / 2) < tol                          # drawn with p, then a fair coin
  for key, std in (("log2_scale", 0.2), ("log2_stretch", 0.3)):
    on = d[key] != 0
    assert abs(on.mean() - p) < tol
    assert abs(d[key][on].std() - std) < 0.05 * std and abs(d[key][on].mean()) < 0.02
  on = d["angle"] != 0
  assert abs(on.mean() - p) < tol and abs(np.abs(d["angle"][on]).mean() - np.pi / 2) < 0.1  # U(-pi, pi)
  on = np.any(d["shift"] != 0, axis=1)
  assert abs(on.mean() - p) < tol and abs(d["shift"][on].std() - 0.125) < 0.01
  # Independent draws: both scale and rotation with probability p^2.
  assert abs(((d["log2_scale"] != 0) & (d["angle"] != 0)).mean() - p * p) < 4 * np.sqrt(p * p / n)

  labels = np.asarray(A.labels({k: jnp.asarray(v, jnp.float32) for k, v in d.items()}))
  assert labels.shape == (n, A.AUGMENT_DIM)
  np.testing.assert_allclose(labels[:, 0], d["xflip"])
  np.testing.assert_allclose(labels[:, 2], d["log2_scale"], atol=1e-7)
  np.testing.assert_allclose(labels[:, 3] + 1 + 1j * labels[:, 4], np.exp(1j * d["angle"]), atol=1e-6)
  np.testing.assert_allclose(labels[:, 5] + 1j * labels[:, 6], d["log2_stretch"] * np.exp(2j * d["direction"]),
                             atol=1e-6)
  np.testing.assert_allclose(labels[:, 7:], d["shift"], atol=1e-7)
  untouched = (d["yflip"] == 0) & (d["log2_scale"] == 0) & (d["angle"] == 0) & (d["log2_stretch"] == 0) & \
      np.all(d["shift"] == 0, axis=1)
  assert not np.any(labels[untouched, 1:])  # an image left as it is (but for x) has all-zero labels


def test_only_listed_transforms_are_drawn():
  d = A.Augment(p=1.0, xflip=False, transforms=("rotate",)).draw(jax.random.key(0), 500)
  assert np.all(np.asarray(d["angle"]) != 0)
  for k in ("xflip", "yflip", "log2_scale", "log2_stretch", "shift"):
    assert not np.any(np.asarray(d[k])), k


def test_augmentation_leaves_pixel_statistics_roughly_unchanged():
  """A geometric transform moves pixels around; it does not brighten or darken the data."""
  x = jnp.asarray(np.clip(np.random.default_rng(4).normal(0.1, 0.4, (512, 16, 16, 3)), -1, 1), jnp.float32)
  out, labels = A.Augment(p=1.0)(jax.random.key(2), x)
  assert np.all(np.asarray(labels)[:, 2:4] != 0)  # every image scaled and rotated
  assert abs(float(out.mean()) - float(x.mean())) < 0.01


def _net_pair(cls, **kw):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 8, 3)), jnp.float32)
  c = jnp.asarray([10.0, 500.0, 900.0])
  net = cls(augment_dim=A.AUGMENT_DIM, **kw)
  params = net.init(jax.random.key(0), x, c, c)["params"]
  return net, params, x, c


@pytest.mark.parametrize("cls,kw,layer", [
    (SongUNet, dict(img_resolution=8, in_channels=3, out_channels=3, model_channels=16, channel_mult=(1, 2),
                    num_blocks=1, attn_resolutions=(4,), dropout=0.0), "map_augment"),
    (DiT, dict(input_size=8, in_channels=3, patch_size=4, hidden_size=32, depth=1, num_heads=2), "augment_embedder")])
def test_networks_condition_on_the_labels_and_zero_means_none(cls, kw, layer):
  net, params, x, c = _net_pair(cls, **kw)
  assert set(params[layer]) == {"kernel"} and params[layer]["kernel"].shape[0] == A.AUGMENT_DIM  # no bias
  # Make the network's output depend on its conditioning (zero-initialised output layers otherwise).
  params = jax.tree.map(lambda v: v + 0.05 * jnp.sign(jnp.sin(jnp.arange(v.size).reshape(v.shape))), params)
  plain = net.apply({"params": params}, x, c, c)
  zeros = net.apply({"params": params}, x, c, c, augment_labels=jnp.zeros((3, A.AUGMENT_DIM)))
  np.testing.assert_array_equal(plain, zeros)
  rotated = net.apply({"params": params}, x, c, c,
                      augment_labels=jnp.zeros((3, A.AUGMENT_DIM)).at[:, 4].set(1.0))
  assert float(jnp.abs(rotated - plain).max()) > 1e-3
  with pytest.raises(ValueError, match="augment_dim=9"):
    net.apply({"params": params}, x, c, c, augment_labels=jnp.zeros((3, 4)))


def test_imm_objective_gives_both_passes_the_labels_and_leaves_runs_without_it_unchanged():
  seen = []

  def recording_apply(params, x_in, c_t, c_s, labels, rng, augment_labels=None):
    seen.append(augment_labels)
    return x_in * params

  precond = Precond(Interpolant("ot_fm"), f_type="euler_fm")
  cfg = IMMConfig(group_size=2, k=8)
  batch = {"x": jnp.asarray(np.random.default_rng(0).normal(size=(8, 4, 4, 3)), jnp.float32)}
  plain = IMMObjective(net_apply=recording_apply, precond=precond, cfg=cfg)
  augmented = IMMObjective(net_apply=recording_apply, precond=precond, cfg=cfg, augment=A.Augment(p=0.5))
  key = jax.random.key(3)
  inputs = augmented.prepare(batch, key)
  assert inputs["augment_labels"].shape == (8, A.AUGMENT_DIM)
  augmented.loss(jnp.float32(0.5), inputs, key)
  assert len(seen) == 2 and all(s is inputs["augment_labels"] for s in seen)
  # The images the particles are noised from are the augmented ones.
  ip = precond.interpolant
  x_aug, labels = augmented.augment(jax.random.split(key)[1], batch["x"])
  np.testing.assert_array_equal(labels, inputs["augment_labels"])
  t = inputs["t"][:, None, None, None]
  noise = (inputs["x_t"] - ip.alpha(t) * x_aug) / ip.sigma(t)
  np.testing.assert_allclose(inputs["x_r"], ip.alpha(inputs["r"][:, None, None, None]) * x_aug
                             + ip.sigma(inputs["r"][:, None, None, None]) * noise, atol=2e-5)
  # Without augmentation: the draws of runs from before the pipeline existed (the same key splits).
  seen.clear()
  before = plain.prepare(batch, key)
  assert "augment_labels" not in before
  s, r, t = sample_times(jax.random.split(key, 3)[0], 4, cfg, ip)
  np.testing.assert_array_equal(before["t"], jnp.repeat(t, 2))
  plain.loss(jnp.float32(0.5), before, key)
  assert seen == [None, None]


def _config(**overrides):
  c = load_config("digits")
  for k, v in overrides.items():
    *path, leaf = k.split(".")
    node = c
    for name in path:
      node = node[name]
    node[leaf] = v
  return c


def test_config_checks():
  c = _config()
  assert A.for_training(c, None) is None  # off by default
  cifar = load_config("cifar10")
  aug = A.for_training(cifar, SongUNet(img_resolution=32, in_channels=3, out_channels=3, augment_dim=9))
  assert aug == A.Augment(p=0.12, xflip=True)
  net = DiT(input_size=8, in_channels=1, augment_dim=9)
  with pytest.raises(ValueError, match="config.model.augment_dim must be 0 or 9"):
    A.for_training(c, DiT(input_size=8, in_channels=1, augment_dim=4))
  with pytest.raises(ValueError, match="objective 'imm' or 'flow_matching', not 'moment_matching'"):
    A.for_training(_config(objective="moment_matching", **{"augment.p": 0.1}), net)
  with pytest.raises(ValueError, match="config.model.name 'unet' or 'dit', not 'mlp'"):
    make_objective(_toy2d_with_augment(), _mlp(), Precond(), None)
  with pytest.raises(ValueError, match="config.augment.p must be a probability"):
    A.Augment.from_config(ml_collections.ConfigDict(dict(c.augment.to_dict(), p=1.5)))
  with pytest.raises(ValueError, match="unknown transform 'shear'"):
    A.Augment(transforms=("shear",))
  with pytest.raises(ValueError, match="NHWC images"):
    A.Augment()(jax.random.key(0), jnp.zeros((4, 2)))


def _toy2d_with_augment():
  c = load_config("toy2d")
  c.augment.xflip = True
  return c


def _mlp():
  from imm_jax.models import MLP
  return MLP()


def test_flow_matching_regresses_on_the_augmented_images_with_their_labels():
  seen = []

  def recording_apply(params, x_in, c_t, c_s, labels, rng, augment_labels=None):
    seen.append(augment_labels)
    return x_in * params

  obj = FlowMatchingObjective(net_apply=recording_apply, precond=Precond(Interpolant("ot_fm")),
                              cfg=FlowMatchingConfig(), augment=A.Augment(p=0.5))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 4, 4, 1)), jnp.float32)
  key = jax.random.key(7)
  inputs = obj.prepare({"x": x}, key)
  x_aug, labels = obj.augment(jax.random.split(key)[1], x)
  np.testing.assert_array_equal(inputs["x"], x_aug)
  np.testing.assert_array_equal(inputs["augment_labels"], labels)
  assert np.any(np.asarray(x_aug) != np.asarray(x))
  obj.loss(jnp.float32(0.5), inputs, key)
  assert len(seen) == 1 and seen[0] is inputs["augment_labels"]
