"""The post-hoc EMA snapshots of a training run (EDM2 sec. 3): written by the trainer, read
by `python -m launch.phema`.

With optim.phema.enabled the optimizer state holds one power-function EMA per std of
optim.phema.stds (vdm/posthoc_ema.py). Every optim.phema.snapshot_every steps, and at the
last step, the trainer saves them under

  <workdir>/phema_snapshots/checkpoints/<step>/
      state/      {"t": the profiles' update count, "profiles": {"0": params tree of the
                  first std, "1": of the second, ...}}
      checksums/  per-leaf fingerprints, checked on every read
      config/     the run's config (its optim.phema.stds say which std each profile has)

through the project's Checkpointer: orbax writes each step into a temporary folder renamed
into place when complete (an object set with a commit marker on GCS), so a run that dies
mid-save leaves no half snapshot and never touches the earlier ones; the writer deletes such
unfinished folders when it next opens. Snapshots are kept forever (the reconstruction needs
the whole series).

A resumed run restores the profiles from the train checkpoint (they are optimizer state)
and continues the same series. Snapshot steps that an interrupted run wrote after the
checkpoint it resumes from are kept: the resumed run recomputes the same profiles for them
(the training step is deterministic given the checkpoint), so it skips those steps instead
of rewriting them.
"""

import logging

import jax

from launch import checkpoint as checkpoint_lib
from launch import fs, mesh as mesh_lib
from vdm import posthoc_ema

DIRNAME = "phema_snapshots"
_KEEP_ALL = 1 << 40


def directory(workdir: str) -> str:
  """`<workdir>/phema_snapshots`, the snapshots' own Checkpointer root."""
  return fs.join(workdir, DIRNAME)


def saved_steps(workdir: str) -> list[int]:
  """The committed snapshot steps of a training workdir (nothing created)."""
  return checkpoint_lib.saved_steps(directory(workdir))


def snapshot_of(opt_state) -> dict:
  """The tree a snapshot stores, taken from a train state's optimizer state."""
  found = posthoc_ema.find_state(opt_state)
  if found is None:
    raise ValueError("the optimizer state has no post-hoc EMA profiles: enable them with "
                     "--config.optim.phema.enabled=True")
  return {"t": found.count, "profiles": _by_index(found.profiles)}


def _by_index(trees) -> dict:
  """{"0": trees[0], ...}: a dict, which a partial restore (restore_items) can address."""
  return {str(j): tree for j, tree in enumerate(trees)}


def abstract_snapshot(abstract_params, num_stds: int, mesh) -> dict:
  """The abstract tree of a snapshot of `num_stds` profiles on `mesh` (restore target)."""
  return {"t": jax.ShapeDtypeStruct((), "int32", sharding=mesh_lib.replicated(mesh)),
          "profiles": _by_index([abstract_params] * num_stds)}


class Writer:
  """Saves the run's profiles at snapshot steps (async, like the train checkpoints)."""

  def __init__(self, workdir: str, every: int, num_steps: int):
    if int(every) < 1:
      raise ValueError(f"optim.phema.snapshot_every must be >= 1, got {every}: the "
                       "reconstruction needs a series of snapshots (EDM2 saves one every "
                       "~0.4% of training)")
    self.every, self.num_steps = int(every), int(num_steps)
    self._ckpt = checkpoint_lib.Checkpointer(directory(workdir), save_every=self.every,
                                             keep=_KEEP_ALL)
    self._existing = set(self._ckpt.all_steps())

  def due(self, step: int) -> bool:
    return step % self.every == 0 or step == self.num_steps

  def maybe_save(self, step: int, state, config) -> bool:
    """Starts saving the profiles of `state` if `step` is a snapshot step; returns whether
    a save started. A step already on disk (written by an interrupted run beyond the
    checkpoint this run resumed from) is kept."""
    if not self.due(step):
      return False
    if step in self._existing:
      logging.info("Post-hoc EMA snapshot %d exists (from the interrupted run); kept.", step)
      return False
    return self._ckpt.save(step, snapshot_of(state["opt_state"]), config=config, force=True)

  def check(self):
    self._ckpt.check()

  def close(self):
    self._ckpt.close()


class Reader:
  """The snapshots of a training workdir, read only: their steps, times, stds, profiles."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self._ckpt = checkpoint_lib.Checkpointer(directory(workdir), save_every=1,
                                             keep=_KEEP_ALL, read_only=True)
    self.steps = self._ckpt.all_steps()
    self._stds = {}

  def config(self, step: int):
    return self._ckpt.restore_config(step)

  def stds(self, step: int) -> tuple[float, ...]:
    """The stds of the snapshot's profiles, in order (from the config saved with it)."""
    if step not in self._stds:
      self._stds[step] = tuple(float(s) for s in self.config(step).optim.phema.stds)
    return self._stds[step]

  def time(self, step: int, abstract_params, mesh) -> int:
    """The profiles' update count t at a snapshot (the step, unless updates were skipped)."""
    abstract = abstract_snapshot(abstract_params, len(self.stds(step)), mesh)
    return int(jax.device_get(self._ckpt.restore_items(abstract, ("t",), step)["t"]))

  def profiles(self, step: int, abstract_params, mesh) -> tuple:
    """The snapshot's profiles, one params tree per std, on the shardings given."""
    num = len(self.stds(step))
    abstract = abstract_snapshot(abstract_params, num, mesh)
    profiles = self._ckpt.restore_items(abstract, ("profiles",), step)["profiles"]
    return tuple(profiles[str(j)] for j in range(num))

  def close(self):
    self._ckpt.close()
