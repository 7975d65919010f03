"""Checkpoints: orbax-checkpoint's CheckpointManager behind one small class.

A step directory `<workdir>/checkpoints/<step>/` holds these items:

  state/          the train state pytree (StandardSave: OCDBT/zarr, written shard by shard
                  from every process; restored onto any mesh)
  checksums/      one integer fingerprint per state leaf (`launch/fingerprints.py`), checked
                  after every restore
  data_iterator/  a grain iterator's state, one JSON file per process (grain's handler), or
  data_state/     any JSON value the trainer passes as data state
  config/         the experiment config as JSON (`launch.config_flags.config_to_json`)

Why the checksums: OCDBT checksums its b-tree nodes, but not the array chunks. Flipping a
byte inside a chunk of a float array restores silently with a wrong value (measured on
orbax 0.12.8 / tensorstore); a truncated or missing file does raise. The fingerprint is an
exact integer sum over the array's bits, so it is independent of the mesh and of the order
of the reduction, and a restored array equals the saved one iff (up to a 2^-32 chance)
the fingerprints agree.

Atomicity: orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it to
`<step>` only after every item is written (tests/test_checkpoint.py kills a process just
before that rename). A crash mid-save therefore leaves no `<step>` directory, and the
earlier steps are untouched; leftover tmp directories are deleted when the next
Checkpointer opens the directory.

How the trainer uses it (single- and multi-process alike; every process runs the same
calls, as orbax saves collectively):

    ckpt = Checkpointer(workdir, save_every=config.save_every, keep=config.keep)
    ckpt.install_sigterm_handler()            # from the main thread, once
    if ckpt.latest_step() is not None:
      state, _ = ckpt.restore(abstract_state, data_iterator=train_iter)
    for step in range(int(state["step"]) + 1, num_steps + 1):
      state, metrics = train_step(state, next(train_iter))
      ckpt.save(step, state, data_state=train_iter, config=config)  # no-op off-interval
      if ckpt.preemption_requested(step):     # SIGTERM or JAX's preemption sync point
        break                                 # save() above already wrote this step
    ckpt.close()                              # waits for the last async save

`save` writes when `should_save(step)`: every `save_every` steps, and at any step once
preemption is requested. The async save returns after the arrays are copied off the
device, so donating the state buffers to the next train step is safe.
"""

import json
import logging
import os
import signal

from etils import epath
import grain
import jax
import orbax.checkpoint as ocp

from launch import config_flags
from launch.checkpoint_checks import (  # noqa: F401  (the first three: checkpoint.X)
    CheckpointError, require_checkpoint, saved_steps,
    as_abstract, check_state_leaves, config_json_value, is_iterator, layout_mismatch,
    stored_names, short_error, silence_orphaned_reads)
from launch.fingerprints import state_fingerprints

_STATE, _CHECKSUMS, _CONFIG = "state", "checksums", "config"
_DATA_ITERATOR, _DATA_STATE = "data_iterator", "data_state"


# --- the checkpointer ---------------------------------------------------------------------


