"""Networks: shapes, presets and parameter counts, init properties, dropout, bf16 compute, rematerialisation,
attention implementations, conversion errors."""

from __future__ import annotations

import functools
import pathlib
import re

import flax
import jax
import jax.numpy as jnp

import ml_collections
import numpy as np
import pytest

from imm_jax.convert.reference import (load_reference_npz, network_from_reference, params_from_state_dict,
                                       reference_key, variables_from_state_dict)
from imm_jax.models import DIT_PRESETS, MLP, DiT, SongUNet, count_params, create_network
from imm_jax.models.dit import Attention
from imm_jax.models import layers
from imm_jax.models.layers import dit_timestep_frequencies, gelu_tanh, precise_cos_sin

VECTORS = pathlib.Path(__file__).parent / "testvectors"


def _inputs(n, shape, num_classes, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(k1, (n,) + tuple(shape), jnp.float32)
  c_t = 1000.0 * jax.random.uniform(k2, (n,))
  c_s = c_t * jax.random.uniform(k3, (n,))
  labels = jnp.arange(n, dtype=jnp.int32) % (num_classes + 1) if num_classes else None
  return x, c_t, c_s, labels


def _abstract_params(module, shape, num_classes):
  x, c_t, c_s, labels = _inputs(1, shape, num_classes)
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, c_t, c_s, labels))["params"]


def _random_params(abstract, seed=1, scale=0.1):
  """Random values for every parameter (norm scales around 1): exercises the forward without paying
  for compiling the initialisers."""
  flat = flax.traverse_util.flatten_dict(abstract)
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in flat.items():
    value = scale * rng.standard_normal(leaf.shape)
    if path[-1] == "scale":
      value = value + 1.0
    out[path] = jnp.asarray(value.astype(np.float32))
  return flax.traverse_util.unflatten_dict(out)


# A small DDPM++-style UNet (one level, so no resampling; attention only in the middle block) for the
# runtime checks; the reference test vector covers resampling and attention at two levels.
TINY_UNET = dict(name="unet", model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[],
                 dropout=0.5)
TINY_DIT = dict(name="dit", patch_size=2, hidden_size=64, depth=2, num_heads=2)


@functools.lru_cache(maxsize=None)
def _tiny_unet():
  module = create_network(ml_collections.ConfigDict(TINY_UNET), input_shape=(8, 8, 3), num_classes=0)
  x, c_t, c_s, _ = _inputs(4, (8, 8, 3), 0)
  params = _random_params(_abstract_params(module, (8, 8, 3), 0))
  return module, params, (x, c_t, c_s)


@functools.lru_cache(maxsize=None)
def _unet_apply(dtype=jnp.float32):
  module, _, (_, c_t, c_s) = _tiny_unet()
  module = module.clone(dtype=dtype)
  return jax.jit(lambda p, x, rng, train: module.apply({"params": p}, x, c_t, c_s, None, train=train,
                                                       rngs={"dropout": rng}), static_argnums=3)


