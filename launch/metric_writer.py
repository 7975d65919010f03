"""Training output: a JSONL metrics file, TensorBoard events and a console progress line.

Only process 0 writes; other processes get a writer whose methods do nothing, so callers
never branch on the process index.
"""

import io
import json
import logging
import os
import time

import jax
import numpy as np

from launch import flops as flops_lib
from launch import fs


class _QuietLibraries(logging.Filter):
  """Drops INFO chatter of orbax/tensorstore/grain (one line per file written) from the log."""
  NOISY = ("/orbax/", "/grain/", "/tensorstore/", "/etils/", "/gcsfs/", "/fsspec/")

  def filter(self, record):
    return record.levelno >= logging.WARNING or not any(
        n in record.pathname for n in self.NOISY)


def setup_logging():
  """INFO logging of our own modules, warnings only from the libraries."""
  root = logging.getLogger()
  root.setLevel(logging.INFO)
  for handler in root.handlers:
    handler.addFilter(_QuietLibraries())
  from absl import logging as absl_logging
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())


class _EventFile:
  """A TensorBoard event file on GCS (via launch/fs.py) for tensorboardX: GCS has no
  append, so the whole file is rewritten when tensorboardX flushes, and only then (its own
  gs:// writer also uploads from `__del__`, retrying for minutes if the store is gone)."""

  def __init__(self, path):
    self.path, self._buffer, self._written = path, io.BytesIO(), 0

  def write(self, data):
    self._buffer.write(data)

  def flush(self):
    if self._buffer.tell() != self._written:
      fs.write_atomic(self.path, self._buffer.getvalue())
      self._written = self._buffer.tell()

  def close(self):
    self.flush()


class _EventFileFactory:
  def open(self, path):
    return _EventFile(path)

  def directory_check(self, path):
    del path   # object stores need no folders


def _tensorboard_writer(logdir: str, flush_seconds: float):
  """tensorboardX's SummaryWriter for a local or gs:// logdir, or None if not installed."""
  try:
    from tensorboardX import SummaryWriter, record_writer
  except ImportError:   # TensorBoard is optional; the JSONL file is always written.
    return None
  record_writer.register_writer_factory("gs", _EventFileFactory())
  return SummaryWriter(logdir, flush_secs=int(flush_seconds))


class MetricWriter:
  """{"step": s, **metrics} lines in workdir/metrics.jsonl, and TensorBoard scalars.

  A resumed run passes the step it resumed from: rows of later steps, written by the run
  that stopped and about to be re-run, are dropped, so each step is in the file once.
  Locally each row is appended and flushed. GCS has no append: the whole file is rewritten
  (one upload) at most every `flush_seconds`, when the trainer saves a checkpoint, and on
  close, so a crash loses at most the rows of those last seconds, and only rows of steps
  after the last checkpoint, which the resumed run redoes anyway. TensorBoard events are
  flushed on the same clock.
  """

  def __init__(self, workdir, *, resume_step: int = 0, enabled: bool | None = None,
               flush_seconds: float = 30.0):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    if not self.enabled:
      return
    self.path = fs.path(workdir) / "metrics.jsonl"
    self._remote = fs.is_remote(self.path)
    self._flush_seconds, self._last_flush = flush_seconds, time.monotonic()
    existing = _lines(self.path)
    kept = [line for line in existing if json.loads(line).get("step", 0) <= resume_step]
    self._rows = kept if self._remote else None
    if len(kept) != len(existing) or not self.path.exists():
      fs.write_atomic(self.path, "".join(line + "\n" for line in kept))
    self._jsonl = None if self._remote else self.path.open("a", encoding="utf-8")
    self._tb = _tensorboard_writer(os.fspath(self.path.parent / "tensorboard"), flush_seconds)

  def write(self, step: int, metrics: dict, prefix: str = ""):
    if not self.enabled:
      return
    values = {f"{prefix}{k}": float(np.asarray(v)) for k, v in metrics.items()}
    line = json.dumps({"step": int(step), **values})
    if self._remote:
      self._rows.append(line)
    else:
      self._jsonl.write(line + "\n")
      self._jsonl.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, int(step))
    if time.monotonic() - self._last_flush >= self._flush_seconds:
      self.flush()

  def write_image(self, step: int, tag: str, image: np.ndarray):
    """A uint8 [H, W, C] image to TensorBoard (samples; the JSONL file keeps scalars)."""
    if self.enabled and self._tb is not None:
      self._tb.add_image(tag, np.asarray(image), int(step), dataformats="HWC")

  def flush(self):
    if not self.enabled:
      return
    if self._remote:
      fs.write_atomic(self.path, "".join(line + "\n" for line in self._rows))
    if self._tb is not None:
      self._tb.flush()
    self._last_flush = time.monotonic()

  def close(self):
    if self.enabled:
      self.flush()
      if self._jsonl is not None:
        self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


def _lines(path) -> list[str]:
  if not path.exists():
    return []
  return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_metrics(workdir) -> list[dict]:
  """All records of workdir/metrics.jsonl (for tests, summaries and the README table)."""
  return [json.loads(line) for line in _lines(fs.path(workdir) / "metrics.jsonl")]


class Progress:
  """Formats `step 1200/3000 | loss 1.234 | 12.3 steps/s | 790 img/s | 41.2 TFLOP/s/device |
  MFU 20.8% | ETA 2m26s`.

  TFLOP/s per device appears when `flops_per_step` (model FLOPs per device: the step's jaxpr
  count, launch/flops.py) is given, MFU when `peak_flops` (the device's peak FLOP/s) is given
  as well. `throughput` holds the
  numbers of the last line, for metrics.jsonl.
  """

  def __init__(self, start_step: int, total_steps: int, batch_size: int, *,
               flops_per_step: float | None = None, peak_flops: float | None = None):
    self.total, self.batch_size = total_steps, batch_size
    self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
    self._last_step, self._last_time = start_step, time.perf_counter()
    self.throughput = {}

  def line(self, step: int, metrics: dict) -> str:
    now = time.perf_counter()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    shown = " | ".join(f"{k} {float(np.asarray(v)):.4g}" for k, v in sorted(metrics.items()))
    self.throughput = flops_lib.utilization(self.flops_per_step, rate, self.peak_flops)
    compute = ""
    if "tflops_per_device" in self.throughput:
      compute = f"{self.throughput['tflops_per_device']:.3g} TFLOP/s/device | "
    if "mfu" in self.throughput:
      compute += f"MFU {100 * self.throughput['mfu']:.1f}% | "
    return (f"step {step}/{self.total} | {shown} | {rate:.2f} steps/s | "
            f"{rate * self.batch_size:.0f} img/s | {compute}ETA {format_seconds(eta)}")


def format_seconds(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
