"""``python -m imm_jax.convert`` -> ``python -m imm_jax.sample`` reproduces the reference (the vectors in
tests/testvectors/, format: reference_networks.md), and released pickles load without running their code.

* Each vector: converted through the user path (CLI main / convert_to_workdir), restored from the
  workdir as ``imm_jax.sample`` restores it, and compared on ``out``, ``cfg_out`` and every ``push_*`` to
  1e-4 (NHWC). One vector runs both executables in subprocesses, exactly as the README says.
* The pickle path: the test writes its own EDM-style pickle (its own ``torch_utils.persistence`` and
  classes) whose ``module_src`` writes a marker file and raises if executed; the converter reads it
  (marker absent) into the vector's state dict. Needs torch (``pip install 'imm_jax[torch]'``): skipped
  without it.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import pickle
import subprocess
import sys
import textwrap
import urllib.error

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imm_jax import checkpoints, sampling
from imm_jax.builder import build_model
from imm_jax.convert import cli, generation_yaml, pickle_io, released
from imm_jax.convert.reference import PRECOND_KEYS, load_reference_npz
from imm_jax.convert.workdir import convert_to_workdir
from imm_jax.models.precond import denoise

REPO = pathlib.Path(__file__).resolve().parent.parent
VECTORS = sorted((REPO / "tests" / "testvectors").glob("*.npz"))
ATOL = 1e-4
# push_* entry -> sample_to_file schedule arguments, as the reference generated them.
PUSH = {
    "push_1": dict(schedule="uniform", steps=1),
    "push_2_mid1.4": dict(schedule="explicit", steps=2, mid_etas=[1.4]),
    "push_4_uniform": dict(schedule="uniform", steps=4),
    "push_4_edm": dict(schedule="edm", steps=4),
}


def nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


def class_ids(one_hot):
  """Reference rule: argmax of [one_hot, is_unconditional]; all-zero rows -> num_classes."""
  null = 1.0 - one_hot.sum(axis=1, keepdims=True)
  return np.argmax(np.concatenate([one_hot, null], axis=1), axis=1).astype(np.int32)


def max_err(ours, ref_nchw):
  ref = nhwc(ref_nchw)
  assert np.asarray(ours).shape == ref.shape
  return float(np.max(np.abs(np.asarray(ours, np.float64) - ref.astype(np.float64))))


def _run(args, **kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300, **kw)


def _inputs(arrays, tmp_path):
  noise_path = tmp_path / "z.npy"
  np.save(noise_path, nhwc(arrays["latents"]).astype(np.float32))
  labels_path = None
  if "labels" in arrays:
    labels_path = tmp_path / "y.npy"
    np.save(labels_path, class_ids(arrays["labels"]))
  return noise_path, labels_path


# --------------------------------------------------------------------------------------------------
# Acceptance: the two executables, as a user runs them.

def test_cli_convert_then_sample_reproduces_push_4_uniform(tmp_path):
  path = next(p for p in VECTORS if p.stem == "dit_small_stride")
  _, meta, arrays = load_reference_npz(path)
  workdir, out = tmp_path / "wd", tmp_path / "S.npz"
  r = _run(["-m", "imm_jax.convert", "--reference", str(path), "--out", str(workdir)])
  assert r.returncode == 0, r.stderr
  noise_path, labels_path = _inputs(arrays, tmp_path)
  r = _run(["-m", "imm_jax.sample", "--workdir", str(workdir), "--noise", str(noise_path), "--labels",
            str(labels_path), "--cfg-scale", str(meta["cfg_scale"]), "--schedule", "uniform", "--steps", "4",
            "--out", str(out)])
  assert r.returncode == 0, r.stderr
  samples = np.load(out)["samples"]
  err = max_err(samples, arrays["push_4_uniform"])
  print(f"CLI push_4_uniform max|err| = {err:.3g}")
  assert err < ATOL



def test_cli_refuses_a_non_empty_out(tmp_path, capsys):
  path = next(p for p in VECTORS if p.stem == "dit_small_stride")
  (tmp_path / "wd").mkdir()
  (tmp_path / "wd" / "config.json").write_text("{}")
  with pytest.raises(SystemExit) as e:
    cli.main(["--reference", str(path), "--out", str(tmp_path / "wd")])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and "--overwrite" in err and len(err.splitlines()) == 1
  assert os.listdir(tmp_path / "wd") == ["config.json"]


# --------------------------------------------------------------------------------------------------
# Every vector, every output, through the converted workdir (in-process: same functions as the CLIs).

@functools.lru_cache(maxsize=None)
def _converted(path: pathlib.Path, tmp: str):
  workdir = os.path.join(tmp, path.stem)
  assert cli.main(["--reference", str(path), "--out", workdir]) == 0
  return workdir


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
  return str(tmp_path_factory.mktemp("converted"))


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_converted_workdir_matches_every_output(path, module_tmp, tmp_path):
  from imm_jax.sample import sample_to_file

  _, meta, arrays = load_reference_npz(path)
  workdir = _converted(path, module_tmp)
  config = checkpoints.read_config(workdir)
  model = build_model(config)
  variables, _ = checkpoints.restore_ema_variables(workdir, model.abstract_params())
  assert ("buffers" in variables) == (config.model.name == "dit")  # the vector's perturbed pos_embed
  labels = jnp.asarray(class_ids(arrays["labels"])) if "labels" in arrays else None

  def net_apply(x_in, c_t, c_s, y):
    return model.net.apply(variables, x_in, c_t, c_s, y, train=False)

  @functools.partial(jax.jit, static_argnames="guided")
  def f(x, s, t, w, guided):
    return denoise(net_apply, model.precond, x, s, t, labels, cfg_scale=w if guided else None,
                   null_label=model.null_label)

  x = jnp.asarray(nhwc(arrays["x"]))
  errs = {"out": max_err(f(x, jnp.asarray(arrays["s"]), jnp.asarray(arrays["t"]), None, guided=False),
                         arrays["out"])}
  if "cfg_out" in arrays:
    n = x.shape[0]
    s, t = (jnp.full((n,), float(arrays[k]), jnp.float32) for k in ("cfg_s", "cfg_t"))
    errs["cfg_out"] = max_err(f(x, s, t, float(arrays["cfg_scale"]), guided=True), arrays["cfg_out"])

  # push_4_uniform through imm_jax.sample's entry point; the other schedules step the same f_{s,t}
  # (the workdir's network, precond and guidance scale) along the reference schedules, one compile.
  noise = nhwc(arrays["latents"]).astype(np.float32)
  np_labels = None if labels is None else np.asarray(labels)
  result = sample_to_file(workdir, str(tmp_path / "S.npz"), num=0, noise=noise, labels=np_labels,
                          progress=False, **PUSH["push_4_uniform"])
  errs["push_4_uniform"] = max_err(result["samples"], arrays["push_4_uniform"])
  scale = float(config.sample.cfg_scale)
  guided = model.null_label is not None and scale != 1.0
  n = noise.shape[0]
  for key, kw in PUSH.items():
    times = sampling.make_schedule(kw["schedule"], kw["steps"], model.precond.interpolant, config.imm.eps,
                                   config.imm.T, mid_etas=kw.get("mid_etas"))
    x = jnp.asarray(noise)
    for t_cur, t_next in zip(times[:-1], times[1:]):
      x = f(x, jnp.full((n,), t_next, jnp.float32), jnp.full((n,), t_cur, jnp.float32), scale, guided=guided)
    errs[key + "/steps"] = max_err(x, arrays[key])
  print(path.stem, {k: f"{v:.2g}" for k, v in errs.items()})
  assert max(errs.values()) < ATOL, errs
  expected = {"out", "push_4_uniform"} | {key + "/steps" for key in PUSH}
  assert expected | ({"cfg_out"} if "cfg_out" in arrays else set()) == set(errs)


def test_config_written_for_the_vectors(module_tmp):
  for path in VECTORS:
    _, meta, _ = load_reference_npz(path)
    config = checkpoints.read_config(_converted(path, module_tmp))
    pre = meta["precond"]
    assert config.data.name == "none"
    assert list(config.data.shape) == [pre["img_resolution"], pre["img_resolution"], pre["img_channels"]]
    assert config.data.num_classes == pre["label_dim"]
    assert (config.precond.f_type, config.precond.temb_type) == (pre["f_type"], pre["temb_type"])
    assert (config.imm.eps, config.imm.T) == (pre["eps"], pre["T"])
    assert config.sample.cfg_scale == (meta["cfg_scale"] if pre["label_dim"] else 1.0)


# --------------------------------------------------------------------------------------------------
# Errors name the key; nothing is written on failure.

def _dit_vector():
  state_dict, meta, _ = load_reference_npz(next(p for p in VECTORS if p.stem == "dit_small_stride"))
  return state_dict, meta


def test_unknown_missing_and_misshapen_keys_are_named(tmp_path):
  state_dict, meta = _dit_vector()
  out = str(tmp_path / "wd")
  extra = dict(state_dict, **{"model.blocks.0.attn.extra": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match=r"model\.blocks\.0\.attn\.extra"):
    convert_to_workdir(extra, meta, out)
  missing = {k: v for k, v in state_dict.items() if k != "model.final_layer.linear.bias"}
  with pytest.raises(ValueError, match=r"model\.final_layer\.linear\.bias"):
    convert_to_workdir(missing, meta, out)
  bad = dict(state_dict, **{"model.t_embedder.mlp.0.weight": np.zeros((3, 3), np.float32)})
  with pytest.raises(ValueError, match=r"model\.t_embedder\.mlp\.0\.weight"):
    convert_to_workdir(bad, meta, out)
  unsupported = json.loads(json.dumps(meta))
  unsupported["model"]["qk_norm"] = True
  with pytest.raises(ValueError, match="qk_norm"):
    convert_to_workdir(state_dict, unsupported, out)
  unknown = json.loads(json.dumps(meta))
  unknown["precond"]["new_option"] = 1
  with pytest.raises(ValueError, match="new_option"):
    convert_to_workdir(state_dict, unknown, out)
  assert not os.path.exists(out)


def test_overwrite(tmp_path):
  state_dict, meta = _dit_vector()
  out = tmp_path / "wd"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="--overwrite"):
    convert_to_workdir(state_dict, meta, str(out))
  convert_to_workdir(state_dict, meta, str(out), overwrite=True)
  assert (out / "notes.txt").read_text() == "mine"
  assert sorted(os.listdir(out)) == ["checkpoints", "config.json", "notes.txt"]


# --------------------------------------------------------------------------------------------------
# Pickles: the restricted unpickler.

class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_other_globals(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pkl"
  path.write_bytes(pickle.dumps({"ema": _Evil(marker)}))
  with pytest.raises(pickle_io.PickleError, match=r"(posix|os|nt)\.system"):
    pickle_io.load_checkpoint_pickle(str(path))
  assert not marker.exists()


def test_missing_torch_is_one_clear_line(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(pickle_io.PickleError, match=r"pip install 'imm_jax\[torch\]'"):
    pickle_io._require_torch()


_PERSISTENCE_SRC = '''
"""A stand-in for EDM's torch_utils.persistence, written by tests/test_convert.py: like the real one, it
rebuilds objects by exec'ing the module_src stored in the pickle."""
import types


