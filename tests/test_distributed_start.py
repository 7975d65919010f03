"""launch/distributed.py: when and how a process starts JAX's multi-host runtime.

Nothing is started here. `start_plan(env, tpu)` is checked for each environment a user
meets: plain CPU, GPU hosts with the coordinator variables, a SLURM job, and Cloud TPU VMs.
The TPU cases run JAX's own cluster detection (`jax._src.clusters`) against a faked Cloud
TPU VM: JAX's "this host has TPU chips" flag set, the environment variables a GKE pod or a
multislice job has, and for GCE VMs a local HTTP server that answers as the metadata server
does (JAX reads it at GCE_METADATA_IP). Each expected answer is derived from the fake
environment itself (worker lists x slices, the worker number), and JAX's own argument
detection (what `jax.distributed.initialize(cluster_detection_method=...)` would use) is
checked to agree with the plan.
"""

import http.server
import os
import threading
import time

import pytest
from jax._src import clusters
from jax._src.clusters import cloud_tpu_cluster, cluster as cluster_lib

from launch import distributed
from launch.distributed import StartPlan, TpuSlice, start_plan

# --- a fake GCE metadata server ---------------------------------------------------------


class FakeMetadata:
  """Serves /computeMetadata/v1/instance/attributes/<key> from a dict; records requests."""

  def __init__(self):
    self.attributes: dict[str, str] = {}
    self.requests: list[str] = []
    fake = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def do_GET(self):  # pylint: disable=invalid-name
        key = self.path.rsplit("/", 1)[-1]
        fake.requests.append(key)
        value = fake.attributes.get(key)
        ok = value is not None and self.headers.get("Metadata-Flavor") == "Google"
        body = (value if ok else "not found").encode()
        self.send_response(200 if ok else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

      def log_message(self, *args):
        pass

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.address = f"127.0.0.1:{self.server.server_address[1]}"
    threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def metadata_server():
  server = FakeMetadata()
  yield server
  server.server.shutdown()


TPU_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID",
            "TPU_SKIP_MDS_QUERY", "MEGASCALE_NUM_SLICES", "MEGASCALE_SLICE_ID",
            "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_PORT", "GCE_METADATA_IP",
            "COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID")


@pytest.fixture
def cloud_tpu_vm(monkeypatch, metadata_server):
  """This host as JAX sees a Cloud TPU VM: the chips flag on, metadata at the fake server.

  Returns a function (env vars, metadata attributes) -> the fake server, to describe the VM.
  """
  for name in TPU_VARS:
    monkeypatch.delenv(name, raising=False)  # `import jax` set TPU_SKIP_MDS_QUERY=1 here
  monkeypatch.delenv("JAX_PLATFORMS")  # conftest's "cpu" would keep a TPU VM on its CPU
  for module in (cloud_tpu_cluster, cluster_lib):
    monkeypatch.setattr(module, "running_in_cloud_tpu_vm", True)
  monkeypatch.setenv("GCE_METADATA_IP", metadata_server.address)
  monkeypatch.setenv("NO_PROXY", "127.0.0.1")

  def describe(env=None, attributes=None):
    for name, value in (env or {}).items():
      monkeypatch.setenv(name, value)
    metadata_server.attributes = dict(attributes or {})
    metadata_server.requests = []
    return metadata_server

  return describe


def gce_attributes(workers: list[str], worker: int, tpu_env: dict | None = None) -> dict:
  """Metadata of one worker of a GCE TPU VM slice (tpu-env is `KEY: 'value'` lines)."""
  lines = [f"{k}: '{v}'" for k, v in (tpu_env or {}).items()]
  return {"agent-worker-number": str(worker), "worker-network-endpoints": ",".join(workers),
          "tpu-env": "\n".join(lines)}


def jax_auto_detected(method: str):
  """(coordinator, num_processes, process_id) as jax.distributed.initialize would find them."""
  coordinator, num, pid, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(
      None, None, None, None, method, 5)
  return coordinator, num, pid


def assert_tpu_pod(plan: StartPlan, method: str, num_processes: int, process_id: int):
  assert plan == StartPlan(True, {"cluster_detection_method": method}, num_processes,
                           process_id, plan.reason)
  assert plan.cpu_collectives is None


# --- Cloud TPU VMs ----------------------------------------------------------------------

# worker-network-endpoints comes in two formats: hostnames, or name:id:ip triples.
V4_16 = ["t1v-n-0:0:10.130.0.2", "t1v-n-1:1:10.130.0.3"]      # 8 chips, 2 hosts of 4
V5P_16 = ["10.128.0.7", "10.128.0.8"]                          # 8 chips, 2 hosts of 4


