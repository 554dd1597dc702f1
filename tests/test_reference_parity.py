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
  """The vector, our converted network and one jitted f_{s,t}(x) with per-row traced times (so that the
  forward and every pushforward step share one compilation)."""
  state_dict, meta, arrays = load_reference_npz(path)
  module, model_cfg, precond_cfg = network_from_reference(meta, state_dict=state_dict)
  variables = variables_from_state_dict(state_dict, module, model_cfg)
  precond = Precond.from_config(precond_cfg)
  labels = jnp.asarray(labels_from_one_hot(arrays["labels"])) if "labels" in arrays else None
  null_label = module.num_classes if model_cfg.name == "dit" else module.label_dim
  guided = labels is not None and meta.get("cfg_scale") is not None

  def net_apply(x_in, c_t, c_s, y):
    return module.apply(variables, x_in, c_t, c_s, y, train=False)

  @functools.partial(jax.jit, static_argnames="guided")
  def f(x, s, t, cfg_scale, guided):
    return denoise(net_apply, precond, x, s, t, labels, cfg_scale=cfg_scale if guided else None,
                   null_label=null_label)

  return meta, arrays, precond_cfg, f, net_apply, precond, labels, null_label, guided


def _max_err(ours, ref_nchw):
  ref = nchw_to_nhwc(ref_nchw)
  assert np.asarray(ours).shape == ref.shape
  return float(np.max(np.abs(np.asarray(ours, np.float64) - ref.astype(np.float64))))


def _times(arrays, key):
  return jnp.asarray(arrays[key], jnp.float32)


def test_vectors_present():
  names = {p.stem for p in VECTORS}
  assert {"dit_small_stride", "unet_small_identity"} <= names


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_forward(path):
  """``out``: f at per-row (t, s) and labels."""
  _, arrays, _, f, *_ = _load(path)
  out = f(jnp.asarray(nchw_to_nhwc(arrays["x"])), _times(arrays, "s"), _times(arrays, "t"), None,
          guided=False)
  err = _max_err(out, arrays["out"])
  print(f"{path.stem} out max|err| = {err:.3g}")
  assert err < ATOL


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_guided_forward(path):
  """``cfg_out``: guided f at scalar (cfg_t, cfg_s), one batched [uncond; cond] pass."""
  _, arrays, _, f, *_ = _load(path)
  if "cfg_out" not in arrays:
    pytest.skip("unconditional model: no guided forward in this vector")
  n = arrays["x"].shape[0]
  s, t = (jnp.full((n,), float(arrays[k]), jnp.float32) for k in ("cfg_s", "cfg_t"))
  out = f(jnp.asarray(nchw_to_nhwc(arrays["x"])), s, t, float(arrays["cfg_scale"]), guided=True)
  err = _max_err(out, arrays["cfg_out"])
  print(f"{path.stem} cfg_out max|err| = {err:.3g}")
  assert err < ATOL


def _schedule(precond_cfg, key):
  kind, steps, mids = PUSH_SCHEDULES[key]
  return make_schedule(kind, steps, Interpolant(precond_cfg.interpolant), precond_cfg.eps, precond_cfg.T,
                       mid_etas=mids)


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_pushforward_steps(path):
  """Every ``push_*``: x <- f_{t_next, t_cur}(x) along the reference schedules (make_schedule), guided
  with the vector's cfg_scale for conditional models. Steps run through the one compiled f."""
  meta, arrays, precond_cfg, f, *_, guided = _load(path)
  latents = jnp.asarray(nchw_to_nhwc(arrays["latents"]))
  n = latents.shape[0]
  w = float(meta["cfg_scale"]) if guided else None
  for key in PUSH_SCHEDULES:
    x = latents
    times = _schedule(precond_cfg, key)
    for t_cur, t_next in zip(times[:-1], times[1:]):
      x = f(x, jnp.full((n,), t_next, jnp.float32), jnp.full((n,), t_cur, jnp.float32), w, guided=guided)
    err = _max_err(x, arrays[key])
    print(f"{path.stem} {key} max|err| = {err:.3g}")
    assert err < ATOL, key


def test_sampling_pushforward():
  """``imm_jax.sampling.pushforward`` (a lax.scan) reproduces every ``push_*`` of the DiT vector (one
  vector only: each schedule length is a separate compilation of the whole scan)."""
  path = next(p for p in VECTORS if p.stem == "dit_small_stride")
  meta, arrays, precond_cfg, _, net_apply, precond, labels, null_label, guided = _load(path)
  assert guided
  kw = dict(cfg_scale=float(meta["cfg_scale"]), null_label=null_label)
  run = jax.jit(lambda x, times: pushforward(
      lambda x, s, t: denoise(net_apply, precond, x, s, t, labels, **kw), x, times))
  latents = jnp.asarray(nchw_to_nhwc(arrays["latents"]))
  for key in PUSH_SCHEDULES:
    err = _max_err(run(latents, _schedule(precond_cfg, key)), arrays[key])
    print(f"pushforward {path.stem} {key} max|err| = {err:.3g}")
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
