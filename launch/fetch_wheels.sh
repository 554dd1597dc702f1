#!/usr/bin/env bash
# Wheels of imm_jax's dependencies that a GPU machine without package-index access lacks, for its
# Python (default 3.12, x86_64 Linux). Here "lacks" is what NVIDIA GPU images with jax, flax, optax and
# orbax-checkpoint preinstalled usually miss: grain (+ array_record, portpicker), ml_collections and clu.
# Do not replace that machine's jax/jaxlib (they carry its CUDA plugin).
#
#   launch/fetch_wheels.sh [DIR]                     # on a machine with pip access; default DIR: .whl
#   # copy the checkout (with DIR) to the GPU machine, then there:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   launch/gpu_benchmarks.sh
#
# Settings (environment): PY_VERSION (3.12), PACKAGES (the list below, pinned to versions tested with
# imm_jax). DIR is added to .git/info/exclude so the wheels are never committed.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${1:-.whl}
PY_VERSION=${PY_VERSION:-3.12}
PACKAGES=${PACKAGES:-"grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0 clu==0.0.12"}

mkdir -p "$DIR"
if [[ -d .git ]] && ! grep -qxF "/$DIR/" .git/info/exclude 2>/dev/null; then
  echo "/$DIR/" >> .git/info/exclude
fi
platforms=()
for n in 17 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
# shellcheck disable=SC2086  # PACKAGES is a list
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 -d "$DIR" $PACKAGES
ls -1 "$DIR"
du -sh "$DIR"
