"""launch/: the TPU pod and SLURM scripts parse, and their dry runs print the commands they would run;
the GPU benchmark suite runs each benchmark and summarises its output."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(REPO, "launch", "tpu_pod.sh")
SLURM = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
GPU_BENCH = os.path.join(REPO, "launch", "gpu_benchmarks.sh")
FETCH = os.path.join(REPO, "launch", "fetch_wheels.sh")

# Nothing may reach gcloud, srun, scontrol or sbatch: the dry runs get a PATH where they do not exist.
_ENV = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}


def _run(script, *args, **env):
  return subprocess.run(["bash", script, *args], capture_output=True, text=True, env={**_ENV, **env},
                        cwd=REPO, timeout=60)


def _commands(stdout: str) -> list[list[str]]:
  """The printed commands ('+ ...' lines), split the way a shell would read them."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("script", [TPU, SLURM, GPU_BENCH, FETCH])
def test_scripts_parse(script):
  r = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  assert os.access(script, os.X_OK)


def test_tpu_pod_check_compiles_for_the_slice_here():
  """`check` hands the accelerator type to imm_jax.aot --target, which knows the slices
  (tests/test_tpu_target.py)."""
  r = _run(TPU, "check", "--config.batch_size=4096", DRY_RUN="1", ACCELERATOR_TYPE="v5p-128",
           CONFIG="configs/imagenet256.py:XL/2", PYTHON="python3")
  assert r.returncode == 0, r.stderr
  (cmd,) = _commands(r.stdout)
  assert cmd == ["python3", "-m", "imm_jax.aot", "--config=configs/imagenet256.py:XL/2", "--target=v5p-128",
                 "--config.batch_size=4096"]


def test_tpu_pod_dry_run_prints_gcloud_commands():
  env = dict(DRY_RUN="1", TPU_NAME="imm-test", ZONE="us-east5-a", ACCELERATOR_TYPE="v5p-64",
             RUNTIME_VERSION="v2-alpha-tpuv5", PROJECT="my-proj")
  r = _run(TPU, "create", **env, SPOT="1")
  assert r.returncode == 0, r.stderr
  (create,) = _commands(r.stdout)
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "imm-test"]
  assert {"--zone=us-east5-a", "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--project=my-proj",
          "--spot"} <= set(create)

  r = _run(TPU, "setup", **env, EXTRAS="test", JAX_SPEC="jax==0.10.2")
  assert r.returncode == 0, r.stderr
  tar, scp, ssh = _commands(r.stdout)
  assert "git ls-files" in " ".join(tar)  # this checkout, as it is, without ignored files
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  assert "imm-test:imm_jax.tar.gz" in scp
  assert ssh[4:6] == ["ssh", "imm-test"] and "--worker=all" in ssh
  remote = next(a for a in ssh if a.startswith("--command="))
  assert 'pip install -q -e "$HOME/imm_jax[tpu,test]" \'jax==0.10.2\'' in remote  # libtpu: the tpu extra

  r = _run(TPU, "--dry-run", "train", "--config.batch_size=4096", TPU_NAME="imm-test",
           ACCELERATOR_TYPE="v5p-64", CONFIG="configs/imagenet256.py:XL/2", WORKDIR="gs://my-bucket/imm/xl2")
  assert r.returncode == 0, r.stderr
  (ssh,) = _commands(r.stdout)
  assert ssh[4:6] == ["ssh", "imm-test"] and "--worker=all" in ssh
  remote = next(a for a in ssh if a.startswith("--command="))
  assert "gcsfuse --implicit-dirs" in remote and "my-bucket /gcs/my-bucket" in remote
  assert ("python -m imm_jax.train --workdir=/gcs/my-bucket/imm/xl2 --config=configs/imagenet256.py:XL/2 "
          "--config.batch_size=4096 < /dev/null > $HOME/imm_train.log") in remote
  assert "nohup" in remote and "echo $! > $HOME/imm_train.pid" in remote

  # evaluate: the same on every worker (no CONFIG: the workdir has its config), its own log and pid.
  r = _run(TPU, "--dry-run", "evaluate", "--steps", "1", "2", "--ref", "/gcs/my-bucket/ref.npz",
           TPU_NAME="imm-test", WORKDIR="gs://my-bucket/imm/xl2")
  assert r.returncode == 0, r.stderr
  (ssh,) = _commands(r.stdout)
  remote = next(a for a in ssh if a.startswith("--command="))
  assert "--worker=all" in ssh and "my-bucket /gcs/my-bucket" in remote
  assert ("IMM_DISTRIBUTED=auto nohup $HOME/imm-venv/bin/python -m imm_jax.evaluate --workdir=/gcs/my-bucket/imm/xl2 "
          "--steps 1 2 --ref /gcs/my-bucket/ref.npz < /dev/null > $HOME/imm_evaluate.log") in remote
  assert "echo $! > $HOME/imm_evaluate.pid" in remote
  logs = _commands(_run(TPU, "logs", "evaluate", **env).stdout)[0]
  assert "--worker=0" in logs and "--command=tail -n 100 -f $HOME/imm_evaluate.log" in logs
  stop = _commands(_run(TPU, "stop", "evaluate", **env).stdout)[0]
  assert "kill -TERM $(cat $HOME/imm_evaluate.pid)" in " ".join(stop)

  r = _run(TPU, "delete", **env)
  assert _commands(r.stdout) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "imm-test", "--quiet",
                                  "--zone=us-east5-a", "--project=my-proj"]]
  stop = _commands(_run(TPU, "stop", **env).stdout)[0]
  assert "--worker=all" in stop and "kill -TERM $(cat $HOME/imm_train.pid)" in " ".join(stop)