def _rel_err(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


# --------------------------------------------------------------------------------------------------
# Construction, shapes, names, init.


def test_dit_shapes_names_and_init():
  module = create_network(ml_collections.ConfigDict(TINY_DIT), input_shape=(8, 8, 4), num_classes=10)
  assert isinstance(module, DiT) and module.num_classes == 10
  x, c_t, c_s, labels = _inputs(3, (8, 8, 4), 10)
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), x, c_t, c_s, labels)
  p = variables["params"]
  names = {"/".join(k) for k in flax.traverse_util.flatten_dict(p)}
  for name in ("x_embedder/kernel", "t_embedder/mlp_0/kernel", "t_embedder/mlp_2/bias",
               "s_embedder/mlp_0/kernel", "y_embedder/embedding_table", "blocks_0/attn/qkv/kernel",
               "blocks_1/attn/proj/kernel", "blocks_1/mlp/fc1/kernel", "blocks_0/mlp/fc2/bias",
               "blocks_0/adaLN_modulation/kernel", "final_layer/adaLN_modulation/kernel",
               "final_layer/linear/kernel"):
    assert name in names, name
  assert set(variables) == {"params"}  # pos_embed is a constant
  assert p["y_embedder"]["embedding_table"].shape == (11, 64)
  assert p["blocks_0"]["attn"]["qkv"]["kernel"].shape == (64, 192)

  out = jax.jit(module.apply)(variables, x, c_t, c_s, labels)
  assert out.shape == x.shape and out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), 0.0)  # adaLN-Zero + zero final layer: G = 0 at init
  # Unconditional calls use the null row; the reference's label-dropout table has one more row.
  assert jax.eval_shape(lambda: module.apply(variables, x, c_t, c_s, None)).shape == x.shape
  extra = module.clone(extra_null_row=True)
  assert _abstract_params(extra, (8, 8, 4), 10)["y_embedder"]["embedding_table"].shape == (12, 64)

  # The reference's init: xavier-uniform Linear weights (the patch conv viewed as a Linear), zero
  # biases, N(0, 0.02) label table and time MLP, zero adaLN and final layers.
  patch = np.abs(np.asarray(p["x_embedder"]["kernel"])).max()
  assert 0.9 * np.sqrt(6 / (16 + 64)) < patch <= np.sqrt(6 / (16 + 64))
  qkv = np.abs(np.asarray(p["blocks_0"]["attn"]["qkv"]["kernel"])).max()
  assert 0.9 * np.sqrt(6 / (64 + 192)) < qkv <= np.sqrt(6 / (64 + 192))
  assert abs(np.std(p["t_embedder"]["mlp_0"]["kernel"]) - 0.02) < 1e-3
  assert abs(np.std(p["y_embedder"]["embedding_table"]) - 0.02) < 3e-3
  np.testing.assert_array_equal(np.asarray(p["blocks_0"]["attn"]["qkv"]["bias"]), 0.0)
  for leaf in jax.tree_util.tree_leaves([p["blocks_0"]["adaLN_modulation"], p["final_layer"]]):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)


def test_unet_shapes_and_names():
  module, params, (x, c_t, c_s) = _tiny_unet()
  assert isinstance(module, SongUNet)
  names = {"/".join(k) for k in flax.traverse_util.flatten_dict(params)}
  for name in ("map_layer0/kernel", "map_layer1/bias", "map_layer0_s/kernel", "map_layer1_s/kernel",
               "enc_8x8_conv/kernel", "enc_8x8_block0/norm0/scale", "enc_8x8_block0/conv0/kernel",
               "enc_8x8_block0/affine/kernel", "dec_8x8_in0/qkv/kernel", "dec_8x8_in0/proj/kernel",
               "dec_8x8_in0/norm2/bias", "dec_8x8_in1/conv1/kernel", "dec_8x8_block1/skip/kernel",
               "dec_8x8_aux_norm/scale", "dec_8x8_aux_conv/kernel"):
    assert name in names, name
  assert params["enc_8x8_block0"]["conv0"]["kernel"].shape == (3, 3, 16, 16)
  assert params["dec_8x8_block0"]["conv0"]["kernel"].shape == (3, 3, 32, 16)  # concatenated skip
  assert jax.eval_shape(lambda: module.apply({"params": params}, x, c_t, c_s)).shape == x.shape


