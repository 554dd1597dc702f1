#!/usr/bin/env bash
# Train imm_jax on a Cloud TPU VM pod slice: every worker runs the same `python -m imm_jax.train`, and
# jax.distributed finds the other workers by itself (imm_jax.distributed).
#
#   export TPU_NAME=imm-xl ZONE=us-east5-a ACCELERATOR_TYPE=v5p-64 RUNTIME_VERSION=v2-alpha-tpuv5
#   CONFIG=configs/imagenet256.py:XL/2 launch/tpu_pod.sh check --config.batch_size=4096
#                                                 # here, before renting: compile the step for that slice
#                                                 # (memory per chip, XLA's time estimate; v5e/v5p/v6e)
#   launch/tpu_pod.sh create                      # the pod slice (SPOT=1 for a spot slice)
#   launch/tpu_pod.sh setup                       # copy this checkout to every worker, make a venv, pip install
#   CONFIG=configs/imagenet256.py:XL/2 WORKDIR=gs://my-bucket/imm/xl2 \
#     launch/tpu_pod.sh train --config.batch_size=4096   # extra arguments go to imm_jax.train
#   launch/tpu_pod.sh logs                        # follow worker 0's log
#   launch/tpu_pod.sh stop                        # SIGTERM on every worker: the trainer saves and exits
#   WORKDIR=gs://my-bucket/imm/xl2 launch/tpu_pod.sh evaluate --steps 1 2 4 8 --cfg-scale 1.5 \
#     --ref /gcs/my-bucket/VIRTUAL_imagenet256_labeled.npz --vae /gcs/my-bucket/sd-vae-ft-ema \
#     --inception /gcs/my-bucket/pt_inception-2015-12-05-6726825d.pth
#                                                 # imm_jax.evaluate on every worker (a slice's hosts run
#                                                 # one JAX program together); files it reads must be on
#                                                 # every worker, e.g. in the mounted bucket
#   launch/tpu_pod.sh logs evaluate               # follow it; `stop evaluate` ends it
#   launch/tpu_pod.sh delete
#
# DRY_RUN=1 (or --dry-run as the first argument) prints the commands instead of running them.
#
# Settings (environment): TPU_NAME (imm-jax), ZONE (us-central2-b), ACCELERATOR_TYPE (v4-32),
# RUNTIME_VERSION (tpu-ubuntu2204-base), PROJECT (gcloud's default), SPOT (0), REPO_URL / REPO_REF (clone
# that instead of copying this checkout), EXTRAS (more pip extras of imm_jax than "tpu", e.g. "test"),
# JAX_SPEC (a pin installed with it, e.g. "jax==0.10.2"; the tpu extra brings the matching libtpu), CONFIG,
# WORKDIR, PYTHON (check's interpreter: .venv/bin/python, else python3).
#
# WORKDIR must be storage every worker sees (the checkpoints are written by all workers together, the
# metrics by worker 0). imm_jax writes its workdir with ordinary file operations, so a gs://BUCKET/PATH
# workdir is mounted with gcsfuse on every worker at /gcs/BUCKET and the trainer gets /gcs/BUCKET/PATH.
set -euo pipefail

TPU_NAME=${TPU_NAME:-imm-jax}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
PROJECT=${PROJECT:-}
SPOT=${SPOT:-0}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-main}
EXTRAS=${EXTRAS:-}
JAX_SPEC=${JAX_SPEC:-}
DRY_RUN=${DRY_RUN:-0}
# Paths on the workers, expanded there (never inside single quotes).
REMOTE_DIR='$HOME/imm_jax'
REMOTE_VENV='$HOME/imm-venv'
# Each job (train, evaluate) logs to $HOME/imm_<job>.log and records its pid in $HOME/imm_<job>.pid.
REMOTE_JOB='$HOME/imm_'

if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