def test_tpu_pod_refuses_unknown_commands_and_missing_settings():
  r = _run(TPU, "--dry-run", "launch")
  assert r.returncode == 2 and "create | setup | train | evaluate | logs | stop | delete" in r.stderr
  r = _run(TPU, "--dry-run", "logs", "eval")
  assert r.returncode == 2 and "unknown job 'eval': use train | evaluate" in r.stderr and not _commands(r.stdout)
  r = _run(TPU, "--dry-run", "evaluate", "--steps", "1")
  assert r.returncode != 0 and "set WORKDIR" in r.stderr
  r = _run(TPU, "--dry-run", "train", WORKDIR="gs://b/x")
  assert r.returncode != 0 and "set CONFIG" in r.stderr
  r = _run(TPU, "--help")
  assert r.returncode == 0 and "DRY_RUN=1" in r.stdout


def test_slurm_dry_run_prints_one_srun_task_per_node():
  r = _run(SLURM, "--config.batch_size=4096", "--config.optim.lr=2e-4", DRY_RUN="1", SLURM_NNODES="4",
           SLURM_JOB_NODELIST="gpu-[07-10]", CONFIG="configs/imagenet256.py:XL/2", WORKDIR="/shared/runs/xl2",
           PYTHON="/opt/venv/bin/python")
  assert r.returncode == 0, r.stderr
  export, srun = _commands(r.stdout)
  assert export == ["export", "IMM_COORDINATOR=gpu-07:12355", "IMM_NUM_PROCESSES=4", "XLA_CLIENT_MEM_FRACTION=0.92"]
  assert srun[:4] == ["srun", "--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
  assert srun[4:6] == ["bash", "-c"]
  task = srun[6]
  assert task.startswith("export IMM_PROCESS_ID=$SLURM_PROCID; exec ")
  assert shlex.split(task.split("exec ", 1)[1]) == [
      "/opt/venv/bin/python", "-m", "imm_jax.train", "--config=configs/imagenet256.py:XL/2",
      "--workdir=/shared/runs/xl2", "--config.batch_size=4096", "--config.optim.lr=2e-4"]
  assert "python -m imm_jax.train" in r.stdout
  # The batch header asks SLURM for SIGTERM before the time limit (the trainer then saves and exits).
  header = open(SLURM).read()
  assert "#SBATCH --ntasks-per-node=1" in header and "#SBATCH --signal=TERM@" in header


@pytest.mark.parametrize("name", ["XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"])
def test_slurm_keeps_a_memory_fraction_set_under_either_name(name):
  """JAX reads the fraction under a new and a deprecated name and refuses both at once (its CUDA plugin
  does not start): a user's setting under either name stays the only one."""
  r = _run(SLURM, DRY_RUN="1", CONFIG="configs/cifar10.py", WORKDIR="/x", **{name: "0.8"})
  assert r.returncode == 0, r.stderr
  export, _ = _commands(r.stdout)
  assert [a.split("=")[0] for a in export[1:]] == ["IMM_COORDINATOR", "IMM_NUM_PROCESSES"], export


def test_slurm_needs_config_and_workdir():
  r = _run(SLURM, "--dry-run", WORKDIR="/x")
  assert r.returncode != 0 and "set CONFIG" in r.stderr


# Parses each command's arguments with imm_jax.benchmark's own flags (nothing runs) and prints what the
# benchmark would build: a typo in the suite must not cost a GPU session.
_PARSE = r"""
import json, sys
from absl import flags
from imm_jax import aot, benchmark, parallel
from imm_jax.configs_loader import check_config_argv
benchmark.define_flags()
FLAGS = flags.FLAGS
check_config_argv(sys.argv)
FLAGS(sys.argv)
c = FLAGS.config
parallel.check_batch_layout(int(c.batch_size), int(c.imm.group_size), parallel.create_mesh(1, 1), 1)
size = [c.model.get(k) for k in ("patch_size", "hidden_size", "depth")]
print(json.dumps([FLAGS.what, c.model.name, size, str(c.model.dtype),
                  c.model.get("attention_impl"), c.model.remat, int(c.batch_size), FLAGS.steps, FLAGS.cfg_scale,
                  FLAGS.batch_size, list(aot.config_data_info(c).shape), FLAGS.profile_dir is not None]))
"""


def test_gpu_benchmark_commands_parse_as_issue_8_asks(tmp_path):
  dry = _run(GPU_BENCH, str(tmp_path / "out"), DRY_RUN="1", PYTHON="python3")
  assert dry.returncode == 0 and not (tmp_path / "out").exists(), dry.stderr
  commands = _commands(dry.stdout)
  # The issue's five workloads (the DiT ones with cuBLAS GEMMs: Triton's off), then the four DiT ones
  # again with XLA's default GEMMs, then the CIFAR-10 step without its augmentation.
  envs = [c[:1] if c[0].startswith("XLA_FLAGS=") else [] for c in commands]
  cublas = ["XLA_FLAGS=--xla_gpu_enable_triton_gemm=false"]
  assert envs == [cublas, cublas, [], cublas, cublas] + [[]] * 5
  commands = [c[len(e):] for c, e in zip(commands, envs)]
  assert [c[:-1] for c in commands[5:9]] == [commands[i][:-1] for i in (0, 1, 3, 4)]
  no_aug = ["--config.augment.p=0", "--config.augment.xflip=False"]
  assert [a for a in commands[9][:-1] if a not in no_aug] == commands[2][:-1] and set(no_aug) <= set(commands[9])
  assert [c[-1].rsplit("/", 1)[1] for c in commands] == [  # each run profiles into its own folder
      "profile_xl2_train_cublas", "profile_b2_train_cublas", "profile_ddpmpp_train",
      "profile_xl2_sample_1step_cfg_cublas", "profile_xl2_sample_8step_cfg_cublas", "profile_xl2_train",
      "profile_b2_train", "profile_xl2_sample_1step_cfg", "profile_xl2_sample_8step_cfg",
      "profile_ddpmpp_train_noaug"]
  commands = commands[:5]
  assert all(c[:3] == ["python3", "-m", "imm_jax.benchmark"] for c in commands)
  parsed = []
  for c in commands:
    r = subprocess.run([sys.executable, "-c", _PARSE, *c[3:]], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    parsed.append(json.loads(r.stdout.splitlines()[-1]))
  latent, cifar = [32, 32, 4], [32, 32, 3]
  dit = ["dit", "bfloat16", "cudnn"]
  assert [p[:2] + p[3:5] for p in parsed] == [["train"] + dit] * 2 + [["train", "unet", "bfloat16", None]] + \
      [["sample"] + dit] * 2
  xl2, b2 = [2, 1152, 28], [2, 768, 12]  # DiT-XL/2 and B/2 (patch, width, depth)
  assert [p[2] for p in parsed] == [xl2, b2, [None, None, None], xl2, xl2]
  assert [p[6] for p in parsed[:3]] == [128, 256, 256]                      # issue 8's training batches
  assert [p[5] for p in parsed[:2]] == ["none", "none"]  # no remat: the XL/2 step fits an H100 without it
  assert [p[7:10] for p in parsed[3:]] == [[1, 1.5, 256], [8, 1.5, 256]]   # 1 and 8 steps, guided, batch 256
  assert [p[10] for p in parsed] == [latent, latent, cifar, latent, latent]
  assert all(p[11] for p in parsed)  # each run is profiled


def test_gpu_benchmarks_summarise_each_run_and_go_on_after_failures(tmp_path):
  """A stand-in for python prints what imm_jax.benchmark prints (train: examples/s; sample: images/s)
  and fails for one run (DDPM++ has only XLA's FLOP count): the summary has one line per run with the figures, and the failure's last line."""
  fake = tmp_path / "python"
  fake.write_text(r"""#!/bin/bash
case "$*" in
  *"-c "*) echo "jax 0.0 [FakeDevice]";;
  *"--steps 8"*) echo "Traceback"; echo "RuntimeError: out of memory"; exit 1;;
  *cifar10*) printf '{\n "examples_per_second": 2100.0\n}\nmodel FLOPs utilisation (XLA count): 40.2%%\n';;
  *"--what sample"*) printf '{\n "images_per_second": 1234.5,\n "peak_memory_bytes": 2147483648\n}\n';;
  *) printf '{\n "examples_per_second": 567.26,\n "peak_memory_bytes": 1073741824\n}\n'
     echo "model FLOPs utilisation (analytic): 61.5% of 775 TFLOP/s per device"
     echo "profile: device busy 93% of the step; matmul 70%, attention 12% of the kernel time"
     echo "memory fraction: ${XLA_CLIENT_MEM_FRACTION-unset} ${XLA_PYTHON_CLIENT_MEM_FRACTION-unset}"
     echo "XLA_FLAGS=$XLA_FLAGS";;
esac
""")
  fake.chmod(0o755)
  out = tmp_path / "out"
  r = _run(GPU_BENCH, str(out), PYTHON=str(fake))
  assert r.returncode == 0, r.stderr
  summary = (out / "summary.txt").read_text()
  assert summary.count("== ") == 10
  assert "== xl2_train_cublas: XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python -m imm_jax.benchmark" in summary
  assert (out / "xl2_train_cublas.txt").read_text().splitlines()[-1] == \
      "XLA_FLAGS=--xla_gpu_enable_triton_gemm=false"  # the run's environment
  assert (out / "xl2_train.txt").read_text().splitlines()[-1] == "XLA_FLAGS="
  assert "memory fraction: 0.92 unset" in (out / "xl2_train.txt").read_text()
  assert "567.3 per second, MFU 61.5%, peak 1.0 GiB" in summary
  assert "1234.5 per second, MFU n/a, peak 2.0 GiB" in summary
  assert "2100.0 per second, MFU 40.2% (XLA count), peak n/a" in summary  # DDPM++: no analytic count
  assert "failed (exit 1): RuntimeError: out of memory" in summary
  assert "   profile: device busy 93% of the step; matmul 70%, attention 12%" in summary
  assert f"--profile_dir {out}/profile_xl2_train" in summary  # each run traces into its own folder
  assert (out / "xl2_train.txt").exists() and (out / "xl2_sample_8step_cfg.txt").exists()
  # A fraction under JAX's deprecated name stays the only one (both at once stop JAX's CUDA plugin).
  only = _run(GPU_BENCH, str(tmp_path / "only"), PYTHON=str(fake), ONLY="b2_train", PROFILE="0",
              XLA_PYTHON_CLIENT_MEM_FRACTION="0.8")
  only_summary = (tmp_path / "only" / "summary.txt").read_text()
  assert only_summary.count("== ") == 1 and "--profile_dir" not in only_summary, only.stderr
  assert "memory fraction: unset 0.8" in (tmp_path / "only" / "b2_train.txt").read_text()
