"""Multi-host start: `jax.distributed.initialize` when this process is one of several.

`start_plan` decides from the environment alone (a pure function, tested without starting
anything); `initialize` carries the plan out. The first rule that applies wins:

  1. COORDINATOR_ADDRESS (host:port of process 0), NUM_PROCESSES and PROCESS_ID (or
     SLURM_PROCID), optionally LOCAL_DEVICE_IDS: GPU hosts and local CPU processes, set by
     launch/scripts/gpu.sh (ssh hosts, SLURM) and local.sh. They are passed to
     `jax.distributed.initialize` as they are; with JAX_PLATFORMS=cpu the cross-process
     collectives go through gloo.
  2. A Cloud TPU VM that JAX's own cluster detection (`jax._src.clusters`: GKE from
     TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES and TPU_WORKER_ID, GCE from the VM's
     metadata server; times MEGASCALE_NUM_SLICES for multislice) places among several
     processes: `jax.distributed.initialize(cluster_detection_method=<that cluster>)`, and
     JAX finds the coordinator, the process count and this process's id itself, as in
     maxtext. Cloud TPU VMs need not set TPU_WORKER_HOSTNAMES: on GCE the workers come from
     the metadata.
  3. Otherwise one process, and nothing is called: a single-host TPU VM (v5e-8), one GPU
     host, a CPU box.

A `srun` job step with several tasks but no COORDINATOR_ADDRESS is an error: its tasks
would train as independent jobs over the same workdir (start it with `gpu.sh slurm`).

Detection costs nothing off TPU: at `import jax`, JAX marks the host as a Cloud TPU VM only
if it finds TPU chips on the PCI bus and libtpu (`jax._src.cloud_tpu_init`), and JAX's TPU
clusters answer "not present" without asking any server elsewhere. Call `initialize`
before any other jax call that touches devices.

Preemption: once initialized, JAX's preemption service (on by default,
`jax_enable_preemption_service`) catches SIGTERM in every process and agrees on a step at
which all of them save (`launch/checkpoint.py`, `Checkpointer.preemption_requested`).
"""

import dataclasses
import logging
import os
from typing import Any, Mapping

import jax
from jax._src.clusters import cloud_tpu_cluster

_started = False


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """Where JAX's cluster detection places this Cloud TPU VM."""
  method: str          # JAX's cluster_detection_method: "gketpu" or "gcetpu"
  num_processes: int   # hosts per slice x slices
  process_id: int


@dataclasses.dataclass(frozen=True)
class StartPlan:
  """What `initialize` does: call `jax.distributed.initialize(**kwargs)` or nothing."""
  initialize: bool
  kwargs: dict[str, Any]
  num_processes: int   # the processes expected to take part (1: this one alone)
  process_id: int
  reason: str
  cpu_collectives: str | None = None  # jax_cpu_collectives_implementation to set first


def _int(env: Mapping[str, str], name: str) -> int:
  try:
    return int(env[name])
  except ValueError:
    raise ValueError(f"{name}={env[name]!r} is not an integer; set it to a number, e.g. "
                     f"{name}=0.") from None


def _coordinator_plan(env: Mapping[str, str]) -> StartPlan:
  """Rule 1: the coordinator variables, checked."""
  address = env["COORDINATOR_ADDRESS"]
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"COORDINATOR_ADDRESS={address!r} is not host:port; set it to process "
                     "0's address and a free port, e.g. COORDINATOR_ADDRESS=10.0.0.1:12355.")
  if "NUM_PROCESSES" not in env:
    raise ValueError("COORDINATOR_ADDRESS is set but NUM_PROCESSES is not: export "
                     "NUM_PROCESSES=<number of processes> on every host (or unset "
                     "COORDINATOR_ADDRESS for a single process).")
  num = _int(env, "NUM_PROCESSES")
  id_name = next((n for n in ("PROCESS_ID", "SLURM_PROCID") if n in env), None)
  if id_name is None and num > 1:
    raise ValueError(f"COORDINATOR_ADDRESS and NUM_PROCESSES={num} are set but PROCESS_ID is "
                     "not: export PROCESS_ID=0, 1, ... (a different one on every host).")
  process_id = _int(env, id_name) if id_name else 0
  if num < 1 or not 0 <= process_id < num:
    raise ValueError(f"{id_name or 'PROCESS_ID'}={process_id} with NUM_PROCESSES={num}: need "
                     "NUM_PROCESSES >= 1 and 0 <= PROCESS_ID < NUM_PROCESSES.")
  local = env.get("LOCAL_DEVICE_IDS")
  try:
    local_ids = [int(i) for i in local.split(",")] if local else None
  except ValueError:
    raise ValueError(f"LOCAL_DEVICE_IDS={local!r}: give comma-separated device numbers, "
                     "e.g. LOCAL_DEVICE_IDS=0,1.") from None
  return StartPlan(
      initialize=True,
      kwargs=dict(coordinator_address=address, num_processes=num, process_id=process_id,
                  local_device_ids=local_ids),
      num_processes=num, process_id=process_id,
      reason=f"process {process_id} of {num} from COORDINATOR_ADDRESS={address}",
      cpu_collectives="gloo" if env.get("JAX_PLATFORMS", "") == "cpu" else None)


