"""Builds what training, sampling and evaluation share from one config: data info, network, precond."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from imm_jax import data as data_lib
from imm_jax.models import create_network
from imm_jax.models.precond import Precond


@dataclasses.dataclass(frozen=True)
class Model:
  net: nn.Module
  precond: Precond
  input_shape: tuple[int, ...]  # per example, model space
  num_classes: int              # 0: unconditional
  kind: str                     # 'image', 'points' or 'latent' (e.g. SD-VAE latents; no decoder yet)

  @property
  def null_label(self) -> int | None:
    """The label id meaning "no class" (classifier-free guidance), None for unconditional models."""
    return self.num_classes if self.num_classes > 0 else None

  def guided(self, cfg_scale: float) -> bool:
    """Whether sampling at ``cfg_scale`` runs the guidance pass (a class-conditional model, scale != 1)."""
    return self.null_label is not None and cfg_scale != 1.0

  def init_params(self, rng, batch_size: int = 1):
    x = jnp.zeros((batch_size,) + self.input_shape, jnp.float32)
    c = jnp.zeros((batch_size,), jnp.float32)
    y = jnp.zeros((batch_size,), jnp.int32) if self.null_label is not None else None
    return self.net.init({"params": rng}, x, c, c, y, train=False)["params"]

  def abstract_params(self, sharding=None):
    """Parameter shapes (no computation), placed on ``sharding`` (default: this process's first device,
    which every host can address)."""
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shapes = jax.eval_shape(lambda: self.init_params(jax.random.key(0)))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


NO_DATA = "none"
DATA_KINDS = ("image", "points", "latent")


def data_info(config) -> data_lib.DataInfo:
  """What the model needs to know about the data: from the dataset named by ``config.data.name``, or,
  when that is ``'none'`` (a sampling-only workdir such as a converted reference checkpoint, which has
  no dataset), from ``config.data.shape`` (one example in model space, e.g. [32, 32, 4]),
  ``config.data.num_classes`` (0: unconditional) and ``config.data.kind``."""
  if config.data.name != NO_DATA:
    return data_lib.get_info(config.data)
  shape = tuple(int(d) for d in (config.data.get("shape", None) or ()))
  if not shape:
    raise ValueError("config.data.name='none' needs config.data.shape (one example's shape in model "
                     "space, e.g. [32, 32, 3])")
  kind = str(config.data.get("kind", "image"))
  if kind not in DATA_KINDS:
    raise ValueError(f"unknown config.data.kind {kind!r}: choose one of {DATA_KINDS}")
  return data_lib.DataInfo(shape=shape, num_classes=int(config.data.get("num_classes", 0)), kind=kind,
                           name=NO_DATA)


def build_model(config, info: data_lib.DataInfo | None = None) -> Model:
  """The network named by ``config.model`` on the data's shape; conditional when
  ``config.model.class_conditional`` and the data has labels."""
  info = data_info(config) if info is None else info
  conditional = bool(config.model.get("class_conditional", False))
  num_classes = int(config.model.get("num_classes", 0) or info.num_classes) if conditional else 0
  if conditional and num_classes == 0:
    raise ValueError(f"config.model.class_conditional=True but dataset {info.name!r} has no labels")
  net_cfg = config.model.copy_and_resolve_references()
  with net_cfg.unlocked():
    del net_cfg["class_conditional"]
    if "num_classes" in net_cfg:
      del net_cfg["num_classes"]
  net = create_network(net_cfg, input_shape=info.shape, num_classes=num_classes)
  return Model(net=net, precond=Precond.from_config(config.precond), input_shape=tuple(info.shape),
               num_classes=num_classes, kind=info.kind)
