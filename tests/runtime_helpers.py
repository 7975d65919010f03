"""Helpers for the runtime tests (test_resilience.py, test_multiprocess.py).

They run `python -m launch.train` in subprocesses, as a user would, on a tiny config:

  * every subprocess writes its output to a log file (read it when an assertion fails);
  * all of them share one JAX persistent compilation cache for this pytest session, so
    only the first run of a given config pays the 20-60 s XLA compile; later runs of the
    same config (and the same device layout) load the executable from disk. The cached
    executable is the one XLA compiled, so results are unchanged (CPU is deterministic).

Run as a module, this file is `launch.train` with test hooks chosen by the environment:

  SIMULATED_PROCESSES=2: the data loader of one process emulates two processes' loaders
    (see `SimulatedProcessesLoader`);
  SIGTERM_AFTER_SAVE_AT_STEP=N: the process sends itself SIGTERM right after the
    trainer's save() call at step N.

  SIMULATED_PROCESSES=2 python -m tests.runtime_helpers --config ... --workdir ...
"""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/vdm/digits.py:runlocal"

# The smallest run that still goes through every part of the loop: the digits runlocal
# model (ch 8, one layer) with a fixed linear schedule (less to compile than the learned
# one), a constant learning rate after warmup (so num_steps does not enter the
# compiled step and runs of different lengths share the compile cache), no evaluation or
# sampling, a metrics record every step, and parameters sharded over 8 devices (fsdp),
# so that checkpoints are written shard by shard.
TINY = ("model.schedule.name=linear", "optim.decay=constant", "train.eval_every=0",
        "train.sample_every=0", "train.log_every=1", "mesh.ici=(1, -1, 1)",
        "mesh.rules=fsdp")

_CACHE_DIR = tempfile.mkdtemp(prefix="runtime_tests_jax_cache_")
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)


def load_config(*overrides):
  from launch import config_flags  # pylint: disable=g-import-not-at-top
  return config_flags.load_config(CONFIG, list(TINY) + list(overrides))


def train_env(num_devices: int = 8, **extra) -> dict:
  """Environment of a training subprocess: CPU, `num_devices` fake devices, shared cache."""
  env = dict(os.environ)
  for key in ("COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID", "LOCAL_DEVICE_IDS"):
    env.pop(key, None)
  env.update(
      JAX_PLATFORMS="cpu",
      # LLVM optimisation off: a quarter less compile time for steps that barely run.
      # Runs compared with each other all use it.
      XLA_FLAGS=(f"--xla_force_host_platform_device_count={num_devices} "
                 "--xla_backend_optimization_level=0"),
      JAX_COMPILATION_CACHE_DIR=_CACHE_DIR,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
      PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
  env.update({k: str(v) for k, v in extra.items()})
  return env


class Run:
  """One `python -m launch.train` subprocess (or another module with the same flags)."""

  def __init__(self, workdir, *overrides, env=None, module="launch.train", name=None,
               log_dir=None):
    """log_dir: where the log file goes (default: the workdir; needed for a gs:// one)."""
    self.workdir = str(workdir)
    log_dir = str(log_dir or self.workdir)
    os.makedirs(log_dir, exist_ok=True)
    self.log_path = os.path.join(log_dir, f"{name or 'train'}.log")
    args = [sys.executable, "-m", module, "--config", CONFIG, "--workdir", self.workdir]
    args += [f"--config.{o}" for o in list(TINY) + list(overrides)]
    self._log = open(self.log_path, "ab")
    self.proc = subprocess.Popen(args, cwd=REPO, env=env or train_env(), stdout=self._log,
                                 stderr=subprocess.STDOUT)

  def log(self) -> str:
    with open(self.log_path, encoding="utf-8", errors="replace") as f:
      return f.read()

  def tail(self, n: int = 3000) -> str:
    return f"--- {self.log_path} (last {n} characters) ---\n{self.log()[-n:]}"

  def poll(self):
    return self.proc.poll()

  def wait(self, timeout: float) -> int:
    try:
      return self.proc.wait(timeout)
    except subprocess.TimeoutExpired as e:
      self.kill()
      raise AssertionError(f"run did not finish in {timeout} s\n{self.tail()}") from e
    finally:
      self._log.close()

  def signal(self, sig):
    self.proc.send_signal(sig)

  def kill(self):
    """SIGKILL if still running (used by tests and by cleanup)."""
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait(30)


def start_processes(workdir, *overrides, num: int = 2, devices: int = 4, **env) -> list:
  """`num` launch.train processes of one multi-process run (gloo over localhost), each with
  `devices` CPU devices, writing to one workdir; logs process_<i>.log."""
  port = free_port()
  return [Run(workdir, *overrides, name=f"process_{i}",
              env=train_env(devices, COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                            NUM_PROCESSES=num, PROCESS_ID=i, **env))
          for i in range(num)]


def wait_until(condition, runs, timeout: float, what: str, interval: float = 0.05):
  """Polls `condition()` until true; fails early if one of `runs` exits meanwhile."""
  deadline = time.monotonic() + timeout
  while not condition():
    for run in runs:
      if run.poll() is not None:
        raise AssertionError(f"run exited with {run.poll()} before {what}\n{run.tail()}")
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out after {timeout} s waiting for {what}\n" +
                           "\n".join(r.tail() for r in runs))
    time.sleep(interval)


