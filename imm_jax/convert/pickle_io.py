"""Read the authors' EDM-style checkpoint pickles without running any code stored in them.

A released checkpoint (``imagenet256_ts_a2.pkl``, ``cifar10.pt``, ...) is a pickled dict whose ``'ema'``
entry is the precond module. The authors' classes are pickled through
``torch_utils.persistence._reconstruct_persistent_obj(meta)``, where ``meta`` carries the class's
``module_src`` (Python source that EDM's loader would ``exec``) and ``state`` (the object's ``__dict__``:
``_parameters``, ``_buffers``, ``_modules``, ...); torch and timm modules are pickled normally.

``RestrictedUnpickler`` resolves only an allow-list of globals:

* that persistence function -> :class:`PersistentObject`, which records ``class_name`` and ``state`` and
  never looks at ``module_src``;
* classes and functions of ``torch.nn``, ``timm``, ``training``, ``torch_utils``, ``dnnlib``, ``omegaconf``
  -> inert stand-ins (:class:`StandIn` subclasses) that only record their arguments and state;
* tensor reconstruction -> torch's own functions, with storages read by ``torch.load(weights_only=True)``
  (torch is an optional dependency: ``pip install 'imm_jax[torch]'``);
* a few plain containers and dtypes (``collections.OrderedDict``, ``torch.float32``, numpy scalars).

Anything else (``os.system``, ``builtins.eval``, an unknown module, ...) is refused with an error naming
the global. ``state_dict_from_module`` then walks ``_modules`` into the flat state dict (keys as
``torch.nn.Module.state_dict()`` writes them, e.g. ``model.blocks.0.attn.qkv.weight``).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any, Mapping

import numpy as np

PERSISTENCE_MODULE = "torch_utils.persistence"
PERSISTENCE_FUNCTION = "_reconstruct_persistent_obj"
# Modules whose classes (and functions) become inert stand-ins.
_STAND_IN_PREFIXES = ("torch.nn.modules.", "torch.nn.parameter", "timm.", "training.", "torch_utils.",
                      "dnnlib.", "omegaconf.", "functools")
_SAFE_BUILTINS = {"set", "frozenset", "slice", "range", "complex", "bytearray", "object", "tuple", "list",
                  "dict", "int", "float", "bool", "str", "bytes"}
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first record of torch.save's pre-zip format


class PickleError(ValueError):
  """The file is not a checkpoint this converter can read safely."""


def _require_torch():
  try:
    import torch
  except ImportError:
    raise PickleError("reading a PyTorch checkpoint needs torch: pip install 'imm_jax[torch]' "
                      "(or pip install torch; the CPU build is enough)") from None
  return torch


class StandIn:
  """An inert stand-in for a class or function named in the pickle: records what it is given."""

  qualified_name = "?"

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    obj.args, obj.kwargs, obj.state, obj.items, obj.list_items = args, kwargs, None, {}, []
    return obj

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):  # dict subclasses (EasyDict, ...)
    self.items[key] = value

  def append(self, value):  # list subclasses
    self.list_items.append(value)

  def extend(self, values):
    self.list_items.extend(values)

  def __repr__(self):
    return f"<stand-in {self.qualified_name}>"


class PersistentObject:
  """What ``_reconstruct_persistent_obj(meta)`` stands for: the class name and the pickled state.
  ``module_src`` is deliberately not kept."""

  def __init__(self, meta):
    if not isinstance(meta, Mapping):
      raise PickleError(f"{PERSISTENCE_MODULE}.{PERSISTENCE_FUNCTION} called with {type(meta).__name__}, "
                        f"not a meta dict")
    self.class_name = str(meta.get("class_name", "?"))
    self.version = meta.get("version")
    self.state = meta.get("state")

  def __repr__(self):
    return f"<persistent {self.class_name}>"


_stand_in_classes: dict[str, type] = {}


def _stand_in(module: str, name: str) -> type:
  key = f"{module}.{name}"
  if key not in _stand_in_classes:
    _stand_in_classes[key] = type(name, (StandIn,), {"qualified_name": key, "__module__": __name__})
  return _stand_in_classes[key]


def _torch_global(name: str):
  """The tensor-reconstruction functions of torch a pickle may name, made safe."""
  torch = _require_torch()

  def load_from_bytes(b):  # torch.storage._load_from_bytes, minus its unrestricted torch.load
    return torch.load(io.BytesIO(b), weights_only=True, map_location="cpu")

  def rebuild_tensor_v2(storage, *args):
    if not isinstance(storage, (torch.storage.TypedStorage, torch.storage.UntypedStorage)):
      raise PickleError(f"_rebuild_tensor_v2 given a {type(storage).__name__}, not a torch storage")
    return torch._utils._rebuild_tensor_v2(storage, *args)

  def rebuild_parameter(data, *args):  # a Parameter is read as its data tensor
    return data

  def rebuild_from_type_v2(func, new_type, args, state):  # tensor subclasses: the plain tensor
    return func(*args)

  table = {
      "torch.storage._load_from_bytes": load_from_bytes,
      "torch._utils._rebuild_tensor_v2": rebuild_tensor_v2,
      "torch._utils._rebuild_tensor": rebuild_tensor_v2,
      "torch._utils._rebuild_parameter": rebuild_parameter,
      "torch._utils._rebuild_parameter_with_state": rebuild_parameter,
      "torch._tensor._rebuild_from_type_v2": rebuild_from_type_v2,
      "torch.device": torch.device,
      "torch.Size": torch.Size,
  }
  return table.get(name)


class RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that resolves only the allow-list above (see the module docstring)."""

  def find_class(self, module: str, name: str):
    full = f"{module}.{name}"
    if module == PERSISTENCE_MODULE and name == PERSISTENCE_FUNCTION:
      return PersistentObject
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
      return getattr(__import__("builtins"), name)
    if module in ("copyreg", "copy_reg") and name == "_reconstructor":
      return _reconstructor
    if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray") and name in (
        "scalar", "_reconstruct", "dtype", "ndarray"):
      return _numpy_global(name)
    if module == "torch" or (module.startswith("torch.") and not module.startswith("torch.nn.")):
      fn = _torch_global(full)
      if fn is not None:
        return fn
      torch = _require_torch()
      if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if any(full.startswith(p) or module == p.rstrip(".") for p in _STAND_IN_PREFIXES):
      return _stand_in(module, name)
    raise PickleError(f"the pickle references the global {full}, which the converter refuses to load "
                      f"(it only rebuilds tensors and records module state; no code from the file runs)")