@pytest.mark.parametrize("variant", [
    dict(),  # DDPM++ at two levels, conditional
    dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual", resample_filter=[1, 3, 3, 1]),
    dict(encoder_type="skip", decoder_type="skip"),
], ids=["ddpmpp_cond", "ncsnpp_residual", "skip_skip"])
def test_unet_variants_trace(variant):
  cfg = ml_collections.ConfigDict(dict(TINY_UNET, channel_mult=[1, 2], attn_resolutions=[4], **variant))
  module = create_network(cfg, input_shape=(8, 8, 3), num_classes=5)
  x, c_t, c_s, labels = _inputs(2, (8, 8, 3), 5)
  out, variables = jax.eval_shape(lambda: module.init_with_output(jax.random.PRNGKey(0), x, c_t, c_s, labels))
  assert out.shape == x.shape and out.dtype == jnp.float32
  params = variables["params"]
  assert params["map_label"]["kernel"].shape == (5, 16 * cfg.get("channel_mult_noise", 1))
  assert params["enc_4x4_block0"]["qkv"]["kernel"].shape == (1, 1, 32, 96)
  if variant.get("embedding_type") == "fourier":
    assert params["map_noise"]["freqs"].shape == (16,)
    assert reference_key(("map_noise", "freqs"), "unet") == "model.map_noise.freqs"
  if variant.get("encoder_type") == "residual":
    assert params["enc_4x4_aux_residual"]["kernel"].shape == (3, 3, 3, 16)
  if variant.get("decoder_type") == "skip":
    assert "dec_4x4_aux_conv" in params and "dec_8x8_aux_conv" in params


def test_unet_rejects_unsupported_options():
  for field, value in (("embedding_type", "learned"), ("encoder_type", "fancy"), ("decoder_type", "residual")):
    cfg = ml_collections.ConfigDict(dict(TINY_UNET, **{field: value}))
    module = create_network(cfg, input_shape=(8, 8, 3), num_classes=0)
    with pytest.raises(ValueError, match=field):
      _abstract_params(module, (8, 8, 3), 0)


def test_mlp_shapes_and_zero_init():
  module = create_network(ml_collections.ConfigDict(dict(name="mlp", hidden=32, depth=2)), input_shape=(2,),
                          num_classes=3)
  assert isinstance(module, MLP)
  x, c_t, c_s, labels = _inputs(5, (2,), 3)
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), x, c_t, c_s, labels)
  apply = jax.jit(module.apply)
  out = apply(variables, x, c_t, c_s, labels)
  assert out.shape == (5, 2) and out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  out = apply({"params": _random_params(variables["params"])}, x, c_t, c_s, labels)
  assert np.all(np.isfinite(out)) and np.abs(out).max() > 0


def test_create_network_errors():
  with pytest.raises(ValueError, match="config.model.name"):
    create_network(ml_collections.ConfigDict(dict(name="resnet")), input_shape=(8, 8, 3), num_classes=0)
  with pytest.raises(ValueError, match="config.model.preset"):
    create_network(ml_collections.ConfigDict(dict(name="dit", preset="XXL/2")), input_shape=(32, 32, 4),
                   num_classes=0)
  with pytest.raises(ValueError, match="config.model.widht"):
    create_network(ml_collections.ConfigDict(dict(name="mlp", widht=3)), input_shape=(2,), num_classes=0)
  # Preset fields can be overridden explicitly; a batch axis in input_shape is accepted.
  module = create_network(ml_collections.ConfigDict(dict(name="dit", preset="B/4", depth=3)),
                          input_shape=(2, 32, 32, 4), num_classes=1000)
  assert (module.patch_size, module.hidden_size, module.depth, module.num_heads) == (4, 768, 3, 12)
  assert module.input_size == 32 and module.in_channels == 4


# --------------------------------------------------------------------------------------------------
# Presets and parameter counts (abstract: nothing is allocated).


