"""Training at scale on CPU: meshes, gradient accumulation, several processes and preemption change nothing.

Each case runs the real trainer in subprocesses, so that the device count (``XLA_FLAGS=
--xla_force_host_platform_device_count``) and ``jax.distributed`` are set up before JAX initialises:

* the same seed and data give the same losses and parameters on 1 device and on 8 devices with meshes
  data x fsdp = 8x1 with gradient accumulation and 2x4 (FSDP really shards: ``mesh.fsdp_min_size=1``),
  with gradient accumulation on one device, and with the blocks rematerialised (``model.remat``), all
  with the data augmentation (``config.augment``) on;
* two processes on localhost (``python -m imm_jax.train`` with IMM_COORDINATOR / IMM_NUM_PROCESSES /
  IMM_PROCESS_ID, FSDP across them) train exactly what one process does with the same global batch;
* a run stopped by SIGTERM saves, exits 0 and resumes to the parameters and losses of an uninterrupted run.

Compiling for 8 CPU devices dominates (~10 s a program); conftest.py's persistent compilation cache,
which the subprocesses inherit, makes repeated runs cheaper.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from imm_jax import checkpoints
from imm_jax.builder import build_model
from imm_jax.trainer import init_state, make_optimizer
from imm_jax.writers import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny digits run, as dotted config overrides (used both by the in-process driver and as --config.* flags).
# Batch 64: with 2 micro-batches on 8 devices every device still holds one whole group of 4.
TINY = {
    "num_steps": 3, "batch_size": 64, "log_every": 1, "sample_every": 1000, "checkpoint.every": 1000,
    "checkpoint.async_save": False, "data.image_size": 8, "model.patch_size": 4, "model.hidden_size": 32,
    "model.depth": 1, "model.num_heads": 2, "optim.warmup_steps": 2, "sample.steps": (), "eval.num": 0,
    "mesh.fsdp_min_size": 1,
    # The augmentation (a batched gather on the sharded batch) and its labels through the network too.
    "augment.p": 0.5, "augment.xflip": True, "model.augment_dim": 9,
}

# Runs train_and_evaluate for each (workdir, overrides) of argv[1] in this one process.
DRIVER = r"""
import json, sys
from imm_jax.configs_loader import load_config
from imm_jax.trainer import train_and_evaluate

for workdir, overrides in json.loads(sys.argv[1]):
  config = load_config("digits")
  for key, value in overrides.items():
    *path, leaf = key.split(".")
    node = config
    for name in path:
      node = node[name]
    node[leaf] = tuple(value) if isinstance(value, list) else value
  train_and_evaluate(config, workdir)
"""

RTOL, ATOL = 1e-5, 1e-6


def _env(num_devices: int, **extra) -> dict[str, str]:
  """A subprocess environment with ``num_devices`` CPU devices; the persistent compilation cache set up
  by conftest.py is inherited, so identical programs (resumed runs, repeated test runs) compile once."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("IMM_") and k not in ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_NUM_CPU_DEVICES")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
             PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), **extra)
  return env


def _flag(key: str, value) -> str:
  if isinstance(value, tuple):
    value = "(" + "".join(f"{v}," for v in value) + ")"
  return f"--config.{key}={value}"


def _train_command(workdir: str, overrides: dict) -> list[str]:
  return [sys.executable, "-m", "imm_jax.train", "--config", os.path.join(REPO, "configs", "digits.py"),
          f"--workdir={workdir}", *(_flag(k, v) for k, v in overrides.items())]


def _start(cmd, env, log_path):
  log = open(log_path, "w")
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log


def _wait_all(procs, timeout: float):
  """Waits for (Popen, log) pairs; on a timeout or a failure kills the rest and fails with their logs."""
  deadline = time.monotonic() + timeout
  failed = None
  for proc, log in procs:
    try:
      rc = proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
      if rc != 0 and failed is None:
        failed = f"exit code {rc}"
    except subprocess.TimeoutExpired:
      failed = failed or f"timed out after {timeout:.0f} s"
  for proc, log in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    log.close()
  if failed:
    tails = []
    for proc, log in procs:
      with open(log.name) as f:
        tails.append(f"--- {log.name} ---\n" + f.read()[-3000:])
    pytest.fail(f"{failed}:\n" + "\n".join(tails))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _restore(workdir: str):
  """The full train state of the newest checkpoint (any mesh it was saved from) on one local device."""
  config = checkpoints.read_config(workdir)
  model = build_model(config)
  tx = make_optimizer(config.optim, int(config.num_steps))
  abstract = jax.eval_shape(functools.partial(init_state, model, tx, int(config.seed)))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
  manager = checkpoints.create_manager(workdir, read_only=True, async_save=False)
  try:
    state = checkpoints.restore(manager, abstract)
  finally:
    manager.close()
  return jax.device_get(state)


def _losses(workdir: str) -> dict[int, float]:
  rows = [r for r in read_metrics(workdir) if "train/loss" in r]
  steps = [r["step"] for r in rows]
  assert len(steps) == len(set(steps)), f"a step is logged twice in {workdir}: {steps}"
  return {r["step"]: r["train/loss"] for r in rows}