def _reconstructor(cls, base, state):
  """copyreg._reconstructor for protocol-0/1 pickles, for stand-in classes only."""
  if not (isinstance(cls, type) and issubclass(cls, (StandIn, collections.OrderedDict))):
    raise PickleError(f"copyreg._reconstructor asked to build {cls!r}")
  return cls.__new__(cls)


def _numpy_global(name: str):
  if name == "scalar":
    try:
      from numpy._core.multiarray import scalar  # numpy 2
    except ImportError:
      from numpy.core.multiarray import scalar  # numpy 1
    return scalar
  if name == "_reconstruct":
    return _numpy_reconstruct
  return {"dtype": np.dtype, "ndarray": np.ndarray}[name]


def _numpy_reconstruct(subtype, shape, dtype):
  if subtype is not np.ndarray:
    raise PickleError(f"numpy _reconstruct of {subtype!r}")
  return np.ndarray.__new__(np.ndarray, shape, dtype)


class _RestrictedPickleModule:
  """What ``torch.load(pickle_module=...)`` needs (for torch.save zip archives)."""

  Unpickler = RestrictedUnpickler
  UnpicklingError = pickle.UnpicklingError

  @staticmethod
  def load(f, **kwargs):
    return RestrictedUnpickler(f, **kwargs).load()