def test_dit_presets():
  assert set(DIT_PRESETS) == {f"{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)}
  assert DIT_PRESETS["XL/2"] == dict(patch_size=2, hidden_size=1152, depth=28, num_heads=16)
  assert DIT_PRESETS["L/4"] == dict(patch_size=4, hidden_size=1024, depth=24, num_heads=16)
  assert DIT_PRESETS["S/8"] == dict(patch_size=8, hidden_size=384, depth=12, num_heads=6)


@pytest.mark.parametrize("preset,paper_millions", [("S/2", 33), ("B/2", 130), ("XL/2", 675)])
def test_dit_param_counts(preset, paper_millions):
  """Paper (Table 5): S 33M, B 130M, L 458M, XL 675M on 32x32x4 latents with 1000 classes. Ours carry
  IMM's s-embedder (+1.6M at XL) and predict 4 channels (DiT's 8 with learned sigma)."""
  module = create_network(ml_collections.ConfigDict(dict(name="dit", preset=preset)), input_shape=(32, 32, 4),
                          num_classes=1000)
  n = count_params(_abstract_params(module, (32, 32, 4), 1000))
  assert abs(n / 1e6 - paper_millions) / paper_millions < 0.01, n


def test_ddpmpp_cifar_param_count():
  """EDM's DDPM++ CIFAR-10 network is 55.73M parameters; IMM's s branch (map_layer0_s/map_layer1_s)
  adds 0.33M."""
  cfg = ml_collections.ConfigDict(dict(name="unet", model_channels=128, channel_mult=[2, 2, 2], num_blocks=4,
                                       attn_resolutions=[16], dropout=0.2))
  module = create_network(cfg, input_shape=(32, 32, 3), num_classes=0)
  params = _abstract_params(module, (32, 32, 3), 0)
  s_branch = count_params({k: v for k, v in params.items() if k.endswith("_s")})
  assert s_branch == (128 * 512 + 512) + (512 * 512 + 512)
  assert abs((count_params(params) - s_branch) / 1e6 - 55.73) < 0.01
  assert count_params(params) == 56_061_443


# --------------------------------------------------------------------------------------------------
# Runtime behaviour.


def test_dropout_only_in_train_mode():
  _, params, (x, _, _) = _tiny_unet()
  apply = _unet_apply()
  ev1 = apply(params, x, jax.random.PRNGKey(1), False)
  ev2 = apply(params, x, jax.random.PRNGKey(2), False)
  np.testing.assert_array_equal(np.asarray(ev1), np.asarray(ev2))
  tr1 = apply(params, x, jax.random.PRNGKey(1), True)
  tr2 = apply(params, x, jax.random.PRNGKey(2), True)
  assert np.abs(np.asarray(tr1) - np.asarray(tr2)).max() > 1e-3
  assert np.abs(np.asarray(tr1) - np.asarray(ev1)).max() > 1e-3


def test_bf16_compute_close_to_fp32_dit():
  state_dict, meta, _ = load_reference_npz(VECTORS / "dit_small_stride.npz")
  module, model_cfg, _ = network_from_reference(meta, state_dict=state_dict)
  variables = variables_from_state_dict(state_dict, module, model_cfg)
  args = _inputs(4, (8, 8, 4), 10)
  f32 = jax.jit(module.apply)(variables, *args)
  bf16 = jax.jit(module.clone(dtype=jnp.bfloat16).apply)(variables, *args)
  assert bf16.dtype == jnp.float32
  assert 0 < _rel_err(bf16, f32) < 0.05


def test_bf16_compute_close_to_fp32_unet():
  _, params, (x, _, _) = _tiny_unet()
  key = jax.random.PRNGKey(0)
  f32 = _unet_apply()(params, x, key, False)
  bf16 = _unet_apply(jnp.bfloat16)(params, x, key, False)
  assert bf16.dtype == jnp.float32
  assert 0 < _rel_err(bf16, f32) < 0.05


def _loss_and_grads(module, params, args, train):
  """(sum of squared outputs, its gradients), and how many rematerialised calls the traced program holds
  (the primitive nn.remat / jax.checkpoint put in the jaxpr, printed as ``remat2[`` or ``checkpoint[``)."""

  def loss(p):
    out = module.apply({"params": p}, *args, train=train, rngs={"dropout": jax.random.PRNGKey(3)})
    return jnp.sum(out * out)

  rematerialised = len(re.findall(r"\b(remat2?|checkpoint)\[", str(jax.make_jaxpr(loss)(params))))
  return jax.jit(jax.value_and_grad(loss))(params), rematerialised


@pytest.mark.parametrize("network", ["dit", "unet"])
def test_remat_keeps_parameters_values_and_gradients(network):
  if network == "dit":
    module = create_network(ml_collections.ConfigDict(TINY_DIT), input_shape=(8, 8, 4), num_classes=10)
    args = _inputs(8, (8, 8, 4), 10)
    params = _random_params(_abstract_params(module, (8, 8, 4), 10))
    options = ("block", "dots_with_no_batch_dims_saveable")
    gelus = TINY_DIT["depth"]  # each MLP's GELU is rematerialised whatever the option (layers.gelu_tanh)
  else:  # dropout 0.5 in training mode: the rematerialised blocks must draw the same masks
    module, params, (x, c_t, c_s) = _tiny_unet()
    args = (x, c_t, c_s, None)
    options = ("block",)
    gelus = 0
  (value, grads), rematerialised = _loss_and_grads(module, params, args, train=True)
  assert rematerialised == gelus
  for remat in options:
    rematted = module.clone(remat=remat)
    # The same parameter tree (names, shapes), so checkpoints load with or without remat.
    assert jax.tree.structure(_abstract_params(rematted, args[0].shape[1:], 10 if network == "dit" else 0)) \
        == jax.tree.structure(params)
    (value_r, grads_r), rematerialised = _loss_and_grads(rematted, params, args, train=True)
    assert rematerialised > gelus, remat
    assert abs(float(value_r) - float(value)) <= 1e-6 * abs(float(value))
    for g_r, g in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads)):
      assert _rel_err(g_r, g) < 1e-5
    # The memory this saves is measured by python -m imm_jax.aot (docs/benchmarks.md), not here: what
    # XLA:CPU's buffer assignment makes of it differs between jax versions.
  with pytest.raises(ValueError, match=r"unknown config.model.remat 'all'.*'block'"):
    jax.eval_shape(lambda: module.clone(remat="all").apply({"params": params}, *args))


