"""The Flax SD-VAE: safetensors I/O, diffusers key mapping, missing weights, parity with diffusers."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imm_jax import vae as vae_lib

# config.json of stabilityai/sd-vae-ft-ema (as uploaded with diffusers 0.4.2).
SD_VAE_FT_EMA_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.4.2", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 256, "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def _perturbed_small_params(seed=0):
  cfg = vae_lib.small_config()
  rng = np.random.default_rng(seed)
  params = vae_lib.init_params(cfg, seed)
  return cfg, jax.tree.map(lambda p: (p + 0.05 * rng.standard_normal(p.shape)).astype(np.float32), params)


def test_safetensors_roundtrip(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {"a.weight": rng.standard_normal((3, 4, 1, 1)).astype(np.float32),
             "half": rng.standard_normal(5).astype(np.float16), "ids": np.arange(7, dtype=np.int64),
             "scalar": np.float32(2.5).reshape(())}
  path = str(tmp_path / "t.safetensors")
  vae_lib.write_safetensors(path, tensors, {"format": "pt"})
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
  assert n % 8 == 0 and header["__metadata__"] == {"format": "pt"} and header["half"]["dtype"] == "F16"
  back = vae_lib.read_safetensors(path)
  assert set(back) == set(tensors)
  for k, v in tensors.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape
    np.testing.assert_array_equal(back[k], v)
  st = pytest.importorskip("safetensors.numpy")  # the reference reader agrees, when installed
  for k, v in st.load_file(path).items():
    np.testing.assert_array_equal(v, tensors[k])


def test_bfloat16_is_read_as_float32(tmp_path):
  values = np.array([1.0, -2.5, 0.15625, 2.0 ** 100], np.float32)  # exact in bfloat16
  bits = (values.view(np.uint32) >> 16).astype("<u2")
  header = json.dumps({"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}).encode()
  path = tmp_path / "bf16.safetensors"
  path.write_bytes(len(header).to_bytes(8, "little") + header + bits.tobytes())
  np.testing.assert_array_equal(vae_lib.read_safetensors(str(path))["w"], values)


def test_sd_vae_ft_ema_config_has_the_published_parameter_count():
  cfg = vae_lib.VAEConfig.from_dict(SD_VAE_FT_EMA_CONFIG)
  assert cfg == vae_lib.VAEConfig() and cfg.downsample_factor == 8 and cfg.scaling_factor == 0.18215
  shapes = vae_lib.param_shapes(cfg)
  assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == 83_653_863  # diffusers' count
  with pytest.raises(ValueError, match="only DownEncoderBlock2D"):
    vae_lib.VAEConfig.from_dict(dict(SD_VAE_FT_EMA_CONFIG, down_block_types=["Foo"] * 4))


def test_state_dict_mapping_roundtrips_and_reads_old_attention_keys():
  cfg, params = _perturbed_small_params()
  sd = vae_lib.state_dict_from_params(params)
  assert sd["encoder.down_blocks.0.downsamplers.0.conv.weight"].shape == (32, 32, 3, 3)
  assert sd["decoder.mid_block.attentions.0.to_out.0.weight"].shape == (64, 64)
  assert sd["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"].shape == (64, 32, 1, 1)
  assert sd["quant_conv.weight"].shape == (8, 8, 1, 1)
  back = vae_lib.params_from_state_dict(sd, cfg)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  # The original sd-vae-ft-ema upload names the attention layers query/key/value/proj_attn (some old
  # checkpoints store them as 1x1 convs).
  old = {}
  for k, v in sd.items():
    for new, name in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
      k = k.replace(f"attentions.0.{new}.", f"attentions.0.{name}.")
    old[k] = v[:, :, None, None] if k.endswith("query.weight") else v
  assert "encoder.mid_block.attentions.0.proj_attn.bias" in old
  jax.tree.map(np.testing.assert_array_equal, vae_lib.params_from_state_dict(old, cfg), params)
  with pytest.raises(ValueError, match="1 missing"):
    vae_lib.params_from_state_dict({k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}, cfg)
  with pytest.raises(ValueError, match="shape"):
    vae_lib.params_from_state_dict(dict(sd, **{"decoder.conv_out.bias": np.zeros(4, np.float32)}), cfg)


def test_missing_weights_error_is_one_line_and_says_how_to_get_them(tmp_path):
  for path in (str(tmp_path / "nowhere"), ""):
    with pytest.raises(vae_lib.MissingVAEWeights) as e:
      vae_lib.load_vae(path, option="--vae")
    msg = str(e.value)
    assert "\n" not in msg
    assert "huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir DIR" in msg and "--vae" in msg
  folder = tmp_path / "only_config"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(SD_VAE_FT_EMA_CONFIG))
  (folder / "diffusion_pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors does not exist.*\.bin"):
    vae_lib.load_vae(str(folder), option="config.data.vae")


def test_save_load_encode_decode_shapes(tmp_path):
  cfg, params = _perturbed_small_params()
  folder = vae_lib.save_vae(str(tmp_path / "vae"), cfg, params)
  assert sorted(os.listdir(folder)) == ["config.json", "diffusion_pytorch_model.safetensors"]
  vae = vae_lib.load_vae(folder)
  assert vae.config == cfg
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  mean, std = vae.encode(x)
  assert mean.shape == std.shape == (2, 8, 8, 4) and bool(jnp.all(std > 0))
  assert vae.decode(mean).shape == (2, 16, 16, 3)


def test_matches_diffusers_autoencoder_kl(tmp_path):
  """Random weights, small config: encode (mean, logvar) and decode agree with diffusers to 1e-4."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  ref = diffusers.AutoencoderKL(
      block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=32,
      sample_size=32).eval()
  with torch.no_grad():  # move the norms and biases off their 1/0 initialisation
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  ref.save_pretrained(str(tmp_path / "vae"), safe_serialization=True)
  vae = vae_lib.load_vae(str(tmp_path / "vae"))

  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
  z = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
  with torch.no_grad():
    posterior = ref.encode(torch.from_numpy(x)).latent_dist
    want = {"mean": posterior.mean.numpy(), "logvar": posterior.logvar.numpy(), "std": posterior.std.numpy(),
            "decode": ref.decode(torch.from_numpy(z)).sample.numpy()}
  nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)  # noqa: E731
  mean, std = vae.encode(x.transpose(0, 2, 3, 1))
  got = {"mean": nchw(mean), "logvar": 2 * np.log(nchw(std)), "std": nchw(std),
         "decode": nchw(vae.decode(z.transpose(0, 2, 3, 1)))}
  for name in want:
    err = float(np.max(np.abs(got[name] - want[name])))
    assert err < 1e-4, f"{name}: max abs error {err} (values up to {np.max(np.abs(want[name])):.2f})"
    assert np.max(np.abs(want[name])) > 0.5  # not trivially small