@pytest.mark.parametrize("workers,worker", [(V4_16, 0), (V4_16, 1), (V5P_16, 1)])
def test_gce_pod_slice_is_found_from_the_metadata_alone(cloud_tpu_vm, workers, worker):
  """A VM of a v4-16 / v5p-16 slice: no TPU_WORKER_HOSTNAMES, the workers are in metadata."""
  server = cloud_tpu_vm(attributes=gce_attributes(workers, worker))
  assert "TPU_WORKER_HOSTNAMES" not in os.environ
  tpu = distributed.tpu_slice()
  assert tpu == TpuSlice("gcetpu", len(workers), worker)
  assert "agent-worker-number" in server.requests
  plan = start_plan(os.environ, tpu)
  assert_tpu_pod(plan, "gcetpu", len(workers), worker)
  first_ip = workers[0].split(":")[-1]
  assert jax_auto_detected("gcetpu") == (f"{first_ip}:8482", len(workers), worker)


def test_gce_single_host_slice_stays_one_process(cloud_tpu_vm):
  """v5e-8 (v5litepod-8): 8 chips on one host, one worker in the metadata."""
  server = cloud_tpu_vm(attributes=gce_attributes(["10.0.0.5"], 0,
                                                  {"ACCELERATOR_TYPE": "v5litepod-8"}))
  tpu = distributed.tpu_slice()
  assert tpu == TpuSlice("gcetpu", 1, 0) and server.requests  # JAX did ask the metadata
  plan = start_plan(os.environ, tpu)
  assert not plan.initialize and plan.kwargs == {} and plan.num_processes == 1
  assert "single-host Cloud TPU slice" in plan.reason


def test_gce_multislice_counts_hosts_times_slices(cloud_tpu_vm):
  """Two v5e-8 slices (one host each) over DCN: MEGASCALE_* in tpu-env make 2 processes."""
  tpu_env = {"MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": "1",
             "MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.5:8080"}
  cloud_tpu_vm(attributes=gce_attributes(["10.0.1.9"], 0, tpu_env))
  tpu = distributed.tpu_slice()
  hosts, slices, slice_id = 1, int(tpu_env["MEGASCALE_NUM_SLICES"]), 1
  assert tpu == TpuSlice("gcetpu", hosts * slices, slice_id * hosts + 0)
  assert_tpu_pod(start_plan(os.environ, tpu), "gcetpu", 2, 1)
  assert jax_auto_detected("gcetpu") == ("10.0.0.5:8482", 2, 1)


def test_gke_pod_from_worker_hostnames(cloud_tpu_vm):
  """GKE sets TPU_WORKER_HOSTNAMES and TPU_WORKER_ID (JAX still reads MEGASCALE_NUM_SLICES
  from the metadata's tpu-env when the variable is unset)."""
  hostnames = "10.8.0.1,10.8.0.2,10.8.0.3,10.8.0.4"   # v5p-32: 16 chips, 4 hosts of 4
  server = cloud_tpu_vm(env={"TPU_WORKER_HOSTNAMES": hostnames, "TPU_WORKER_ID": "2"},
                        attributes={"tpu-env": ""})
  tpu = distributed.tpu_slice()
  assert tpu == TpuSlice("gketpu", len(hostnames.split(",")), 2)
  assert "agent-worker-number" not in server.requests  # the worker id came from the env
  assert_tpu_pod(start_plan(os.environ, tpu), "gketpu", 4, 2)
  assert jax_auto_detected("gketpu") == ("10.8.0.1:8482", 4, 2)


def test_tpu_vm_forced_onto_cpu_is_one_process(cloud_tpu_vm):
  cloud_tpu_vm(attributes=gce_attributes(V4_16, 1))
  tpu = distributed.tpu_slice()
  plan = start_plan({"JAX_PLATFORMS": "cpu"}, tpu)
  assert not plan.initialize and plan.num_processes == 1
  assert start_plan({"JAX_PLATFORMS": "tpu,cpu"}, tpu).initialize


def test_unreachable_metadata_on_a_tpu_vm_is_a_clear_error(cloud_tpu_vm, monkeypatch):
  cloud_tpu_vm()
  monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:1")  # nothing listens on port 1
  with pytest.raises(RuntimeError, match="TPU_SKIP_MDS_QUERY=1"):
    distributed.tpu_slice()