def load_checkpoint_pickle(path: str) -> Any:
  """The unpickled object of an EDM-style checkpoint (plain pickle, or a torch.save archive), with
  stand-ins for every class (see the module docstring). No code stored in the file runs."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: file not found")
  if zipfile.is_zipfile(path):
    return _torch_load(path)
  with open(path, "rb") as f:
    try:
      obj = RestrictedUnpickler(f).load()
    except PickleError:
      raise
    except Exception as e:  # truncated / not a pickle
      raise PickleError(f"{path}: not a readable checkpoint pickle ({type(e).__name__}: {e})") from None
  if isinstance(obj, int) and obj == _TORCH_LEGACY_MAGIC:
    return _torch_load(path)
  return obj


def _torch_load(path: str):
  torch = _require_torch()
  return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)


def _state(obj) -> dict:
  """The recorded ``__dict__`` of a pickled module."""
  state = obj.state
  if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
    merged = dict(state[0] or {})
    merged.update(state[1] or {})
    state = merged
  if not isinstance(state, Mapping):
    raise PickleError(f"{obj!r} has no recorded module state")
  return state


def _is_module(obj) -> bool:
  return isinstance(obj, (PersistentObject, StandIn)) and isinstance(getattr(obj, "state", None),
                                                                      (Mapping, tuple))


def module_class_name(obj) -> str:
  if isinstance(obj, PersistentObject):
    return obj.class_name
  if isinstance(obj, StandIn):
    return obj.qualified_name.rsplit(".", 1)[-1]
  return type(obj).__name__


def _to_numpy(tensor, key: str) -> np.ndarray:
  torch = _require_torch()
  if not isinstance(tensor, torch.Tensor):
    raise PickleError(f"{key}: expected a tensor, found {type(tensor).__name__}")
  tensor = tensor.detach().cpu()
  if tensor.is_floating_point() and tensor.dtype != torch.float64:
    tensor = tensor.float()
  return tensor.numpy()  # shares the tensor's memory (a copy would double the peak for DiT-XL)


def state_dict_from_module(module, prefix: str = "") -> dict[str, np.ndarray]:
  """The flat state dict of a pickled module (parameters and persistent buffers, ``.``-joined names,
  float tensors as float32 numpy arrays), as ``torch.nn.Module.state_dict()`` would list it."""
  out: dict[str, np.ndarray] = {}

  def walk(obj, pre):
    state = _state(obj)
    for name, tensor in (state.get("_parameters") or {}).items():
      if tensor is not None:
        out[pre + name] = _to_numpy(tensor, pre + name)
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for name, tensor in (state.get("_buffers") or {}).items():
      if tensor is not None and name not in skip:
        out[pre + name] = _to_numpy(tensor, pre + name)
    for name, child in (state.get("_modules") or {}).items():
      if child is None:
        continue
      if not _is_module(child):
        raise PickleError(f"{pre + name}: a submodule of type {type(child).__name__} has no recorded state")
      walk(child, pre + name + ".")

  walk(module, prefix)
  return out


_PLAIN = (str, int, float, bool, type(None))


def plain_attributes(module) -> dict[str, Any]:
  """The module's plain (str / number / bool / None) attributes, e.g. the precond's img_resolution,
  label_dim, f_type, temb_type, eps and T."""
  return {k: v for k, v in _state(module).items() if isinstance(v, _PLAIN) and not k.startswith("_")}


def read_released_pickle(path: str, entry: str = "ema"):
  """``(state_dict, precond_attributes, class_name)`` of the ``entry`` module of an EDM-style pickle."""
  obj = load_checkpoint_pickle(path)
  if not isinstance(obj, Mapping) or entry not in obj:
    found = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
    raise PickleError(f"{path}: expected a dict with an {entry!r} entry (EDM-style checkpoint), found {found}")
  module = obj[entry]
  if not _is_module(module):
    raise PickleError(f"{path}: the {entry!r} entry is a {type(module).__name__}, not a pickled module")
  return state_dict_from_module(module), plain_attributes(module), module_class_name(module)
