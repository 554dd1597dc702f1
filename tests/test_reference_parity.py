"""Parity with the authors' PyTorch IMM code: the test vectors in tests/testvectors/ hold the reference
weights (random), inputs and outputs (format: reference_networks.md "Test-vector format").

A faithful port matches the precond forward ``out``, the guided forward ``cfg_out`` and every
pushforward sample ``push_*`` to 1e-4 absolute in float32.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imm_jax.convert.reference import (load_reference_npz, network_from_reference, params_from_state_dict,
                                       variables_from_state_dict)
from imm_jax.interpolants import Interpolant
from imm_jax.models.precond import Precond, denoise
from imm_jax.sampling import make_schedule, pushforward

VECTORS = sorted((pathlib.Path(__file__).parent / "testvectors").glob("*.npz"))
ATOL = 1e-4

# push_* entry -> (schedule kind, steps, mid-point etas), as the reference generated them.
PUSH_SCHEDULES = {
    "push_1": ("uniform", 1, None),
    "push_2_mid1.4": ("explicit", 2, [1.4]),
    "push_4_uniform": ("uniform", 4, None),
    "push_4_edm": ("edm", 4, None),
}


def nchw_to_nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


def labels_from_one_hot(one_hot: np.ndarray) -> np.ndarray:
  """Reference rule: argmax of [one_hot, is_unconditional]; all-zero rows -> the null class L."""
  is_uncond = 1.0 - one_hot.sum(axis=1, keepdims=True)
  return np.argmax(np.concatenate([one_hot, is_uncond], axis=1), axis=1).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _load(path: pathlib.Path):
  state_dict, meta, arrays = load_reference_npz(path)
  module, model_cfg, precond_cfg = network_from_reference(meta, state_dict=state_dict)
  variables = variables_from_state_dict(state_dict, module, model_cfg)
  precond = Precond.from_config(precond_cfg)
  labels = jnp.asarray(labels_from_one_hot(arrays["labels"])) if "labels" in arrays else None
  null_label = module.num_classes if model_cfg.name == "dit" else module.label_dim

  def net_apply(x_in, c_t, c_s, y):
    return module.apply(variables, x_in, c_t, c_s, y, train=False)

  return meta, arrays, module, model_cfg, precond_cfg, precond, net_apply, labels, null_label


def _max_err(ours, ref_nchw):
  ref = nchw_to_nhwc(ref_nchw)
  assert np.asarray(ours).shape == ref.shape
  return float(np.max(np.abs(np.asarray(ours, np.float64) - ref.astype(np.float64))))


def test_vectors_present():
  names = {p.stem for p in VECTORS}
  assert {"dit_small_stride", "unet_small_identity"} <= names


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_forward(path):
  meta, arrays, _, _, _, precond, net_apply, labels, _ = _load(path)
  x = jnp.asarray(nchw_to_nhwc(arrays["x"]))
  s, t = arrays["s"].astype(np.float64), arrays["t"].astype(np.float64)
  out = denoise(net_apply, precond, x, s, t, labels)
  err = _max_err(out, arrays["out"])
  print(f"{path.stem} out max|err| = {err:.3g}")
  assert err < ATOL


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_guided_forward(path):
  meta, arrays, _, _, _, precond, net_apply, labels, null_label = _load(path)
  if "cfg_out" not in arrays:
    pytest.skip("unconditional model: no guided forward in this vector")
  x = jnp.asarray(nchw_to_nhwc(arrays["x"]))
  s, t, w = float(arrays["cfg_s"]), float(arrays["cfg_t"]), float(arrays["cfg_scale"])
  out = denoise(net_apply, precond, x, s, t, labels, cfg_scale=w,
                null_label=null_label)
  err = _max_err(out, arrays["cfg_out"])
  print(f"{path.stem} cfg_out max|err| = {err:.3g}")
  assert err < ATOL


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_pushforward(path):
  meta, arrays, _, _, precond_cfg, precond, net_apply, labels, null_label = _load(path)
  guidance = {}
  if labels is not None and meta.get("cfg_scale") is not None:
    guidance = dict(cfg_scale=float(meta["cfg_scale"]), null_label=null_label)

  def denoise_fn(x, s, t):
    return denoise(net_apply, precond, x, s, t, labels, **guidance)

  def run(x, times):
    # Eagerly (op by op): the compiled ops are shared by all schedules and tests, which is several
    # times faster on CPU than compiling one scan per schedule length.
    with jax.disable_jit():
      return pushforward(denoise_fn, x, times)
  latents = jnp.asarray(nchw_to_nhwc(arrays["latents"]))
  interpolant = Interpolant(precond_cfg.interpolant)
  for key, (kind, steps, mids) in PUSH_SCHEDULES.items():
    times = make_schedule(kind, steps, interpolant, precond_cfg.eps, precond_cfg.T, mid_etas=mids)
    err = _max_err(run(latents, times), arrays[key])
    print(f"{path.stem} {key} max|err| = {err:.3g}")
    assert err < ATOL, key


def test_buffers_checked_not_loaded():
  """The DiT vector's pos_embed was perturbed with the weights: params_from_state_dict refuses it,
  variables_from_state_dict carries it; the resample filters of the UNet vector are the constants."""
  for path in VECTORS:
    state_dict, meta, _ = load_reference_npz(path)
    module, model_cfg, _ = network_from_reference(meta, state_dict=state_dict)
    if model_cfg.name == "dit":
      with pytest.raises(ValueError, match="model.pos_embed"):
        params_from_state_dict(state_dict, module, model_cfg)
      variables = variables_from_state_dict(state_dict, module, model_cfg)
      assert variables["buffers"]["pos_embed"].shape == state_dict["model.pos_embed"].shape
    else:
      params = params_from_state_dict(state_dict, module, model_cfg)
      assert set(variables_from_state_dict(state_dict, module, model_cfg)) == {"params"}
      assert "enc_16x16_conv" in params