class Checkpointer:
  """Async, keep-N, mesh-independent checkpoints of a train state in `<workdir>/checkpoints`.

  Args:
    workdir: the run's directory (local path or anything epath opens, e.g. gs://).
    save_every: `save` writes at steps divisible by this (and on preemption or force).
    keep: how many of the newest steps to keep; older ones are deleted after a save.
    async_save: write in a background thread (the call returns once the arrays are on
      the host). `wait()` or `close()` blocks until the write is committed.
  """

  def __init__(self, workdir: str | os.PathLike, *, save_every: int, keep: int,
               async_save: bool = True, read_only: bool = False):
    if int(save_every) < 1 or int(keep) < 1:
      raise ValueError(f"save_every and keep must be >= 1, got save_every={save_every}, "
                       f"keep={keep}.")
    self.save_every = int(save_every)
    self.keep = int(keep)
    workdir = os.fspath(workdir)
    if "://" not in workdir:        # orbax wants absolute local paths (gs:// stays as it is)
      workdir = os.path.abspath(workdir)
    self.directory = epath.Path(workdir) / "checkpoints"
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=self.save_every,
        max_to_keep=self.keep,
        enable_async_checkpointing=async_save,
        # Only the writer removes unfinished steps (left by a crashed save): to a reader, a
        # step still being saved by a running trainer looks the same (on GCS, a step folder
        # without commit_success.txt), and deleting it would break that save.
        cleanup_tmp_directories=not read_only,
        create=not read_only)
    self.read_only = read_only
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._sigterm = False
    self._previous_handler = None
    self._preemption_cache: tuple[int, bool] | None = None
    self._last_saved: int | None = None

  # --- steps ---

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """Newest saved step (including one whose async write is still in flight), or None."""
    return self._manager.latest_step()

  def step_dir(self, step: int) -> epath.Path:
    """`<workdir>/checkpoints/<step>` (orbax's default step naming)."""
    return self.directory / str(int(step))

  # --- preemption ---

  def install_sigterm_handler(self):
    """On SIGTERM, set a flag instead of dying, so the trainer saves and exits cleanly.

    Call from the main thread. Under multi-process JAX (`jax.distributed.initialize`),
    JAX's preemption service already catches SIGTERM and agrees on a step across all
    processes (see `preemption_requested`); a Python handler would replace it and let
    one process save alone, so none is installed there (tests/test_multiprocess_preemption.py).
    """
    if jax.process_count() > 1:
      if not jax.config.jax_enable_preemption_service:
        logging.warning("jax_enable_preemption_service=False: SIGTERM will end this "
                        "multi-process run without a checkpoint (leave it True to save).")
      return

    def on_sigterm(signum, frame):
      del signum, frame
      logging.warning("SIGTERM received: will save a checkpoint at the next step and stop.")
      self._sigterm = True

    self._previous_handler = signal.signal(signal.SIGTERM, on_sigterm)

  def preemption_requested(self, step: int) -> bool:
    """True once SIGTERM was caught, or at JAX's agreed preemption sync point.

    In multi-process runs every process must call this at every step (it takes part in
    a collective agreement on the step at which all processes save).
    """
    step = int(step)
    if self._preemption_cache is None or self._preemption_cache[0] != step:
      self._preemption_cache = (step, bool(self._manager.reached_preemption(step)))
    return self._sigterm or self._preemption_cache[1]

  def should_save(self, step: int) -> bool:
    """True at every `save_every`-th step, and at any step once preemption is requested."""
    return int(step) % self.save_every == 0 or self.preemption_requested(step)

  # --- save ---

  def save(self, step: int, state, *, data_state=None, config=None,
           force: bool = False) -> bool:
    """Starts an async save of `state` (and data state, config) if `should_save(step)`.

    Args:
      step: the training step the state is the result of.
      state: pytree of jax.Arrays (any sharding) or numpy arrays.
      data_state: a grain iterator (saved per process via grain's orbax handler), or any
        JSON value (dict, list, str, number, bytes).
      config: ConfigDict, JSON text or dict, stored as JSON for `restore_config`.
      force: save even off the interval.

    Returns:
      True if a save was started (False off the interval, or if this Checkpointer
      already saved this step, e.g. an interval step that was also the preemption step).
    """
    if self.read_only:
      raise RuntimeError(f"{self.directory} was opened read-only (evaluation, sampling, a "
                         "teacher): it cannot save")
    step = int(step)
    if not (force or self.should_save(step)) or step == self._last_saved:
      return False
    check_state_leaves(state)
    items = {
        _STATE: ocp.args.StandardSave(state),
        _CHECKSUMS: ocp.args.JsonSave(state_fingerprints(state)),
    }
    if is_iterator(data_state):
      items[_DATA_ITERATOR] = grain.checkpoint.CheckpointSave(data_state)
    elif isinstance(data_state, bytes):
      items[_DATA_STATE] = ocp.args.JsonSave({"bytes": data_state.decode("utf-8")})
    elif data_state is not None:
      items[_DATA_STATE] = ocp.args.JsonSave({"value": data_state})
    if config is not None:
      items[_CONFIG] = ocp.args.JsonSave(config_json_value(config))
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except ocp.checkpoint_manager.StepAlreadyExistsError as e:
      raise CheckpointError(
          f"Step {step} already exists in {self.directory} (from an earlier run?). Delete "
          f"{self.step_dir(step)} to overwrite it, or resume from the latest step.") from e
    if saved:
      self._last_saved = step
    return saved

  def check(self):
    """Raises CheckpointError if an async save running in the background has failed (the
    trainer calls this at every log step, so a failing save does not go unnoticed)."""
    try:
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"an asynchronous save into {self.directory} failed: "
                            f"{short_error(e)}") from e

  def wait(self):
    """Blocks until the in-flight async save is committed (re-raises its error)."""
    self._manager.wait_until_finished()

  def close(self):
    """Waits for pending saves, releases orbax's threads, restores the SIGTERM handler."""
    self._manager.wait_until_finished()
    self._manager.close()
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # --- restore ---

  def _resolve_step(self, step: int | None) -> int:
    self._manager.wait_until_finished()  # an in-flight save is not restorable yet
    self._manager.reload()  # steps on disk, whoever wrote them
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise CheckpointError(f"No checkpoint in {self.directory} to restore: train first "
                              "(python -m launch.train ... --workdir <this workdir>).")
      return steps[-1]
    if int(step) not in steps:
      raise CheckpointError(f"No checkpoint for step {step} in {self.directory}; "
                            f"available steps: {steps}. Pass --step with one of them, or "
                            "leave it out for the latest.")
    return int(step)

  def _error(self, step: int, cause: str) -> CheckpointError:
    """A step that cannot be restored: the cause, then what to do, as command-line flags."""
    steps = self.all_steps()
    others = [s for s in steps if s != step]
    if not others:
      fix = (f"It is the only checkpoint: delete {self.step_dir(step)} and rerun "
             "launch.train to train from scratch.")
    else:
      earlier = [s for s in others if s < step]
      pick = earlier[-1] if earlier else others[-1]
      fix = (f"To resume training, delete {self.step_dir(step)} and rerun the same "
             f"launch.train command (it goes on from step {others[-1]}). "
             if step > others[-1] else "")
      fix += (f"To use another saved step ({others}), pass --step {pick} to launch.evaluate "
              f"or launch.sample (--config.distill.teacher_step={pick} for a distillation "
              "teacher).")
    return CheckpointError(
        f"Checkpoint step {step} in {self.step_dir(step)} cannot be restored: {cause}\n"
        f"Nothing was restored (training never restarts from scratch silently). {fix}")

  def restore(self, abstract_state, step: int | None = None, *, data_iterator=None):
    """Restores a step (default: the latest) onto the shardings given by `abstract_state`.

    Args:
      abstract_state: pytree matching the saved one, leaves
        `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` for the current mesh (any
        number of devices); dtypes may differ from the saved ones (values are cast).
      step: which step; None for the latest.
      data_iterator: a grain iterator whose state is set from the checkpoint, if the
        checkpoint holds one.

    Returns:
      (state, data_state): data_state is the restored `data_iterator`, the JSON data
      state that was saved, or None.

    Raises:
      CheckpointError: naming the step directory and the cause, if the step is missing,
        corrupt, truncated, lacks the state, or does not match `abstract_state`.
    """
    step = self._resolve_step(step)
    target = as_abstract(abstract_state)
    directory = self.step_dir(step)
    present = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
    if _STATE not in present:
      raise self._error(step, f"the '{_STATE}' item is missing (found {sorted(present)}).")
    items = {_STATE: ocp.args.StandardRestore(target)}
    if _CHECKSUMS in present:
      items[_CHECKSUMS] = ocp.args.JsonRestore()
    if _DATA_STATE in present:
      items[_DATA_STATE] = ocp.args.JsonRestore()
    if _DATA_ITERATOR in present and data_iterator is not None:
      items[_DATA_ITERATOR] = grain.checkpoint.CheckpointRestore(data_iterator)
    silence_orphaned_reads(directory)   # before reading: a failure's leftovers race the raise
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      try:
        layout = layout_mismatch(self._manager.item_metadata(step)[_STATE], target)
      except Exception:  # pylint: disable=broad-except
        layout = None
      raise self._error(step, layout or short_error(e)) from e
    state = restored[_STATE]
    if _CHECKSUMS in present:
      self._verify(step, state, restored[_CHECKSUMS])
    else:
      logging.warning("Checkpoint step %d has no checksums; restored values are unverified.",
                      step)
    return state, self._data_state(step, restored, present, data_iterator)

  def restore_items(self, abstract_state, items, step: int | None = None) -> dict:
    """Restores only the top-level `items` of the state (e.g. ("ema",): a distillation
    teacher, a sampler), so the optimizer state is never read into memory. Returns {item:
    value} shaped as in `abstract_state`; checksums are verified for what is restored."""
    step = self._resolve_step(step)
    wanted = {k: as_abstract(abstract_state[k]) for k in items}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(wanted)
    nested = {}   # orbax's view of the same leaves: a dict nest keyed by path names
    for path, leaf in leaves:
      *parents, name = stored_names(path)
      node = nested
      for parent in parents:
        node = node.setdefault(parent, {})
      node[name] = leaf
    directory = self.step_dir(step)
    silence_orphaned_reads(directory)   # before reading: a failure's leftovers race the raise
    try:
      restored = ocp.PyTreeCheckpointer().restore(directory / _STATE, args=ocp.args.PyTreeRestore(
          nested, restore_args=ocp.checkpoint_utils.construct_restore_args(nested),
          partial_restore=True))
      values = []
      for path, _ in leaves:
        node = restored
        for name in stored_names(path):
          node = node[name]
        values.append(node)
      checksums = directory / _CHECKSUMS / "metadata"
      saved = json.loads(checksums.read_text()) if checksums.exists() else None
    except Exception as e:  # pylint: disable=broad-except
      raise self._error(step, short_error(e)) from e
    missing = [jax.tree_util.keystr(path) for (path, _), v in zip(leaves, values)
               if isinstance(v, jax.ShapeDtypeStruct)]
    if missing:   # a partial restore leaves what the checkpoint lacks as it was given
      raise self._error(step, f"{len(missing)} arrays of the model are not in the checkpoint "
                              f"(a different architecture or parameter layout), e.g. "
                              f"{missing[:3]}")
    state = jax.tree_util.tree_unflatten(treedef, values)
    if saved is not None:
      self._verify(step, state, saved)
    return state

  def _verify(self, step: int, state, saved: dict):
    """Compares fingerprints of the restored leaves with those written at save time."""
    restored = state_fingerprints(state)
    bad = []
    for path, now in restored.items():
      then = saved.get(path)
      if then is None or then["dtype"] != now["dtype"] or then["shape"] != now["shape"]:
        continue  # a cast on restore changes the bits; nothing to compare against
      if then["fingerprint"] != now["fingerprint"]:
        bad.append(path)
    if bad:
      raise self._error(step, f"the restored values of {bad} differ from what was saved "
                        "(checksum mismatch): the array files are corrupt.")

  def _data_state(self, step, restored, present, data_iterator):
    if _DATA_ITERATOR in present:
      if data_iterator is None:   # normal when reading weights to evaluate, sample, distil
        logging.info("Checkpoint step %d holds a data iterator state, not restored (pass "
                     "data_iterator= to restore() to resume the data order).", step)
        return None
      return restored[_DATA_ITERATOR]
    if _DATA_STATE in present:
      value = restored[_DATA_STATE]
      if data_iterator is not None:
        logging.warning("data_iterator was given but step %d saved a plain data state; "
                        "returning that state unapplied.", step)
      return value["bytes"].encode("utf-8") if "bytes" in value else value["value"]
    return None

  def restore_config(self, step: int | None = None):
    """The config saved with a step (default: the latest), as a locked ConfigDict."""
    step = self._resolve_step(step)
    if not (self.step_dir(step) / _CONFIG).is_dir():
      raise self._error(step, "no config was saved with this step.")
    try:
      value = self._manager.restore(step, args=ocp.args.Composite(
          **{_CONFIG: ocp.args.JsonRestore()}))[_CONFIG]
    except Exception as e:  # pylint: disable=broad-except
      raise self._error(step, short_error(e)) from e
    return config_flags.config_from_json(json.dumps(value))