def test_stray_tpu_variables_off_a_tpu_vm_do_not_start_anything(monkeypatch, metadata_server):
  """The old rule (several TPU_WORKER_HOSTNAMES) would have initialized here and waited for
  workers; JAX's detection says this CPU box is no TPU VM, without asking any server."""
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
  monkeypatch.setenv("GCE_METADATA_IP", metadata_server.address)
  metadata_server.requests = []
  start = time.monotonic()
  tpu = distributed.tpu_slice()
  assert time.monotonic() - start < 0.5
  assert tpu is None and metadata_server.requests == []
  assert not start_plan(os.environ | {"JAX_PLATFORMS": ""}, tpu).initialize


# --- this CPU box, GPU hosts, SLURM -----------------------------------------------------


def test_plain_cpu_box_is_one_process_and_detection_is_instant():
  env = {k: v for k, v in os.environ.items() if k not in TPU_VARS}
  start = time.monotonic()
  tpu = distributed.tpu_slice()   # the real detection on this machine (no TPU, no network)
  plan = start_plan(env, tpu)
  assert time.monotonic() - start < 0.5
  assert tpu is None
  assert plan == StartPlan(False, {}, 1, 0, plan.reason) and plan.cpu_collectives is None


@pytest.mark.parametrize("platforms,collectives", [("cpu", "gloo"), ("", None)])
def test_coordinator_variables_are_passed_as_given(platforms, collectives):
  env = {"COORDINATOR_ADDRESS": "node-a:12355", "NUM_PROCESSES": "4", "PROCESS_ID": "3",
         "LOCAL_DEVICE_IDS": "0,1", "JAX_PLATFORMS": platforms}
  plan = start_plan(env, tpu=TpuSlice("gcetpu", 8, 5))  # the variables win over a TPU slice
  assert plan.initialize and plan.cpu_collectives == collectives
  assert plan.kwargs == dict(coordinator_address=env["COORDINATOR_ADDRESS"],
                             num_processes=int(env["NUM_PROCESSES"]),
                             process_id=int(env["PROCESS_ID"]),
                             local_device_ids=[0, 1])
  assert (plan.num_processes, plan.process_id) == (4, 3)


def test_slurm_task_takes_its_id_from_slurm_procid():
  """gpu.sh slurm exports COORDINATOR_ADDRESS and NUM_PROCESSES; srun gives SLURM_PROCID."""
  env = {"COORDINATOR_ADDRESS": "node07:12355", "NUM_PROCESSES": "8", "SLURM_PROCID": "5",
         "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "77"}
  plan = start_plan(env)
  assert plan.kwargs["process_id"] == int(env["SLURM_PROCID"])
  assert plan.kwargs["num_processes"] == int(env["NUM_PROCESSES"])
  assert plan.kwargs["local_device_ids"] is None
  # PROCESS_ID, when given, wins.
  assert start_plan({**env, "PROCESS_ID": "2"}).process_id == 2


def test_slurm_step_without_coordinator_is_an_error():
  env = {"SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4", "SLURM_PROCID": "1"}
  with pytest.raises(ValueError, match="gpu.sh slurm"):
    start_plan(env)
  # A single-task step (an interactive srun, the batch script itself) is one process.
  assert not start_plan({**env, "SLURM_STEP_NUM_TASKS": "1"}).initialize


@pytest.mark.parametrize("env,message", [
    ({"COORDINATOR_ADDRESS": "node-a", "NUM_PROCESSES": "2", "PROCESS_ID": "0"}, "host:port"),
    ({"COORDINATOR_ADDRESS": "node-a:1"}, "NUM_PROCESSES is not"),
    ({"COORDINATOR_ADDRESS": "node-a:1", "NUM_PROCESSES": "2"}, "PROCESS_ID is not"),
    ({"COORDINATOR_ADDRESS": "node-a:1", "NUM_PROCESSES": "2", "PROCESS_ID": "2"},
     "0 <= PROCESS_ID < NUM_PROCESSES"),
    ({"COORDINATOR_ADDRESS": "node-a:1", "NUM_PROCESSES": "two", "PROCESS_ID": "0"},
     "NUM_PROCESSES='two' is not an integer"),
    ({"COORDINATOR_ADDRESS": "node-a:1", "NUM_PROCESSES": "2", "PROCESS_ID": "0",
      "LOCAL_DEVICE_IDS": "0;1"}, "comma-separated"),
])
def test_malformed_coordinator_variables_are_clear_errors(env, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    start_plan(env)


def test_one_process_needs_no_process_id():
  plan = start_plan({"COORDINATOR_ADDRESS": "127.0.0.1:5", "NUM_PROCESSES": "1"})
  assert plan.initialize and plan.kwargs["process_id"] == 0
