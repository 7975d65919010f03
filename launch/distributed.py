"""Multi-host start: `jax.distributed.initialize` when this process is one of several.

- Cloud TPU pods: jax finds the coordinator itself; TPU_WORKER_HOSTNAMES with more than one
  host means a pod slice.
- GPU nodes / local CPU processes: COORDINATOR_ADDRESS (host:port), NUM_PROCESSES and
  PROCESS_ID (set by launch/scripts/gpu.sh, local.sh or from SLURM_PROCID).
Single-process runs do nothing. Call before any other jax call.
"""

import os

import jax

_started = False


def initialize():
  global _started
  if _started:
    return
  env = os.environ
  if "COORDINATOR_ADDRESS" in env:
    if env.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    local = env.get("LOCAL_DEVICE_IDS")
    jax.distributed.initialize(
        coordinator_address=env["COORDINATOR_ADDRESS"],
        num_processes=int(env["NUM_PROCESSES"]),
        process_id=int(env.get("PROCESS_ID", env.get("SLURM_PROCID", "0"))),
        local_device_ids=[int(i) for i in local.split(",")] if local else None)
  elif len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    jax.distributed.initialize()
  _started = True


def is_main_process() -> bool:
  return jax.process_index() == 0