# Prints an argument list the way a shell would read it back (single quotes where needed).
quote() {
  local out=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

run() {
  if [[ "$DRY_RUN" == "1" ]]; then
    echo "+ $(quote "$@")"
  else
    "$@"
  fi
}

gcloud_tpu() {  # gcloud compute tpus tpu-vm SUBCOMMAND [TPU_NAME] ARGS... --zone=ZONE [--project=PROJECT]
  local sub=$1
  shift
  local args=(gcloud compute tpus tpu-vm "$sub")
  [[ "$sub" != scp ]] && args+=("$TPU_NAME")  # scp names the TPU in its destination instead
  args+=("$@" "--zone=$ZONE")
  [[ -n "$PROJECT" ]] && args+=("--project=$PROJECT")
  run "${args[@]}"
}

on_all_workers() {
  gcloud_tpu ssh --worker=all "--command=$1"
}

create() {
  local extra=()
  [[ "$SPOT" == "1" ]] && extra+=(--spot)
  gcloud_tpu create "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION" "${extra[@]}"
}

setup() {
  local repo_root fetch
  repo_root=$(cd "$(dirname "$0")/.." && pwd)
  if [[ -n "$REPO_URL" ]]; then
    fetch="rm -rf $REMOTE_DIR && git clone --depth 1 --branch $REPO_REF $REPO_URL $REMOTE_DIR"
  else
    # This checkout as it is (tracked and untracked files, minus what .gitignore excludes).
    local tarball=/tmp/imm_jax_${TPU_NAME}.tar.gz
    if [[ "$DRY_RUN" == "1" ]]; then
      echo "+ (cd $repo_root && git ls-files -z --cached --others --exclude-standard | tar czf $tarball --null -T -)"
    else
      (cd "$repo_root" && git ls-files -z --cached --others --exclude-standard | tar czf "$tarball" --null -T -)
    fi
    gcloud_tpu scp "$tarball" "$TPU_NAME:imm_jax.tar.gz" --worker=all
    fetch="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar xzf \$HOME/imm_jax.tar.gz -C $REMOTE_DIR"
  fi
  local spec="$REMOTE_DIR[tpu${EXTRAS:+,$EXTRAS}]" pin=""
  [[ -n "$JAX_SPEC" ]] && pin=" '$JAX_SPEC'"
  # gcsfuse: for gs:// workdirs (see the header).
  local gcsfuse="curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null"
  gcsfuse+=" && echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null"
  gcsfuse+=" && sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse python3-venv"
  on_all_workers "set -e; $fetch; $gcsfuse; python3 -m venv $REMOTE_VENV && $REMOTE_VENV/bin/pip install -q -U pip && $REMOTE_VENV/bin/pip install -q -e \"$spec\"$pin"
}

check() {  # on this machine: imm_jax.aot compiles the step for ACCELERATOR_TYPE's chips (needs the tpu extra)
  : "${CONFIG:?set CONFIG, e.g. CONFIG=configs/imagenet256.py:XL/2}"
  local repo_root python=${PYTHON:-}
  repo_root=$(cd "$(dirname "$0")/.." && pwd)
  [[ -z "$python" ]] && { [[ -x "$repo_root/.venv/bin/python" ]] && python=$repo_root/.venv/bin/python || python=python3; }
  run "$python" -m imm_jax.aot "--config=$CONFIG" "--target=$ACCELERATOR_TYPE" "$@"
}

# start JOB ARGS...: python -m imm_jax.JOB --workdir=WORKDIR ARGS on every worker, detached (nohup) so that
# a dropped ssh session does not end it; `logs JOB` follows it, `stop JOB` ends it.
start() {
  local job=$1
  shift
  : "${WORKDIR:?set WORKDIR, e.g. WORKDIR=gs://my-bucket/imm/xl2}"
  local workdir=$WORKDIR mount=""
  if [[ "$WORKDIR" == gs://* ]]; then
    local path=${WORKDIR#gs://}
    local bucket=${path%%/*}
    workdir=/gcs/$path
    mount="mountpoint -q /gcs/$bucket || { sudo mkdir -p /gcs/$bucket && sudo chown \$USER /gcs/$bucket && gcsfuse --implicit-dirs --rename-dir-limit=1000000 $bucket /gcs/$bucket; }; "
  else
    echo "note: WORKDIR=$WORKDIR is not gs://; it must be a file system shared by all workers" >&2
  fi
  local args
  args=$(quote "--workdir=$workdir" "$@")
  on_all_workers "${mount}cd $REMOTE_DIR && { IMM_DISTRIBUTED=auto nohup $REMOTE_VENV/bin/python -m imm_jax.$job $args < /dev/null > $REMOTE_JOB$job.log 2>&1 & echo \$! > $REMOTE_JOB$job.pid; }"
}

job_name() {  # logs / stop: train (default) or evaluate
  case "${1:-train}" in
    train|evaluate) echo "${1:-train}" ;;
    *) echo "unknown job '$1': use train | evaluate" >&2; exit 2 ;;
  esac
}

logs() {
  local job
  job=$(job_name "$@")
  gcloud_tpu ssh --worker=0 "--command=tail -n 100 -f $REMOTE_JOB$job.log"
}

stop() {  # the process that `start` started on each worker, by its pid
  local job
  job=$(job_name "$@")
  on_all_workers "kill -TERM \$(cat $REMOTE_JOB$job.pid) && echo \"sent SIGTERM to \$(cat $REMOTE_JOB$job.pid)\" || true"
}

delete() {
  gcloud_tpu delete --quiet
}

command=${1:-}
[[ $# -gt 0 ]] && shift
case "$command" in
  check) check "$@" ;;
  create) create ;;
  setup) setup ;;
  train) : "${CONFIG:?set CONFIG, e.g. CONFIG=configs/imagenet256.py:XL/2}"; start train "--config=$CONFIG" "$@" ;;
  evaluate) start evaluate "$@" ;;
  logs) logs "$@" ;;
  stop) stop "$@" ;;
  delete) delete ;;
  -h|--help|help) usage ;;
  *) usage >&2; echo "unknown command '${command}': use check | create | setup | train | evaluate | logs | stop | delete" >&2; exit 2 ;;
esac
