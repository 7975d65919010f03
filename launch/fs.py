"""The one file-system layer: every path the project reads or writes, local and gs:// alike.

Paths are `etils.epath.Path`s: local files, or `gs://bucket/...` through gcsfs. Three things
differ on GCS and are handled here once:

- No rename and no append. `write_atomic` writes a local file through a temporary + rename
  and a GCS object with one upload (an object appears whole or not at all); appending to a
  JSONL file is the metric writer's business (launch/metric_writer.py rewrites it).
- Libraries that write only local files (PIL, ArrayRecord's writer): `local_then_move`
  hands them a local temporary file and moves it to its destination when they are done.
- The GCS emulator. A user (and our tests) points every client at a local GCS API with the
  standard `STORAGE_EMULATOR_HOST` variable alone; `use_emulator_if_set` maps it onto what
  each client reads: gcsfs (also anonymous, and without its gRPC bucket-type probe, which
  waits 60 s per call against an emulator), tensorstore (orbax's arrays), google-cloud-cpp
  (ArrayRecord readers, the text cache and tfds data) and google-cloud-storage
  (tensorboardX) reads the variable itself.
"""

import contextlib
import os
import shutil
import socket
import tempfile

from etils import epath

PathLike = str | os.PathLike


def use_emulator_if_set(environ=os.environ) -> dict:
  """Points every GCS client at $STORAGE_EMULATOR_HOST, if set; returns what it set.

  Runs when launch/ is imported, before any client reads its settings; variables the user
  set already are kept.
  """
  host = environ.get("STORAGE_EMULATOR_HOST", "")
  if not host:
    return {}
  url = host if "://" in host else f"http://{host}"
  wanted = {
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",   # no gRPC storage-layout probe
      "FSSPEC_GCS_TOKEN": "anon",                     # no credentials lookup
      "TENSORSTORE_GCS_HTTP_URL": url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",    # tensorstore: no metadata server
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,         # google-cloud-cpp (ArrayRecord)
  }
  set_now = {k: v for k, v in wanted.items() if k not in environ}
  environ.update(set_now)
  # fsspec reads FSSPEC_* when first imported; set its config too in case it already was
  import fsspec.config  # pylint: disable=g-import-not-at-top
  fsspec.config.conf.setdefault("gcs", {}).setdefault("token", environ["FSSPEC_GCS_TOKEN"])
  return set_now


def path(p: PathLike) -> epath.Path:
  """An epath.Path; local paths are made absolute (orbax and worker processes need that)."""
  p = os.fspath(p)
  return epath.Path(p if is_remote(p) else os.path.abspath(p))


def is_remote(p: PathLike) -> bool:
  return "://" in os.fspath(p)


def join(p: PathLike, *parts: str) -> str:
  """`p / parts` as a string (for configs and messages), local or gs://."""
  return os.fspath(path(p).joinpath(*parts))


def write_atomic(p: PathLike, data: str | bytes) -> None:
  """Writes the whole file so that a reader sees the old or the new content, never part."""
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  mode = "w" if isinstance(data, str) else "wb"
  if is_remote(p):
    with p.open(mode) as f:
      f.write(data)
    return
  tmp = p.with_name(f"{p.name}.tmp-{socket.gethostname()}-{os.getpid()}")
  with tmp.open(mode) as f:
    f.write(data)
  os.replace(tmp, p)


def append_line(p: PathLike, line: str) -> None:
  """Adds one line to a small log file (evaluation results): an append locally; on GCS,
  which cannot append, the file is read and rewritten whole."""
  p = path(p)
  if not is_remote(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("a", encoding="utf-8") as f:
      f.write(line.rstrip("\n") + "\n")
    return
  old = p.read_text(encoding="utf-8") if p.exists() else ""
  write_atomic(p, old + line.rstrip("\n") + "\n")


@contextlib.contextmanager
def local_then_move(p: PathLike):
  """Yields a local path to write `p`'s content to; on success it becomes `p` (local: a
  rename in the same folder; remote: one upload). On an error nothing is left at `p`."""
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  if not is_remote(p):
    tmp = p.with_name(f"{p.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
      yield os.fspath(tmp)
      os.replace(tmp, p)
    finally:
      if tmp.exists():
        tmp.unlink()
    return
  folder = tempfile.mkdtemp(prefix="vdiff-upload-")
  try:
    local = os.path.join(folder, p.name)
    yield local
    with open(local, "rb") as src, p.open("wb") as dst:
      shutil.copyfileobj(src, dst, length=16 << 20)
  finally:
    shutil.rmtree(folder, ignore_errors=True)


def remove(p: PathLike) -> None:
  p = path(p)
  if p.exists():
    p.unlink()


def require_writable(directory: PathLike) -> None:
  """A clear error, before any work starts, when `directory` cannot be written: a missing
  bucket, no credentials, no permission, a read-only disk."""
  d = path(directory)
  probe = d / f".write-check-{socket.gethostname()}-{os.getpid()}"
  try:
    d.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except (each client raises its own types)
    if is_remote(d):
      bucket = os.fspath(d).split("://", 1)[1].split("/", 1)[0]
      hint = (f"check that bucket gs://{bucket} exists (gcloud storage buckets create "
              f"gs://{bucket}) and that this machine's credentials may write to it "
              "(gcloud auth application-default login, or the TPU VM's service account "
              "with roles/storage.objectAdmin)")
    else:
      hint = "check the path and its permissions"
    raise OSError(f"cannot write to {d}: {type(e).__name__}: {e}. {hint}.") from e


def _no_stale_listings():
  """gcsfs caches folder listings per process; another process's new files (a checkpoint
  another host or an earlier command wrote) would stay invisible. Listings are read fresh."""
  import fsspec.config  # pylint: disable=g-import-not-at-top
  fsspec.config.conf.setdefault("gcs", {})["use_listings_cache"] = False


use_emulator_if_set()
_no_stale_listings()
