#!/usr/bin/env bash
# The H100 benchmark suite of docs/benchmarks.md on one NVIDIA GPU: training throughput of DiT-XL/2,
# DiT-B/2 and DDPM++ CIFAR-10 and DiT-XL/2 sampling with guidance, each through `python -m imm_jax.benchmark`
# (the real jitted step and sampler, bf16 compute, float32 parameters and MMD).
#
#   launch/gpu_benchmarks.sh [OUT_DIR]          # default OUT_DIR: benchmark_results/<date>
#   ONLY=xl2_train,b2_train launch/gpu_benchmarks.sh
#
# Issue 8's five workloads run first (the DiT ones with cuBLAS GEMMs, see below), then the four DiT ones
# again with XLA's default (Triton) GEMMs.
# Each run's full output goes to OUT_DIR/<name>.txt and one line per run to OUT_DIR/summary.txt; a run
# that fails or passes PER_RUN_TIMEOUT (seconds, default 240) is recorded as such and the suite goes on.
# Settings (environment): PYTHON (python3), PEAK_TFLOPS (775, the matmul ceiling the issue measured on an
# H100; ~790 on an H200), PER_RUN_TIMEOUT, ONLY (comma-separated run names), EXTRA (arguments added to
# every run, e.g. "--repeats 20"), PROFILE (1, the default: also trace 3 steps of each run into
# OUT_DIR/profile_<name> and summarise where the device time goes; 0: timing only),
# XLA_CLIENT_MEM_FRACTION (0.92), DRY_RUN (1: print the commands, run nothing). On a machine without pip
# access, install the packages from wheels first (launch/fetch_wheels.sh).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${1:-benchmark_results/$(date +%Y-%m-%d)}
PYTHON=${PYTHON:-python3}
PEAK_TFLOPS=${PEAK_TFLOPS:-775}
PER_RUN_TIMEOUT=${PER_RUN_TIMEOUT:-240}
ONLY=${ONLY:-}
EXTRA=${EXTRA:-}
PROFILE=${PROFILE:-1}
DRY_RUN=${DRY_RUN:-0}

BF16="--config.model.dtype=bfloat16"
DIT="$BF16 --config.model.attention_impl=cudnn"
# Without Triton GEMMs XLA:GPU calls cuBLAS(Lt), which writes the bias and the tanh-GELU (with its
# input, for the backward) in the fc1 GEMM's epilogue: compiled for an H100 (python -m imm_jax.aot
# --target h100, docs/benchmarks.md) only these programs' rooflines clear issue 8's DiT targets, so
# they run first. Whether cuBLAS's GEMMs are as fast as autotuned Triton ones only a GPU says: the
# second half runs the DiT workloads with XLA's default GEMMs.
CUBLAS="--xla_gpu_enable_triton_gemm=false"
# name|XLA_FLAGS|arguments of imm_jax.benchmark: issue 8's table (same batch sizes), then the DiT runs
# again with XLA's default GEMMs. No rematerialisation: compiled for an H100 the XL/2 step takes 47 GiB
# (60% of the GPU) without it, and the dots policy costs 11% more time at the roofline (B/2: 15%).
XL2_TRAIN="--config configs/imagenet256.py:XL/2 --config.batch_size=128 $DIT --what train"
B2_TRAIN="--config configs/imagenet256.py:B/2 --config.batch_size=256 $DIT --what train"
# configs/cifar10.py's step includes EDM's augmentation (imm_jax/augment.py); the last run times the step
# without it, as the issue's PyTorch reference step has none.
CIFAR_TRAIN="--config configs/cifar10.py --config.batch_size=256 $BF16 --what train"
SAMPLE_1="--config configs/imagenet256.py:XL/2 $DIT --what sample --steps 1 --cfg_scale 1.5 --batch_size 256"
SAMPLE_8="--config configs/imagenet256.py:XL/2 $DIT --what sample --steps 8 --cfg_scale 1.5 --batch_size 256"
RUNS=(
  "xl2_train_cublas|$CUBLAS|$XL2_TRAIN"
  "b2_train_cublas|$CUBLAS|$B2_TRAIN"
  "ddpmpp_train||$CIFAR_TRAIN"
  "xl2_sample_1step_cfg_cublas|$CUBLAS|$SAMPLE_1"
  "xl2_sample_8step_cfg_cublas|$CUBLAS|$SAMPLE_8"
  "xl2_train||$XL2_TRAIN"
  "b2_train||$B2_TRAIN"
  "xl2_sample_1step_cfg||$SAMPLE_1"
  "xl2_sample_8step_cfg||$SAMPLE_8"
  "ddpmpp_train_noaug||$CIFAR_TRAIN --config.augment.p=0 --config.augment.xflip=False"
)

