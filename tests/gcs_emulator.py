"""A local GCS API for the tests: `gcp-storage-emulator` (PyPI), in memory, on localhost.

  python -m tests.gcs_emulator --port 9023 --bucket test-bucket

Clients reach it through STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT alone (launch/fs.py
maps that variable onto what each client reads). One gap of the emulator is filled here:
its downloads lack the `x-goog-generation` header real GCS sends with every object, which
tensorstore (orbax's array store) parses ("Malformed StorageGeneration" without it). We add
that header (and its siblings) from the object's own metadata; nothing else is changed.
"""

import argparse
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _add_generation_headers():
  """Wraps the emulator's download handler; must run before its server module is imported
  (the server's routing table holds the handler function itself)."""
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  original = objects.download

  def download(request, response, storage, *args, **kwargs):
    original(request, response, storage, *args, **kwargs)
    if response.status.value in (200, 206):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", 1))
      response["x-goog-stored-content-length"] = str(obj["size"])

  objects.download = download


def serve(port: int, bucket: str):
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # request log
  _add_generation_headers()
  from gcp_storage_emulator.server import create_server  # pylint: disable=g-import-not-at-top
  create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(port: int, bucket: str, timeout: float = 30.0) -> subprocess.Popen:
  """Starts the emulator in a subprocess and waits until it answers; its request log goes
  to $TMPDIR/vdiff-gcs-emulator-PORT.log."""
  log = open(os.path.join(tempfile.gettempdir(), f"vdiff-gcs-emulator-{port}.log"), "wb")
  proc = subprocess.Popen([sys.executable, "-m", "tests.gcs_emulator", "--port", str(port),
                           "--bucket", bucket], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + timeout
  while True:
    try:
      urllib.request.urlopen(f"http://127.0.0.1:{port}/storage/v1/b/{bucket}", timeout=2)
      return proc
    except OSError:
      if proc.poll() is not None or time.monotonic() > deadline:
        proc.kill()
        raise RuntimeError(f"the GCS emulator did not start on port {port}")
      time.sleep(0.1)


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--bucket", required=True)
  args = parser.parse_args()
  serve(args.port, args.bucket)