def test_dit_attention_implementations():
  chosen = create_network(ml_collections.ConfigDict(dict(TINY_DIT, attention_impl="xla", remat="block")),
                          input_shape=(8, 8, 4), num_classes=10)
  assert (chosen.attention_impl, chosen.remat) == ("xla", "block")  # config.model fields reach the DiT
  # cuDNN where it cannot run stops when the network is built (the commands print it as one line).
  expected = "needs an NVIDIA GPU" if jax.default_backend() != "gpu" else "needs bf16/fp16 compute"
  with pytest.raises(ValueError, match=f"attention_impl='cudnn' {expected}"):
    create_network(ml_collections.ConfigDict(dict(TINY_DIT, attention_impl="cudnn")), input_shape=(8, 8, 4),
                   num_classes=10)
  module = create_network(ml_collections.ConfigDict(TINY_DIT), input_shape=(8, 8, 4), num_classes=10)
  args = _inputs(4, (8, 8, 4), 10)
  variables = {"params": _random_params(_abstract_params(module, (8, 8, 4), 10))}
  default = jax.jit(module.apply)(variables, *args)
  np.testing.assert_array_equal(jax.jit(module.clone(attention_impl="xla").apply)(variables, *args), default)
  with pytest.raises(ValueError, match=r"unknown config.model.attention_impl 'flash'"):
    module.clone(attention_impl="flash").apply(variables, *args)
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match=r"attention_impl='cudnn' needs an NVIDIA GPU.*use 'xla'"):
      module.clone(attention_impl="cudnn", dtype=jnp.bfloat16).apply(variables, *args)
  else:
    with pytest.raises(ValueError, match=r"attention_impl='cudnn' needs bf16/fp16 compute"):
      module.clone(attention_impl="cudnn").apply(variables, *args)


