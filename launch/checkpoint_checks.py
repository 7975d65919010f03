"""What is checked before and around a restore, so that a bad checkpoint is one clear error:
is there a checkpoint to restore (without creating anything), does a state match what was
saved, and a failed restore's leftover reads kept off the terminal.

`launch/checkpoint.py` (the Checkpointer) raises `CheckpointError` with these.
"""

import json
import logging
import os
import re
import sys
import threading
from typing import Any

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from launch import config_flags


class CheckpointError(RuntimeError):
  """A checkpoint is missing or cannot be restored (corrupt, truncated, mismatched); the
  message names the step and the command-line fix."""


# --- before restoring: is there a checkpoint? -------------------------------------------


def saved_steps(workdir: str | os.PathLike) -> list[int]:
  """The finalized steps in `<workdir>/checkpoints`, read without creating anything (a
  Checkpointer creates the folder, which a command that only reads must not do)."""
  directory = epath.Path(workdir) / "checkpoints"
  return sorted(ocp.path.step.checkpoint_steps(directory)) if directory.is_dir() else []


def require_checkpoint(workdir: str, step: int | None = None, *, flag: str = "--workdir",
                       step_flag: str = "--step") -> int:
  """The step to restore from `workdir` (`step`, or the latest); else a CheckpointError
  naming the problem and the fix, before anything is built, restored or written.

  flag, step_flag: the command-line flags that gave `workdir` and `step`, for the message.
  """
  steps = saved_steps(workdir)
  if not steps:
    missing = "" if epath.Path(workdir).exists() else " (the folder does not exist)"
    raise CheckpointError(
        f"{flag} {workdir} has no checkpoint{missing}: train first, with python -m "
        f"launch.train --config <config file> --workdir {workdir}, or pass the workdir of "
        f"a trained run.")
  if step is None:
    return steps[-1]
  if int(step) not in steps:
    raise CheckpointError(
        f"{flag} {workdir} has no checkpoint for step {step}; its steps are {steps}. Pass "
        f"{step_flag} with one of them, or leave {step_flag} out for the latest "
        f"({steps[-1]}).")
  return int(step)


class _OrphanedReadsFilter(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" for a failed restore's reads."""

  def __init__(self):
    super().__init__()
    self.directories: set[str] = set()

  def filter(self, record):
    error = record.exc_info[1] if record.exc_info else None
    return not (error is not None and any(d in str(error) for d in self.directories))


_orphaned_reads = _OrphanedReadsFilter()


def silence_orphaned_reads(directory):
  """Installed before every restore: if it fails, its other reads must not flood the
  terminal (installing it only after the failure raced them on a busy machine).

  orbax reads every array concurrently; when one read fails it raises at once and closes
  its event loop, and each read still in flight later fails to deliver its result to that
  closed loop ("RuntimeError: Event loop is closed", printed through sys.unraisablehook,
  hundreds of times) or dies unretrieved (asyncio logs the same tensorstore error again,
  with kilobytes of spec). The restore's own error already says what went wrong, so both
  are dropped: that one RuntimeError process-wide, from sys.unraisablehook and from worker
  threads (it only ever means a result nobody awaits any more), the asyncio log records
  only when they name this checkpoint.
  """
  _orphaned_reads.directories.add(str(directory))
  asyncio_logger = logging.getLogger("asyncio")
  if _orphaned_reads not in asyncio_logger.filters:
    asyncio_logger.addFilter(_orphaned_reads)
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_callbacks", False):
    return

  closed = lambda e: isinstance(e, RuntimeError) and str(e) == "Event loop is closed"

  def hook(unraisable):
    if not closed(unraisable.exc_value):
      previous(unraisable)

  previous_thread_hook = threading.excepthook

  def thread_hook(args):     # the same error raised in one of orbax's worker threads
    if not closed(args.exc_value):
      previous_thread_hook(args)

  hook.drops_closed_loop_callbacks = True
  sys.unraisablehook = hook
  threading.excepthook = thread_hook


# --- input checks -----------------------------------------------------------------------


def check_state_leaves(state):
  """Orbax saves arrays; a bare Python or numpy scalar saves but fails to restore."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if not isinstance(leaf, (jax.Array, np.ndarray)):
      raise TypeError(
          f"Train state leaf {jax.tree_util.keystr(path)} is a {type(leaf).__name__} "
          f"({leaf!r}); checkpoints hold arrays only. Store it as jnp.asarray(...) "
          "(orbax cannot restore bare scalars).")


def as_abstract(abstract_state):
  """Leaves -> ShapeDtypeStruct with a sharding on the current mesh (jax.Arrays accepted)."""

  def convert(path, leaf):
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
      raise ValueError(
          f"Abstract state leaf {jax.tree_util.keystr(path)} has no sharding. Give every "
          "leaf as jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec)) "
          "for the current mesh, so orbax knows where to place the restored shards.")
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

  return jax.tree_util.tree_map_with_path(convert, abstract_state)


def config_json_value(config) -> Any:
  """ConfigDict / JSON text / dict -> a JSON-ready value (tuples tagged, see config_flags)."""
  if isinstance(config, str):
    return json.loads(config)
  return json.loads(config_flags.config_to_json(config, indent=None))


def short_error(error: Exception, limit: int = 600) -> str:
  """The gist of an orbax/tensorstore error (their messages append kilobytes of specs)."""
  text = f"{type(error).__name__}: {error}".split(" [tensorstore_spec")[0]
  return text if len(text) <= limit else text[:limit] + " ..."


# Layer layouts: up to 8e9ee51 one module per block (`params/down/0/conv1/...`); now identical
# blocks are stacked (`params/down/layers/block/conv1/...`, vdm/nets/stack.py).
_UNSTACKED = re.compile(r"/(down|up|down_attn|up_attn|blocks)/\d+/")
_STACKED = re.compile(r"/(layers|segments)/")


def stored_names(path) -> list[str]:
  """A pytree path as the names orbax stores it under (dict keys, attribute names, indices)."""
  return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def stored_paths(tree) -> list[str]:
  return ["/" + "/".join(stored_names(p)) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def layout_mismatch(saved_tree, target) -> str | None:
  """Why a restore failed, if the saved state has the old per-block layer layout."""
  saved, wanted = stored_paths(saved_tree), stored_paths(target)
  if (not any(_STACKED.search(p) for p in wanted) or any(_STACKED.search(p) for p in saved)
      or not any(_UNSTACKED.search(p) for p in saved)):
    return None
  example = next(p for p in saved if _UNSTACKED.search(p))
  return (f"it was saved with the unstacked layer layout of vdiff before the scanned layers "
          f"(commit 8e9ee51 and earlier: one module per block, e.g. '{example}'), but the "
          "nets now stack identical blocks on a leading axis (e.g. "
          "'/params/down/layers/block/conv1/kernel', vdm/nets/stack.py); "
          "scan_layers=False uses the stacked layout too. Retrain in a fresh workdir, or "
          "check out 8e9ee51 to sample, evaluate or distil from this checkpoint.")


def is_iterator(data_state) -> bool:
  return hasattr(data_state, "get_state") and hasattr(data_state, "set_state")
