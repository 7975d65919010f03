"""Training output: a JSONL metrics file, TensorBoard events and a console progress line.

Only process 0 writes; other processes get a writer whose methods do nothing, so callers
never branch on the process index.
"""

import json
import logging
import os
import time

import jax
import numpy as np

from launch import flops as flops_lib


class _QuietLibraries(logging.Filter):
  """Drops INFO chatter of orbax/tensorstore/grain (one line per file written) from the log."""
  NOISY = ("/orbax/", "/grain/", "/tensorstore/", "/etils/")

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


class MetricWriter:
  """Appends {"step": s, **metrics} lines to workdir/metrics.jsonl and TensorBoard scalars."""

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:   # TensorBoard is optional; the JSONL file is always written.
        self._tb = None

  def write(self, step: int, metrics: dict, prefix: str = ""):
    if not self.enabled:
      return
    values = {f"{prefix}{k}": float(np.asarray(v)) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """All records of workdir/metrics.jsonl (for tests, summaries and the README table)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


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