def test_gelu_tanh_values_and_derivatives_are_the_closed_form():
  """DiT's GELU (rematerialised so that its backward keeps only the input) is torch's tanh form,
  0.5 x (1 + tanh(a (x + b x^3))), a = sqrt(2 / pi), b = 0.044715, with derivative
  0.5 (1 + t) + 0.5 x (1 - t^2) a (1 + 3 b x^2), by reverse and forward mode (the distillation teacher's
  jax.jvp)."""
  x = np.concatenate([np.linspace(-8, 8, 321), [-30.0, -1e-3, 0.0, 1e-3, 30.0]])
  a, b = np.sqrt(2 / np.pi), 0.044715
  t = np.tanh(a * (x + b * x**3))
  value, slope = 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * a * (1 + 3 * b * x**2)
  xs = jnp.asarray(x, jnp.float32)
  np.testing.assert_allclose(jax.jit(gelu_tanh)(xs), value, rtol=2e-6, atol=2e-6)
  # Where tanh saturates, 1 - t^2 is known to a few float32 ulps of 1 (XLA's tanh rounds to exactly 1,
  # or not, by its optimisation level), times the second term's factor 0.5 x a (1 + 3 b x^2).
  tol = 1e-5 * (1 + np.abs(slope)) + np.abs(0.5 * x * a * (1 + 3 * b * x**2)) * 4 * np.finfo(np.float32).eps
  grad = jax.jit(jax.grad(lambda v: jnp.sum(gelu_tanh(v) * 3.0)))(xs)
  assert np.all(np.abs(np.asarray(grad) - 3.0 * slope) <= 3.0 * tol)
  _, tangent = jax.jvp(gelu_tanh, (xs,), (jnp.full_like(xs, 2.0),))
  assert np.all(np.abs(np.asarray(tangent) - 2.0 * slope) <= 2.0 * tol)
  assert gelu_tanh(xs.astype(jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("product", ["dense", "conv3x3", "conv1x1"])
def test_weight_products_are_the_plain_products_with_float32_kernel_gradients(product):
  """layers.dense / layers.conv2d, whose JVP rule gives the kernel's gradient a float32 output: in float32
  the values, gradients (reverse mode) and tangents (forward mode: the distillation teacher's jax.jvp in
  parameter space) of the plain products; in bf16 the kernel's gradient is one product of bf16 operands
  (rounded to bf16, accumulated in float32) with a float32 output, the partial sums the SPMD partitioner
  then adds across devices (tests/test_gpu_target.py, tests/test_tpu_target.py), except a 3x3 kernel's
  on a GPU (cuDNN: bf16 only), whose gradient stays a bf16 convolution."""
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  if product == "dense":
    x, w = (jax.random.normal(k, s) for k, s in zip(keys, [(4, 5, 8), (8, 3)]))
    ours, plain = layers.dense, lambda x, w: x @ w
  else:
    ks = 3 if product == "conv3x3" else 1
    x, w = (jax.random.normal(k, s) for k, s in zip(keys, [(2, 6, 6, 4), (ks, ks, 4, 5)]))
    ours = lambda x, w: layers.conv2d(x, w, ks // 2)
    plain = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), [(ks // 2, ks // 2)] * 2,
                                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w).astype(jnp.float32)))
  np.testing.assert_allclose(ours(x, w), plain(x, w), rtol=1e-6, atol=1e-6)
  for got, want in zip(jax.grad(loss(ours), argnums=(0, 1))(x, w), jax.grad(loss(plain), argnums=(0, 1))(x, w)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jvp(ours, (x, w), (0.5 * x, -w))[1], jax.jvp(plain, (x, w), (0.5 * x, -w))[1],
                             rtol=1e-5, atol=1e-5)

  xb = x.astype(jnp.bfloat16)
  c = jax.random.normal(keys[2], plain(x, w).shape)  # a linear loss: the gradient is x^T c, no bf16 output in it
  linear = lambda f: lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * c)
  for platform in ("tpu", "gpu"):
    with layers.target_platform(platform):
      grad = jax.grad(linear(ours), argnums=1)(xb, w)
      backward = jax.make_jaxpr(jax.grad(linear(ours), argnums=1))(xb, w).eqns
    assert grad.dtype == jnp.float32
    np.testing.assert_allclose(grad, jax.grad(linear(plain), argnums=1)(x, w), rtol=0.01, atol=0.1)
    products = [e for e in backward if e.primitive.name in ("dot_general", "conv_general_dilated")]
    assert len(products) == 1
    bf16_gradient = platform == "gpu" and product == "conv3x3"
    assert products[0].outvars[0].aval.dtype == (jnp.bfloat16 if bf16_gradient else jnp.float32)
    if product != "conv3x3":  # the GEMM rounds its operands to bf16 whatever their storage type
      assert str(products[0].params["precision"]) == "BF16_BF16_F32"
    # (The TPU's convolution takes the bf16 values converted to float32: XLA:TPU's default precision
    # multiplies them in one bf16 pass, and its compiled program reads them as bf16.)