def _assert_same_training(a: str, b: str, exact: bool = False):
  """Same losses at every step and the same parameters, EMA and optimizer state at the end."""
  la, lb = _losses(a), _losses(b)
  assert sorted(la) == sorted(lb), (sorted(la), sorted(lb))
  sa, sb = _restore(a), _restore(b)
  assert int(sa.step) == int(sb.step)
  if exact:
    assert la == lb
  else:
    np.testing.assert_allclose([la[k] for k in sorted(la)], [lb[k] for k in sorted(lb)], rtol=RTOL)
  leaves_a, tree_a = jax.tree.flatten((sa.params, sa.ema_params, sa.opt_state))
  leaves_b, tree_b = jax.tree.flatten((sb.params, sb.ema_params, sb.opt_state))
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    if exact:
      np.testing.assert_array_equal(x, y)
    else:
      np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The tiny run on one device in one process, what every other layout must reproduce: started in the
  background; calling the fixture's value waits for it and returns its workdir."""
  workdir = str(tmp_path_factory.mktemp("one_device") / "run")
  proc = _start(_train_command(workdir, TINY), _env(1), workdir + ".log")
  done = []

  def wait() -> str:
    if not done:
      _wait_all([proc], timeout=300)
      done.append(True)
    return workdir

  yield wait
  if not done and proc[0].poll() is None:
    proc[0].kill()
    proc[0].wait()


@pytest.mark.slow
def test_meshes_and_gradient_accumulation_match_one_device(reference, tmp_path):
  runs = {  # on 8 devices (one process each, to use both cores), and on one device
      "8x1_accum2": ({"mesh.data": 8, "mesh.fsdp": 1, "grad_accum_steps": 2}, 8, 0),
      "2x4": ({"mesh.data": 2, "mesh.fsdp": 4}, 8, 1),
      "1x1_accum4": ({"grad_accum_steps": 4}, 1, 2),
      "1x1_remat": ({"model.remat": "block"}, 1, 2),  # recomputes the blocks: the same numbers
  }
  groups: dict[int, tuple[int, list]] = {}
  for name, (extra, devices, group) in runs.items():
    groups.setdefault(group, (devices, []))[1].append([str(tmp_path / name), dict(TINY, **extra)])
  procs = [_start([sys.executable, "-c", DRIVER, json.dumps(jobs)], _env(devices), tmp_path / f"driver{g}.log")
           for g, (devices, jobs) in groups.items()]
  _wait_all(procs, timeout=400)
  for name in runs:
    _assert_same_training(reference(), str(tmp_path / name))
  assert json.load(open(os.path.join(tmp_path, "2x4", "config.json")))["mesh"] == {
      "data": 2, "fsdp": 4, "fsdp_min_size": 1}


@pytest.mark.slow
def test_two_processes_match_one_process(reference, tmp_path):
  port = _free_port()
  pair = str(tmp_path / "two_procs")
  # One device per process and FSDP across the two (parameters and optimizer state half in each), and a
  # final sample grid from those sharded EMA parameters. (4 devices per process with mesh 4 x 2 passes
  # too; it costs a 3x longer compile.)
  sharded = dict(TINY, **{"mesh.data": 1, "mesh.fsdp": 2, "sample.steps": (1,), "sample.num": 4})
  procs = [
      _start(_train_command(pair, sharded),
             _env(1, IMM_COORDINATOR=f"127.0.0.1:{port}", IMM_NUM_PROCESSES="2",
                  IMM_PROCESS_ID=str(i)), tmp_path / f"proc{i}.log")
      for i in range(2)
  ]
  _wait_all(procs, timeout=240)
  _assert_same_training(reference(), pair)
  assert sorted(_losses(pair)) == [1, 2, 3]
  # Only process 0 writes metrics, events and samples; each process saved its own data-iterator state.
  assert len(glob.glob(os.path.join(pair, "events.out.tfevents.*"))) == 1
  assert sorted(os.listdir(os.path.join(pair, "samples"))) == ["augmented.png", "step0000003_1step.png"]
  iterator_files = sorted(os.listdir(os.path.join(checkpoints.checkpoint_dir(pair), "3", "data_iter")))
  assert [f for f in iterator_files if f.startswith("process_")] == ["process_0-of-2.json",
                                                                     "process_1-of-2.json"]


@pytest.mark.slow
def test_sigterm_saves_exits_and_resumes_exactly(tmp_path):
  steps = 80  # ~1 s of steps: the signal, sent once step 3 is logged, arrives well before the end
  overrides = dict(TINY, num_steps=steps, **{"mesh.data": 1, "mesh.fsdp": 2})
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  env = _env(2)
  proc, log = _start(_train_command(resumed, overrides), env, tmp_path / "interrupted.log")
  deadline = time.monotonic() + 240
  while not any(r.get("step", 0) >= 3 for r in read_metrics(resumed)):
    if proc.poll() is not None or time.monotonic() > deadline:
      _wait_all([(proc, log)], timeout=1)
      pytest.fail(f"the run ended (or stalled) before logging step 3: {open(log.name).read()[-3000:]}")
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  # The uninterrupted run starts now, to find the step in the compilation cache.
  straight_run = [_start(_train_command(straight, overrides), env, tmp_path / "straight.log")]
  _wait_all([(proc, log)], timeout=120)
  manager = checkpoints.create_manager(resumed, read_only=True, async_save=False)
  stopped = manager.latest_step()
  manager.close()
  assert 3 <= stopped < steps, f"SIGTERM did not stop the run early (saved step {stopped})"
  assert max(_losses(resumed)) == stopped
  resume = _start(_train_command(resumed, overrides), env, tmp_path / "resume.log")
  _wait_all(straight_run + [resume], timeout=300)
  assert sorted(_losses(resumed)) == list(range(1, steps + 1))
  _assert_same_training(straight, resumed, exact=True)
