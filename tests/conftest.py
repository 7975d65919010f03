"""Every test runs on CPU with 8 fake devices, so sharded code paths run without a pod.

Compiled programs are cached on disk (JAX's persistent compilation cache) for the session
and for the subprocesses tests start, which rerun the same train steps: it saves minutes.

gs:// paths go to a local GCS emulator (tests/gcs_emulator.py), never to real GCS: every
client finds it through STORAGE_EMULATOR_HOST, set here before anything imports a GCS
client and inherited by subprocesses; the emulator starts when a test first asks for
`gcs_dir`.
"""
import os
import tempfile
import uuid

import pytest

from tests import gcs_emulator

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "vdiff-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

_GCS_PORT = gcs_emulator.free_port()
_GCS_BUCKET = "vdiff-test"
os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{_GCS_PORT}"

import jax  # noqa: E402  (after the flags above)

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def gcs_bucket() -> str:
  """gs://BUCKET on the local emulator (started once per session)."""
  proc = gcs_emulator.start(_GCS_PORT, _GCS_BUCKET)
  yield f"gs://{_GCS_BUCKET}"
  proc.kill()
  proc.wait(10)


@pytest.fixture
def gcs_dir(gcs_bucket) -> str:
  """A fresh gs:// folder on the emulator's bucket."""
  return f"{gcs_bucket}/{uuid.uuid4().hex[:12]}"