if [[ "$DRY_RUN" == 1 ]]; then
  for run in "${RUNS[@]}"; do
    IFS='|' read -r name xla_flags args <<< "$run"
    if [[ -n "$ONLY" && ",$ONLY," != *",$name,"* ]]; then continue; fi
    prof=""
    [[ "$PROFILE" == 1 ]] && prof="--profile_dir $OUT_DIR/profile_$name"
    echo "+ ${xla_flags:+XLA_FLAGS=$xla_flags }$PYTHON -m imm_jax.benchmark $args --peak_tflops $PEAK_TFLOPS $prof $EXTRA"
  done
  exit 0
fi
mkdir -p "$OUT_DIR"
# One process per GPU: let JAX take 92% of its memory rather than 75% (cuDNN and autotuning workspaces
# come out of the same pool as the XL/2 step's 47 GiB), unless a fraction is set under either of JAX's
# names for it (setting both makes JAX's CUDA plugin fail to start).
[[ -n "${XLA_CLIENT_MEM_FRACTION:-}${XLA_PYTHON_CLIENT_MEM_FRACTION:-}" ]] || export XLA_CLIENT_MEM_FRACTION=0.92

{
  echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PYTHON -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tail -1
} | tee "$OUT_DIR/summary.txt"

for run in "${RUNS[@]}"; do
  IFS='|' read -r name xla_flags args <<< "$run"
  if [[ -n "$ONLY" && ",$ONLY," != *",$name,"* ]]; then continue; fi
  prof=""
  [[ "$PROFILE" == 1 ]] && prof="--profile_dir $OUT_DIR/profile_$name"
  echo "== $name: ${xla_flags:+XLA_FLAGS=$xla_flags }python -m imm_jax.benchmark $args --peak_tflops $PEAK_TFLOPS $prof $EXTRA" \
    | tee -a "$OUT_DIR/summary.txt"
  start=$(date +%s)
  # shellcheck disable=SC2086  # the arguments are meant to split
  XLA_FLAGS="${xla_flags:-${XLA_FLAGS:-}}" PYTHONUNBUFFERED=1 timeout "$PER_RUN_TIMEOUT" \
    $PYTHON -m imm_jax.benchmark $args --peak_tflops "$PEAK_TFLOPS" $prof $EXTRA > "$OUT_DIR/$name.txt" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  if [[ $rc -eq 0 ]]; then
    rate=$(grep -m1 -oE '"(examples|images)_per_second": [0-9.e+]*' "$OUT_DIR/$name.txt" | awk '{printf "%.1f", $2}')
    # MFU from the analytic FLOP count (DiT), else from XLA's count of the compiled step (DDPM++)
    mfu=$(grep -m1 -o 'utilisation (analytic): [0-9.]*%' "$OUT_DIR/$name.txt" | awk '{print $3}')
    [[ -z "$mfu" ]] && mfu=$(grep -m1 -o 'utilisation (XLA count): [0-9.]*%' "$OUT_DIR/$name.txt" \
      | awk '{print $4 " (XLA count)"}')
    peak=$(grep -m1 -o '"peak_memory_bytes": [0-9]*' "$OUT_DIR/$name.txt" | awk '{printf "%.1f GiB", $2 / 2^30}')
    echo "   $rate per second, MFU ${mfu:-n/a}, peak ${peak:-n/a} (${secs} s wall)" | tee -a "$OUT_DIR/summary.txt"
    # (lines a run may not print: a missing one is not a failure of the script)
    grep -m1 '^roofline of the compiled step' "$OUT_DIR/$name.txt" | sed 's/^/   /' | tee -a "$OUT_DIR/summary.txt" || true
    grep -m1 '^profile:' "$OUT_DIR/$name.txt" | sed 's/^/   /' | tee -a "$OUT_DIR/summary.txt" || true
  elif [[ $rc -eq 124 ]]; then
    echo "   timed out after ${PER_RUN_TIMEOUT} s" | tee -a "$OUT_DIR/summary.txt"
  else
    echo "   failed (exit $rc): $(grep -v '^\s*$' "$OUT_DIR/$name.txt" | tail -1)" | tee -a "$OUT_DIR/summary.txt"
  fi
done