def _reconstruct_persistent_obj(meta):
  module = types.ModuleType("_imm_persistent_src")
  exec(compile(meta["module_src"], "<module_src>", "exec"), module.__dict__)
  cls = module.__dict__[meta["class_name"]]
  obj = cls.__new__(cls)
  obj.__dict__.update(meta["state"])
  return obj
'''

_TRAINING_SRC = '''
"""Stand-in authors' classes, written by tests/test_convert.py. Persistent ones pickle through
torch_utils.persistence with a module_src that must never run; Block pickles normally (by reference)."""
import torch
from torch_utils import persistence

MODULE_SRC = MODULE_SRC_TEMPLATE


class Persistent(torch.nn.Module):
  def __reduce_ex__(self, protocol):
    meta = dict(type="class", version=6, module_src=MODULE_SRC, class_name=type(self).__name__,
                state=dict(self.__dict__))
    return (persistence._reconstruct_persistent_obj, (meta,))


class IMMPrecond(Persistent):
  pass


class DiT(Persistent):
  pass


class SongUNet(Persistent):
  pass


class Block(torch.nn.Module):
  pass
'''


@pytest.fixture
def stand_in_authors_code(tmp_path, monkeypatch):
  """Importable ``torch_utils.persistence`` and ``training.preconds`` (removed again afterwards)."""
  torch = pytest.importorskip("torch")
  marker = tmp_path / "module_src_ran"
  src = tmp_path / "src"
  (src / "torch_utils").mkdir(parents=True)
  (src / "training").mkdir()
  (src / "torch_utils" / "__init__.py").write_text("")
  (src / "torch_utils" / "persistence.py").write_text(_PERSISTENCE_SRC)
  (src / "training" / "__init__.py").write_text("")
  module_src = (f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                f"raise RuntimeError('module_src executed')\n")
  (src / "training" / "preconds.py").write_text(
      _TRAINING_SRC.replace("MODULE_SRC_TEMPLATE", repr(module_src)))
  monkeypatch.syspath_prepend(str(src))
  for name in ("torch_utils", "torch_utils.persistence", "training", "training.preconds"):
    monkeypatch.delitem(sys.modules, name, raising=False)
  import training.preconds  # noqa: PLC0415 (the stand-in package only exists here)
  yield torch, training.preconds, marker
  for name in ("torch_utils", "torch_utils.persistence", "training", "training.preconds"):
    sys.modules.pop(name, None)


def _edm_style_checkpoint(torch, classes, state_dict, meta):
  """The precond module as the authors pickle it: IMMPrecond(model=DiT|SongUNet(...)), the network's
  submodules torch modules (Linear where the shapes say so) or plain Blocks; pos_embed a frozen
  parameter, resample filters buffers, plus a non-persistent buffer that state_dict() leaves out."""
  pre = meta["precond"]
  precond = classes.IMMPrecond()
  for key in ("img_resolution", "img_channels", "label_dim", "f_type", "T", "eps", "noise_schedule"):
    setattr(precond, key, pre[key])
  precond.temb_type = "stride" if pre["temb_type"] == "identity" else "identity"  # the YAML must win
  precond.mixed_precision = torch.float32
  precond.model = getattr(classes, "DiT" if pre["model_type"].startswith("DiT") else "SongUNet")()
  precond.model.register_buffer("scratch", torch.zeros(2), persistent=False)

  def child(parent, name):
    if name not in parent._modules:
      parent.add_module(name, classes.Block())
    return parent._modules[name]

  holders = {}
  for key in state_dict:
    *path, leaf = key.split(".")
    holders.setdefault(tuple(path), []).append(leaf)
  for path, leaves in holders.items():
    parent = precond
    for name in path[:-1]:
      parent = child(parent, name)
    weight = state_dict.get(".".join(path + ("weight",)))
    if path[-1] not in parent._modules and sorted(leaves) == ["bias", "weight"] and weight.ndim == 2:
      parent.add_module(path[-1], torch.nn.Linear(weight.shape[1], weight.shape[0]))
    module = child(parent, path[-1]) if path else precond
    for leaf in leaves:
      tensor = torch.from_numpy(state_dict[".".join(path + (leaf,))].copy())
      if leaf == "resample_filter":
        module.register_buffer(leaf, tensor)
      else:
        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=leaf != "pos_embed")
  return {"ema": precond, "loss_fn": None, "augment_pipe": None, "dataset_kwargs": {"resolution": 32}}


def _generation_yaml(meta) -> str:
  pre = meta["precond"]
  network = {"class_name": "training.preconds.IMMPrecond"}
  network.update({k: v for k, v in pre.items() if k not in ("img_resolution", "img_channels", "label_dim")})
  network.update(meta["model"])
  top = {"label_dim": pre["label_dim"], "resolution": pre["img_resolution"], "channels": pre["img_channels"],
         "network": network,
         "sampling": {"1_steps_cfg1.5_pushforward_uniform": {}, "4_steps_cfg1.5_pushforward_uniform": {}}}
  return json.dumps(top, indent=2)  # JSON is YAML


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_pickle_loads_without_running_module_src(path, stand_in_authors_code, tmp_path):
  torch, classes, marker = stand_in_authors_code
  state_dict, meta, _ = load_reference_npz(path)
  checkpoint = _edm_style_checkpoint(torch, classes, state_dict, meta)
  pkl = tmp_path / "network-snapshot.pkl"
  pkl.write_bytes(pickle.dumps(checkpoint))
  zipped = tmp_path / "network.pt"
  torch.save(checkpoint, zipped)
  yaml_path = tmp_path / "generate.yaml"
  yaml_path.write_text(_generation_yaml(meta))

  # The trap works: a plain unpickler (EDM's way) runs module_src.
  with pytest.raises(RuntimeError, match="module_src executed"):
    pickle.loads(pkl.read_bytes())
  assert marker.exists()
  marker.unlink()

  for source in (pkl, zipped):
    loaded, meta2, _, notes = cli.load_source(pickle=str(source), yaml=str(yaml_path))
    assert not marker.exists()
    assert sorted(loaded) == sorted(state_dict)  # the non-persistent buffer is left out
    for key, value in state_dict.items():
      np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    assert meta2["precond"] == meta["precond"] and meta2["model"] == meta["model"]
    assert any("temb_type" in n for n in notes)
    if meta["precond"]["label_dim"]:
      assert meta2["sample"] == {"steps": (1, 4), "cfg_scale": 1.5, "schedule": "uniform"}

  out = tmp_path / "wd"
  assert cli.main(["--pickle", str(pkl), "--yaml", str(yaml_path), "--out", str(out)]) == 0
  assert not marker.exists()
  assert checkpoints.read_config(str(out)).precond.temb_type == meta["precond"]["temb_type"]


# --------------------------------------------------------------------------------------------------
# Released checkpoints: architecture, YAML handling, fetching.

IM256_YAML = textwrap.dedent("""\
    label_dim: 1000
    resolution: 32 #latent resolution
    channels: 4
    encoder:
      class_name: training.encoders.StabilityVAEEncoder
      vae_name: stabilityai/sd-vae-ft-ema
    network:
      class_name: training.preconds.IMMPrecond
      model_type: "DiT_XL_2"
      s_embed: true
      noise_schedule: fm
      f_type: euler_fm
      temb_type: stride
      time_scale: 1000
      sigma_data: 0.5
      eps: 0.
      T: 0.994
    sampling:
      1_steps_cfg1.5_pushforward_uniform: {}
      2_steps_cfg1.5_pushforward_uniform: {}
      4_steps_cfg1.5_pushforward_uniform: {}
      8_steps_cfg1.5_pushforward_uniform: {}
    """)


def test_authors_yaml_gives_the_released_network(tmp_path):
  path = tmp_path / "im256_generate_images.yaml"
  path.write_text(IM256_YAML)
  meta, notes = generation_yaml.meta_from_generation_config(
      generation_yaml.read_generation_yaml(str(path)), pickle_attributes={"temb_type": "stride"})
  assert notes == []
  want = released.network_meta("imagenet256_ts_a2")
  assert {k: float(v) if isinstance(v, (int, float)) else v for k, v in meta["precond"].items()} == \
         {k: float(v) if isinstance(v, (int, float)) else v for k, v in want["precond"].items()}
  assert meta["model"] == want["model"] and meta["sample"] == want["sample"]
  assert set(meta["precond"]) <= set(PRECOND_KEYS)


def test_released_configs():
  from imm_jax.configs_loader import load_config
  from imm_jax.models import count_params

  cifar = load_config("released", "cifar10")
  m = build_model(cifar)
  assert (m.input_shape, m.num_classes, m.kind) == ((32, 32, 3), 0, "image")
  assert (cifar.precond.f_type, cifar.precond.temb_type, cifar.imm.eps, cifar.imm.T) == (
      "simple_edm", "identity", 0.006, 0.994)
  assert (tuple(cifar.model.channel_mult), cifar.model.model_channels, cifar.model.num_blocks,
          tuple(cifar.model.attn_resolutions)) == ((2, 2, 2), 128, 4, (16,))
  assert 55.5e6 < count_params(m.abstract_params()) < 56.5e6  # 55.7M + the s embedding MLP
  for name, temb in (("imagenet256_ts_a2", "stride"), ("imagenet256_s_a1", "identity")):
    c = load_config("released", name)
    assert (c.model.name, c.model.patch_size, c.model.hidden_size, c.model.depth, c.model.num_heads) == (
        "dit", 2, 1152, 28, 16)
    assert (tuple(c.data.shape), c.data.num_classes, c.data.kind) == ((32, 32, 4), 1000, "latent")
    assert (c.precond.f_type, c.precond.temb_type, c.imm.eps, c.imm.T) == ("euler_fm", temb, 0.0, 0.994)
    assert (c.sample.cfg_scale, c.sample.schedule, tuple(c.sample.steps)) == (1.5, "uniform", (1, 2, 4, 8))
  with pytest.raises(ValueError, match="imagenet256_ts_a2"):
    load_config("released", "imagenet512")


def test_fetch_offline_says_what_to_download(tmp_path, monkeypatch):
  def offline(*args, **kwargs):
    raise urllib.error.URLError("no network")

  monkeypatch.setattr(released.urllib.request, "urlopen", offline)
  with pytest.raises(released.FetchError) as e:
    released.fetch("imagenet256_s_a1", str(tmp_path))
  message = str(e.value)
  assert "\n" not in message
  assert "https://huggingface.co/lumaai/imm/resolve/main/imagenet256_s_a1.pkl" in message
  assert str(tmp_path / "imagenet256_s_a1.pkl") in message and "--pickle" in message
  assert not list(tmp_path.iterdir())  # no partial file left
  (tmp_path / "cifar10.pt").write_bytes(b"")
  assert released.fetch("cifar10", str(tmp_path)) == str(tmp_path / "cifar10.pt")  # no download


def test_cli_source_errors_are_one_line(tmp_path, capsys):
  for argv, needle in (([], "give one source"), (["--pickle", "x.pkl"], "--yaml"),
                       (["--yaml", "x.yaml"], "--pickle"),
                       (["--reference", str(tmp_path / "none.npz")], "not found")):
    with pytest.raises(SystemExit) as e:
      cli.main(argv + ["--out", str(tmp_path / "wd")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
