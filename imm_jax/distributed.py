"""Multi-host start-up: ``jax.distributed`` when the job has more than one process.

On TPU pods (IMM_DISTRIBUTED=auto, set by launch/tpu_pod.sh) and under SLURM, ``jax.distributed.initialize()``
finds the coordinator by itself. Elsewhere
set IMM_COORDINATOR=host:port, IMM_NUM_PROCESSES and IMM_PROCESS_ID (launch/ scripts do this).
"""

from __future__ import annotations

import os

import jax


def initialize():
  if os.environ.get("IMM_COORDINATOR"):
    jax.distributed.initialize(coordinator_address=os.environ["IMM_COORDINATOR"],
                               num_processes=int(os.environ["IMM_NUM_PROCESSES"]),
                               process_id=int(os.environ["IMM_PROCESS_ID"]))
  elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
  elif (os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS")
        or os.environ.get("IMM_DISTRIBUTED") == "auto"):  # e.g. Cloud TPU VMs (launch/tpu_pod.sh)
    jax.distributed.initialize()