def test_attention_qkv_is_one_linear_layer_sliced_into_heads():
  """The q, k, v products on the ``qkv`` kernel's column blocks equal timm's one Linear (C -> 3C) whose
  output is laid out [3][heads][head_dim], followed by softmax(q k^T / sqrt(d)) v and ``proj``."""
  b, n, c, heads = 2, 6, 16, 2
  module = Attention(heads)
  x = jax.random.normal(jax.random.PRNGKey(0), (b, n, c))
  p = _random_params(jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"], scale=0.5)
  assert p["qkv"]["kernel"].shape == (c, 3 * c) and p["qkv"]["bias"].shape == (3 * c,)
  xn, w, bias = (np.asarray(a, np.float64) for a in (x, p["qkv"]["kernel"], p["qkv"]["bias"]))
  qkv = (xn @ w + bias).reshape(b, n, 3, heads, c // heads)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(c // heads)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum("bhts,bshd->bthd", weights, v).reshape(b, n, c)
  want = out @ np.asarray(p["proj"]["kernel"], np.float64) + np.asarray(p["proj"]["bias"], np.float64)
  got = jax.jit(module.apply)({"params": p}, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_attention_forms_logits_and_softmax_in_float32():
  """The attention both networks call (jax.nn.dot_product_attention, XLA) on bf16 q, k, v: with logits
  up to ~28 (a sharp softmax), rounding the logits to bf16 would move the weights by up to 28 * 2^-9 ~ 5%
  (measured: 5.3 BF16_EPS off a float32 computation on the same inputs); forming them and the softmax in
  float32 leaves only the rounding of the weights and of the output (measured: 0.8 BF16_EPS)."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  q, k = (2.4 * jax.random.normal(key, (2, 64, 2, 32)) for key in (k1, k2))
  q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, jax.random.normal(k3, (2, 64, 2, 32))))
  logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32)) / np.sqrt(32)
  assert float(jnp.abs(logits).max()) > 20
  want = jax.nn.dot_product_attention(*(a.astype(jnp.float32) for a in (q, k, v)))
  got = jax.jit(jax.nn.dot_product_attention)(q, k, v)
  assert got.dtype == jnp.bfloat16
  assert _rel_err(np.asarray(got, np.float32), want) < 2 * 2.0**-8


def test_precise_embedding_matches_float64():
  freqs = dit_timestep_frequencies(256)
  rng = np.random.default_rng(0)
  labels = np.concatenate([rng.uniform(0, 1000, 256), rng.uniform(-1000, 0, 16),
                           [0.0, 1e-3, 0.5, 999.999, 1000.0, 6e5]]).astype(np.float32)
  cos, sin = jax.jit(lambda l: precise_cos_sin(l, freqs))(labels)
  angles = labels.astype(np.float64)[:, None] * freqs[None, :]
  assert np.abs(np.asarray(cos) - np.cos(angles)).max() < 5e-7
  assert np.abs(np.asarray(sin) - np.sin(angles)).max() < 5e-7


def test_count_params():
  assert count_params({"a": jnp.zeros((2, 3)), "b": {"c": jnp.zeros((4,))}}) == 10


# --------------------------------------------------------------------------------------------------
# Conversion errors.


def test_conversion_errors_name_the_key():
  state_dict, meta, _ = load_reference_npz(VECTORS / "unet_small_identity.npz")
  module, model_cfg, precond_cfg = network_from_reference(meta)
  assert (precond_cfg.interpolant, precond_cfg.f_type, precond_cfg.temb_type) == ("ot_fm", "simple_edm",
                                                                                  "identity")
  assert (precond_cfg.eps, precond_cfg.T, precond_cfg.sigma_d) == (0.006, 0.994, 0.5)
  params = params_from_state_dict(state_dict, module, model_cfg)
  assert params["enc_8x8_block0"]["qkv"]["kernel"].shape == (1, 1, 64, 192)
  np.testing.assert_array_equal(params["map_layer0"]["kernel"], state_dict["model.map_layer0.weight"].T)

  bad = dict(state_dict, **{"model.enc.16x16_block0.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match=r"model\.enc\.16x16_block0\.extra\.weight"):
    params_from_state_dict(bad, module, model_cfg)
  bad = {k: v for k, v in state_dict.items() if k != "model.dec.16x16_aux_conv.bias"}
  with pytest.raises(ValueError, match=r"model\.dec\.16x16_aux_conv\.bias"):
    params_from_state_dict(bad, module, model_cfg)
  bad = dict(state_dict, **{"model.map_layer1.weight": np.zeros((128, 64), np.float32)})
  with pytest.raises(ValueError, match=r"model\.map_layer1\.weight.*\(128, 64\).*\(128, 128\)"):
    params_from_state_dict(bad, module, model_cfg)
  bad = dict(state_dict, **{"model.enc.8x8_down.skip.resample_filter": np.ones((1, 1, 2, 2), np.float32)})
  with pytest.raises(ValueError, match=r"model\.enc\.8x8_down\.skip\.resample_filter"):
    params_from_state_dict(bad, module, model_cfg)
  bad = {k: v for k, v in state_dict.items() if k != "model.dec.16x16_up.conv0.resample_filter"}
  with pytest.raises(ValueError, match=r"model\.dec\.16x16_up\.conv0\.resample_filter"):
    params_from_state_dict(bad, module, model_cfg)
  with pytest.raises(ValueError, match="qk_norm"):
    network_from_reference(dict(precond=dict(meta["precond"], model_type="DiT"),
                                model=dict(hidden_size=64, qk_norm=True)))
  with pytest.raises(ValueError, match="model_type"):
    network_from_reference(dict(precond=dict(meta["precond"], model_type="DhariwalUNet"), model={}))


def test_dit_conversion_layouts():
  state_dict, meta, _ = load_reference_npz(VECTORS / "dit_small_stride.npz")
  module, model_cfg, precond_cfg = network_from_reference(meta, state_dict=state_dict)
  assert (precond_cfg.f_type, precond_cfg.temb_type, precond_cfg.eps) == ("euler_fm", "stride", 0.0)
  assert not model_cfg.extra_null_row
  p = variables_from_state_dict(state_dict, module, model_cfg)["params"]
  w = state_dict["model.x_embedder.proj.weight"]  # (out, in, kh, kw)
  np.testing.assert_array_equal(p["x_embedder"]["kernel"], w.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["blocks_1"]["adaLN_modulation"]["kernel"],
                                state_dict["model.blocks.1.adaLN_modulation.1.weight"].T)
  np.testing.assert_array_equal(p["y_embedder"]["embedding_table"],
                                state_dict["model.y_embedder.embedding_table.weight"])
  # A table with the label-dropout row is detected from the state dict.
  sd = dict(state_dict, **{"model.y_embedder.embedding_table.weight": np.zeros((12, 64), np.float32)})
  _, cfg2, _ = network_from_reference(meta, state_dict=sd)
  assert cfg2.extra_null_row