def metrics(workdir) -> list[dict]:
  from launch import metric_writer  # pylint: disable=g-import-not-at-top
  return metric_writer.read_metrics(str(workdir))


def train_records(workdir) -> dict[int, dict]:
  """{step: the last train/ record of that step} (a resumed run appends redone steps)."""
  return {r["step"]: r for r in metrics(workdir) if "train/loss" in r}


def has_train_record(workdir) -> bool:
  """Whether a running trainer has logged a step yet (tolerates a half-written line)."""
  try:
    return bool(train_records(workdir))
  except ValueError:
    return False


def checkpoint_steps(workdir) -> list[int]:
  """Finalized checkpoint steps of a local or gs:// workdir (on GCS a step's folder exists
  before its save commits), read without a Checkpointer, which would clean up the folder
  of a save in flight."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from launch import fs  # pylint: disable=g-import-not-at-top
  directory = fs.path(workdir) / "checkpoints"
  return sorted(ocp.path.step.checkpoint_steps(directory)) if directory.is_dir() else []


def iterator_state(workdir, step: int, process_index: int = 0, process_count: int = 1) -> dict:
  """The grain iterator state a checkpoint holds for one process (parsed JSON)."""
  from launch import fs  # pylint: disable=g-import-not-at-top
  path = fs.path(workdir) / "checkpoints" / str(step) / "data_iterator" / (
      f"process_{process_index}-of-{process_count}.json")
  return json.loads(path.read_text(encoding="utf-8"))


def fresh_iterator_state(config, num_batches: int, process_index: int = 0,
                         process_count: int = 1) -> dict:
  """The state of a new loader after `num_batches` batches (an independent count)."""
  from launch.data import pipeline  # pylint: disable=g-import-not-at-top
  source = pipeline.get_source(config.data.name, config.data.train_split)
  it = iter(pipeline.make_loader(source, global_batch_size=config.train.batch_size,
                                 seed=config.seed, process_index=process_index,
                                 process_count=process_count))
  for _ in range(num_batches):
    next(it)
  return json.loads(it.get_state())


def restore(setup, workdir, step=None) -> dict:
  """A checkpoint's train state (default: the latest step) on `setup`'s mesh."""
  from launch import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpointer(str(workdir), save_every=1, keep=100, read_only=True)
  try:
    return ckpt.restore(setup.abstract_state, step=step)[0]
  finally:
    ckpt.close()


def compiled_train_step(config, devices):
  """(setup, compiled train step, the loader's first batch) of `config` on `devices`."""
  from launch import families, trainer  # pylint: disable=g-import-not-at-top
  from launch import setup as setup_lib  # pylint: disable=g-import-not-at-top
  from launch.data import pipeline  # pylint: disable=g-import-not-at-top
  setup = setup_lib.build(config, devices)
  loader = pipeline.make_loader(setup.source, global_batch_size=config.train.batch_size,
                                seed=config.seed)
  batch = next(iter(loader))
  compiled, _ = trainer.compile_step(setup, families.device_batch(batch,
                                                                  setup.family.batch_keys))
  return setup, compiled, batch


def one_train_step(config, devices, with_memory=False):
  """(params, metrics) on the host after one train step of `config` on a mesh of `devices`,
  from the loader's first batch (the 8-devices-equal-1 tests); with_memory adds the
  compiled step's temporary bytes per device (XLA's memory analysis)."""
  from launch import setup as setup_lib  # pylint: disable=g-import-not-at-top
  setup, compiled, batch = compiled_train_step(config, devices)
  new_state, metrics = compiled(setup.init(), setup_lib.put_batch(setup, batch))
  out = host(new_state["params"]), host(metrics)
  return out + (compiled.memory_analysis().temp_size_in_bytes,) if with_memory else out


def host(tree):
  """A pytree of (possibly sharded) arrays as numpy arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(a, b, rtol=0.0, atol=0.0):
  """Same structure and values (exactly, unless tolerances are given), leaf by leaf."""
  import jax  # pylint: disable=g-import-not-at-top
  paths_a = jax.tree_util.tree_flatten_with_path(a)[0]
  paths_b = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in paths_a] == [p for p, _ in paths_b]
  assert len(paths_a) > 0
  for (path, x), (_, y) in zip(paths_a, paths_b):
    name = jax.tree_util.keystr(path)
    if rtol == atol == 0.0:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
    else:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                 err_msg=name)


def free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# ------------------------------------------------- one process emulating several processes


class SimulatedProcessesLoader:
  """The loaders that P processes would build, merged into one process's global batches.

  Process p of P loads its own shard (make_loader(..., process_index=p, process_count=P))
  and contributes global_batch_size / P rows; with P processes the trainer's
  `jax.make_array_from_process_local_data` puts process p's rows at block p of the global
  batch (the mesh lists process 0's devices first). This loader yields exactly that
  concatenation in one process, so a 1-process run sees the global batches of a P-process
  run.
  """

  def __init__(self, make_loader, num_processes, source, **kwargs):
    self.loaders = [make_loader(source, process_index=p, process_count=num_processes,
                                **kwargs) for p in range(num_processes)]

  def __iter__(self):
    return _SimulatedIterator([iter(l) for l in self.loaders])


class _SimulatedIterator:
  """Concatenates the per-process batches; its state is the list of their states."""

  def __init__(self, iterators):
    self.iterators = iterators

  def __iter__(self):
    return self

  def __next__(self):
    batches = [next(it) for it in self.iterators]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self) -> bytes:
    return json.dumps([json.loads(it.get_state()) for it in self.iterators]).encode()

  def set_state(self, state: bytes):
    for it, s in zip(self.iterators, json.loads(state)):
      it.set_state(json.dumps(s).encode())

  def start_prefetch(self):
    pass


def _main():
  """launch.train, with the test hooks that the environment asks for."""
  import signal  # pylint: disable=g-import-not-at-top
  from launch import checkpoint, train  # pylint: disable=g-import-not-at-top
  from launch.data import pipeline  # pylint: disable=g-import-not-at-top
  if "SIMULATED_PROCESSES" in os.environ:
    num = int(os.environ["SIMULATED_PROCESSES"])
    original = pipeline.make_loader
    pipeline.make_loader = lambda source, **kw: SimulatedProcessesLoader(original, num,
                                                                         source, **kw)
  if "SIGTERM_AFTER_SAVE_AT_STEP" in os.environ:
    # SIGTERM lands in the window between the trainer's save() call and its check for
    # preemption: the worst moment, hit deterministically.
    at = int(os.environ["SIGTERM_AFTER_SAVE_AT_STEP"])
    save = checkpoint.Checkpointer.save

    def save_then_sigterm(self, step, *args, **kwargs):
      saved = save(self, step, *args, **kwargs)
      if step == at:
        os.kill(os.getpid(), signal.SIGTERM)
      return saved

    checkpoint.Checkpointer.save = save_then_sigterm
  train.run()


if __name__ == "__main__":
  _main()
