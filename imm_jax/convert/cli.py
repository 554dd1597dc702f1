"""Convert a reference IMM network into an imm_jax sampling workdir.

  python -m imm_jax.convert --name imagenet256_ts_a2 --out workdirs/in256_ts_a2   # fetch + convert
  python -m imm_jax.convert --pickle imagenet256_ts_a2.pkl --yaml im256_generate_images.yaml --out DIR
  python -m imm_jax.convert --pickle cifar10.pt --name cifar10 --out DIR          # no YAML needed
  python -m imm_jax.convert --reference dit_small_stride.npz --out DIR             # a test vector

then ``python -m imm_jax.sample --workdir DIR ...``. Sources:

* ``--name``: a released checkpoint (cifar10 | imagenet256_ts_a2 | imagenet256_s_a1), fetched from
  https://huggingface.co/lumaai/imm into --download-dir (default ~/.cache/imm_jax/released, or
  $IMM_JAX_CHECKPOINT_DIR) unless already there; its network is known (imm_jax.convert.released).
* ``--pickle FILE`` (.pkl / .pt, EDM-style; needs torch) with ``--yaml`` (the authors' generation config,
  whose ``network:`` section names the architecture and precond options) or ``--name``. The pickle is
  read by a restricted unpickler: no code stored in the file runs (imm_jax.convert.pickle_io).
* ``--reference VEC.npz``: the test-vector format (``state_dict/<key>`` arrays + ``meta`` JSON).

Errors (unknown / missing keys, shape mismatches, unsupported options) are one line naming the key.
"""

from __future__ import annotations

import argparse
import os
import sys

from imm_jax.convert.released import NAMES
from imm_jax.io_utils import fail


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m imm_jax.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_argument_group("source (one of)")
  src.add_argument("--reference", help="A state dict in the test-vector format (.npz: state_dict/<key>, meta).")
  src.add_argument("--pickle", help="A released checkpoint pickle (.pkl / .pt); needs --yaml or --name.")
  src.add_argument("--name", choices=NAMES, help="A released checkpoint: fetched from Hugging Face "
                   "lumaai/imm (or, with --pickle, the architecture of that file).")
  p.add_argument("--yaml", help="The authors' generation YAML for --pickle (its network: section).")
  p.add_argument("--download-dir", "--download_dir", dest="download_dir",
                 help="Where --name looks for / downloads the checkpoint file (default: "
                      "$IMM_JAX_CHECKPOINT_DIR or ~/.cache/imm_jax/released).")
  p.add_argument("--out", required=True, help="The workdir to write (config.json + checkpoints/).")
  p.add_argument("--overwrite", action="store_true",
                 help="Replace the config.json and checkpoints/ of an existing non-empty --out.")
  return p


def load_source(*, reference: str | None = None, pickle: str | None = None, yaml: str | None = None,
                name: str | None = None, download_dir: str | None = None):
  """``(state_dict, meta, source, notes)`` for one of the three sources (see the module docstring)."""
  from imm_jax.convert import released
  from imm_jax.convert.reference import load_reference_npz

  if reference:
    if pickle or yaml or name:
      raise ValueError("--reference takes no --pickle / --yaml / --name")
    if not os.path.exists(reference):
      raise FileNotFoundError(f"--reference={reference}: file not found")
    state_dict, meta, _ = load_reference_npz(reference)
    return state_dict, meta, os.path.abspath(reference), []
  if yaml and not pickle:
    raise ValueError("--yaml goes with --pickle FILE (the checkpoint it describes)")
  if not pickle and not name:
    raise ValueError("give one source: --name NAME, --pickle FILE (with --yaml GEN.yaml or --name NAME) "
                     "or --reference VEC.npz")
  if pickle and not (yaml or name):
    raise ValueError(f"--pickle={pickle} needs --yaml GEN.yaml (the authors' generation config, whose "
                     f"network: section names the architecture) or --name {'|'.join(released.NAMES)}")
  if pickle and yaml and name:
    raise ValueError("give --yaml or --name with --pickle, not both")

  from imm_jax.convert import generation_yaml, pickle_io

  path = pickle or released.fetch(name, download_dir)
  state_dict, attributes, class_name = pickle_io.read_released_pickle(path)
  if class_name != "IMMPrecond":
    raise ValueError(f"{path}: the 'ema' module is a {class_name}, not an IMMPrecond")
  if yaml:
    meta, notes = generation_yaml.meta_from_generation_config(
        generation_yaml.read_generation_yaml(yaml), pickle_attributes=attributes)
  else:
    meta = released.network_meta(name)
    notes = generation_yaml.disagreements(meta["precond"], attributes, f"--name {name}")
  return state_dict, meta, os.path.abspath(path), notes


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  from imm_jax.convert.pickle_io import PickleError
  from imm_jax.convert.released import FetchError
  from imm_jax.convert.workdir import check_out, convert_to_workdir

  try:
    check_out(args.out, args.overwrite)  # before a download or a long read
    state_dict, meta, source, notes = load_source(
        reference=args.reference, pickle=args.pickle, yaml=args.yaml, name=args.name,
        download_dir=args.download_dir)
    for note in notes:
      print(f"note: {note}", file=sys.stderr)
    config = convert_to_workdir(state_dict, meta, args.out, overwrite=args.overwrite, source=source)
  except (ValueError, FileNotFoundError, FileExistsError, PickleError, FetchError) as e:
    fail(str(e))
  classes = f"{config.data.num_classes} classes" if config.data.num_classes else "unconditional"
  print(f"wrote {args.out}: {config.model.name} on {tuple(config.data.shape)} {config.data.kind}s "
        f"({classes}), f={config.precond.f_type}, temb={config.precond.temb_type}, eps={config.imm.eps}, "
        f"T={config.imm.T}; sample it with: python -m imm_jax.sample --workdir {args.out} --steps N --out S.npz")
  return 0


if __name__ == "__main__":
  sys.exit(main())