def _tpu_allowed(env: Mapping[str, str]) -> bool:
  """JAX_PLATFORMS unset, or naming tpu (JAX_PLATFORMS=cpu on a TPU VM runs on its CPU)."""
  platforms = env.get("JAX_PLATFORMS", "")
  return not platforms or "tpu" in platforms.split(",")


def start_plan(env: Mapping[str, str], tpu: TpuSlice | None = None) -> StartPlan:
  """What to call, from the environment variables and the TPU slice JAX detected.

  Args:
    env: the environment (os.environ, or a dict in tests).
    tpu: `tpu_slice()`'s answer: None off Cloud TPU VMs.

  Raises:
    ValueError: naming the variable and the fix, for malformed coordinator variables or a
      multi-task SLURM step without them.
  """
  if "COORDINATOR_ADDRESS" in env:
    return _coordinator_plan(env)
  tasks = env.get("SLURM_STEP_NUM_TASKS", "1")
  if tasks.isdigit() and int(tasks) > 1:
    raise ValueError(
        f"This is one of {tasks} tasks of a SLURM job step, but COORDINATOR_ADDRESS is not "
        "set, so each task would train alone over the same workdir. Start the job with "
        "launch/scripts/gpu.sh slurm CONFIG WORKDIR (it sets COORDINATOR_ADDRESS, "
        "NUM_PROCESSES and PROCESS_ID), or export them yourself before srun.")
  if tpu is not None and _tpu_allowed(env) and tpu.num_processes > 1:
    return StartPlan(
        initialize=True, kwargs=dict(cluster_detection_method=tpu.method),
        num_processes=tpu.num_processes, process_id=tpu.process_id,
        reason=(f"Cloud TPU worker {tpu.process_id} of {tpu.num_processes} ({tpu.method}): "
                "JAX finds the coordinator"))
  where = ("a single-host Cloud TPU slice" if tpu is not None and _tpu_allowed(env) else
           "no coordinator variables and no multi-host Cloud TPU slice")
  return StartPlan(initialize=False, kwargs={}, num_processes=1, process_id=0,
                   reason=f"single process ({where})")


def tpu_slice() -> TpuSlice | None:
  """This VM's place in a Cloud TPU slice, by JAX's own cluster detection, or None.

  JAX's order: GKE (TPU_WORKER_HOSTNAMES or TPU_PROCESS_ADDRESSES in the environment),
  then GCE (the metadata server's agent-worker-number, worker-network-endpoints and
  tpu-env). Both answer False at once on a host that is not a Cloud TPU VM, so nothing
  is asked over the network there.
  """
  for cluster in (cloud_tpu_cluster.GkeTpuCluster, cloud_tpu_cluster.GceTpuCluster):
    try:
      if not cluster.is_env_present():
        continue
      return TpuSlice(cluster.name, cluster.get_process_count(), cluster.get_process_id())
    except Exception as e:  # pylint: disable=broad-except
      raise RuntimeError(
          f"This host has TPU chips, but JAX's Cloud TPU detection ({cluster.name}) failed: "
          f"{type(e).__name__}: {e}. On a Cloud TPU VM the metadata server must answer (check "
          "the VM's network). To run this host alone, export TPU_SKIP_MDS_QUERY=1; to give "
          "the slice by hand, export TPU_WORKER_HOSTNAMES=<worker 0>,<worker 1>,... and "
          "TPU_WORKER_ID=<this worker>.") from e
  return None


def initialize():
  """Starts the multi-host runtime if this process is one of several (see the module doc)."""
  global _started
  if _started or jax.distributed.is_initialized():
    _started = True
    return
  plan = start_plan(os.environ, tpu_slice())
  logging.info("Multi-host start: %s.", plan.reason)
  if plan.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", plan.cpu_collectives)
  if plan.initialize:
    jax.distributed.initialize(**plan.kwargs)
  _started = True


def is_main_process() -> bool:
  return jax.process_index() == 0


def _main():
  """`python -m launch.distributed`: this process's plan and the devices JAX sees, without
  starting the multi-host runtime (`tpu.sh install` prints it on every worker)."""
  plan = start_plan(os.environ, tpu_slice())
  print(f"{plan.reason}; {jax.local_device_count()} local devices, {jax.device_count()} in all")


if __name__ == "__main__":
  _main()
