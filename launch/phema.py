r"""Post-hoc EMA (EDM2 sec. 3): the EMA of any length, reconstructed after training from the
snapshots the trainer saved, as a workdir that evaluate, sample and distill accept.

  python -m launch.train --config configs/vdm/digits.py --workdir runs/digits \
      --config.optim.phema.enabled=True --config.optim.phema.snapshot_every=100
  python -m launch.phema --workdir runs/digits --std 0.05,0.10,0.15 [--step N]
      [--out_root DIR] [--max_error 0.05] [--overwrite]
  python -m launch.evaluate --workdir runs/digits/phema_std0.150

For each std this writes <out_root, default --workdir>/phema_std<std> (with _step<N> when
--step is given): a checkpoint at the snapshot step whose `ema` and `params` both hold the
reconstructed EMA (a reconstruction has no raw weights of its own), a fresh optimizer
state, and the run's config with optim.phema disabled; and phema.json beside it (std,
exponent, the snapshots' coefficients, the relative error of the reconstructed profile).

The reconstruction is the least-squares fit of the wanted power-function profile by the
stored ones (vdm/posthoc_ema.py, EDM2 appendix C.3), evaluated at the last snapshot
(or --step): its weights multiply the snapshots, read one at a time and summed on the
run's mesh. A std whose profile the snapshots cannot fit within --max_error (relative L2)
is refused with the range they do fit: shorter EMAs need denser snapshots.
"""

import json
import logging

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
from absl import app, flags

from launch import checkpoint as checkpoint_lib
from launch import config_flags, distributed, families, fs, metric_writer, phema_snapshots
from launch import mesh as mesh_lib
from launch import setup as setup_lib
from vdm import posthoc_ema

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir with post-hoc EMA "
                               "snapshots.", required=True)
_STD = flags.DEFINE_string("std", None, "Comma-separated relative stds of the EMAs to "
                           "reconstruct, e.g. 0.05,0.10 (EDM2's sigma_rel).", required=True)
_STEP = flags.DEFINE_integer("step", None, "Reconstruct at this snapshot step (default: the "
                             "last); only snapshots up to it are used.")
_OUT_ROOT = flags.DEFINE_string("out_root", None, "Where the phema_std* workdirs go "
                                "(default: --workdir).")
_MAX_ERROR = flags.DEFINE_float("max_error", 0.05, "Largest relative L2 error of the "
                                "reconstructed EMA profile accepted.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing outputs.")


def parse_stds(text: str) -> list[float]:
  """'0.05,0.10' -> [0.05, 0.1]; an InputError for text that is not such a list or a std no
  power-function EMA has."""
  try:
    stds = [float(s) for s in text.split(",") if s.strip()]
  except ValueError:
    stds = []
  if not stds:
    raise config_flags.InputError(f"--std {text!r}: pass comma-separated relative stds, "
                                  "e.g. --std 0.05,0.10")
  try:
    posthoc_ema.exponent_of_std(stds)
  except ValueError as e:
    raise config_flags.InputError(f"--std {text}: {e}") from None
  return stds


def output_dir(out_root: str, std: float, step: int | None) -> str:
  return fs.join(out_root, f"phema_std{std:.3f}" + (f"_step{step}" if step else ""))


def snapshot_steps(workdir: str, step: int | None) -> list[int]:
  """The snapshot steps up to `step` (default: all); an InputError when there are none."""
  steps = phema_snapshots.saved_steps(workdir)
  if not steps:
    where = phema_snapshots.directory(workdir)
    trained = checkpoint_lib.saved_steps(workdir)
    raise config_flags.InputError(
        f"{workdir} has no post-hoc EMA snapshots ({where} is empty or missing)"
        + (" although it has train checkpoints" if trained else "") + ". Snapshots are "
        "saved only by runs trained with them enabled, from step 1: python -m launch.train "
        f"--config ... --workdir <a fresh workdir> --config.optim.phema.enabled=True "
        "--config.optim.phema.snapshot_every=N (a few hundred snapshots over the run is "
        "EDM2's density).")
  if step is None:
    return steps
  if step not in steps:
    raise config_flags.InputError(f"--step {step} is not a snapshot step of {workdir}; its "
                                  f"snapshots are at steps {steps}.")
  return [s for s in steps if s <= step]


def check_errors(stds, errors, snapshot_t, snapshot_exponent, target_t, max_error: float):
  """An InputError naming the stds the snapshots cannot reconstruct and the range they can."""
  bad = [(s, e) for s, e in zip(stds, errors) if e > max_error]
  if not bad:
    return
  span = posthoc_ema.reconstructible_range(snapshot_t, snapshot_exponent, target_t,
                                           max_error)
  within = (f"stds in [{span[0]:.3f}, {span[1]:.3f}] are reconstructible within "
            f"{max_error:g}" if span else f"no std is reconstructible within {max_error:g}")
  raise config_flags.InputError(
      "cannot reconstruct " + ", ".join(f"--std {s:g} (relative profile error {e:.3f})"
                                        for s, e in bad)
      + f" from {len(set(snapshot_t))} snapshots up to t={target_t}: {within}. Pick stds in "
      "that range, pass a larger --max_error, or (for shorter EMAs) train with a smaller "
      "optim.phema.snapshot_every.")


def load_setup(reader: phema_snapshots.Reader, step: int, workdir: str, devices=None):
  """The run's setup, rebuilt from the config saved with snapshot `step` (on a mesh of
  `devices`, default all)."""
  config = reader.config(step).unlock()
  family = families.get_family(config.family)
  if family.default_config is not None:
    config_flags.fill_missing(config, family.default_config(config))
  return setup_lib.build(config, devices, workdir=workdir)


def reconstruct(workdir: str, stds, step: int | None = None, max_error: float = 0.05,
                devices=None):
  """(setup, step, [params per std], report per std): the EMAs of `stds` at snapshot `step`
  (default: the last), summed snapshot by snapshot on the run's mesh (of `devices`)."""
  steps = snapshot_steps(workdir, step)
  reader = phema_snapshots.Reader(workdir)
  try:
    setup = load_setup(reader, steps[-1], workdir, devices)
    abstract = setup.abstract_state["params"]
    columns = []     # one per stored profile: (snapshot step, index in it, t, std)
    for s in steps:
      t = reader.time(s, abstract, setup.mesh)
      columns += [(s, j, t, std) for j, std in enumerate(reader.stds(s))]
    snap_t = np.array([c[2] for c in columns], np.float64)
    snap_e = posthoc_ema.exponent_of_std([c[3] for c in columns])
    target_t = columns[-1][2]
    x, errors = posthoc_ema.solve_coefficients(
        snap_t, snap_e, np.full(len(stds), target_t), posthoc_ema.exponent_of_std(stds))
    check_errors(stds, errors, snap_t, snap_e, target_t, max_error)
    logging.info("Reconstructing stds %s at step %d (t=%d) from %d snapshots (%d profiles); "
                 "relative profile errors %s", stds, steps[-1], target_t, len(steps),
                 len(columns), np.round(errors, 4).tolist())

    param_sh = setup.state_shardings["params"]
    zeros = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract),
                    out_shardings=param_sh)
    add = jax.jit(posthoc_ema.accumulate, out_shardings=param_sh, donate_argnums=0)
    totals = [zeros() for _ in stds]
    for i, s in enumerate(steps):
      profiles = reader.profiles(s, abstract, setup.mesh)
      for col, (cs, j, _, _) in enumerate(columns):
        if cs == s:
          totals = [add(total, profiles[j], np.float32(x[col, k]))
                    for k, total in enumerate(totals)]
      logging.info("Read snapshot %d/%d (step %d)", i + 1, len(steps), s)
  finally:
    reader.close()
  reports = [{"std": float(std), "exponent": float(posthoc_ema.exponent_of_std(std)),
              "source": workdir, "step": steps[-1], "t": int(target_t),
              "relative_profile_error": float(errors[k]),
              "coefficients": [{"step": s, "std": c_std, "t": int(t),
                                "coefficient": float(x[col, k])}
                               for col, (s, _, t, c_std) in enumerate(columns)]}
             for k, std in enumerate(stds)]
  return setup, steps[-1], totals, reports


def output_setup(setup):
  """The setup of the written workdirs: the run's, with post-hoc EMA off (so no profiles in
  the optimizer state), on the same devices."""
  config = config_flags.config_from_json(config_flags.config_to_json(setup.config)).unlock()
  config.optim.phema.enabled = False
  return setup_lib.build(config, devices=setup.mesh.devices.flatten().tolist(),
                         workdir=setup.workdir)


def write_workdir(out_setup, step: int, params, out: str, report: dict):
  """A workdir whose checkpoint at `step` holds `params` as ema and params, a fresh
  optimizer state (of `params`, not a random init: only the optimizer is compiled) and
  `out_setup`'s config; phema.json beside it."""
  replicated = mesh_lib.replicated(out_setup.mesh)
  opt_init = setup_lib.cached_jit(out_setup, "phema_opt_init", out_setup.tx.init,
                                  out_shardings=out_setup.state_shardings["opt_state"])
  rng = jax.random.key_data(jax.random.key(out_setup.config.seed))
  state = {"step": jax.device_put(np.int32(step), replicated), "params": params,
           "opt_state": opt_init(params), "ema": params, "rng": jax.device_put(rng, replicated)}
  ckpt = checkpoint_lib.Checkpointer(out, save_every=1, keep=1)
  try:
    ckpt.save(step, state, config=out_setup.config, force=True)
  finally:
    ckpt.close()
  if distributed.is_main_process():
    fs.write_atomic(fs.join(out, "phema.json"), json.dumps(report, indent=1) + "\n")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  metric_writer.setup_logging()
  workdir = _WORKDIR.value
  stds = parse_stds(_STD.value)
  snapshot_steps(workdir, _STEP.value)    # input errors before any work
  outs = [output_dir(_OUT_ROOT.value or workdir, s, _STEP.value) for s in stds]
  for out in outs:
    if checkpoint_lib.saved_steps(out) and not _OVERWRITE.value:
      raise config_flags.InputError(f"{out} already holds a reconstruction; pass "
                                    "--overwrite to replace it, or --out_root elsewhere.")
  distributed.initialize()
  setup, step, totals, reports = reconstruct(workdir, stds, _STEP.value, _MAX_ERROR.value)
  out_setup = output_setup(setup)
  for out, params, report in zip(outs, totals, reports):
    if checkpoint_lib.saved_steps(out):     # --overwrite
      if distributed.is_main_process():
        (fs.path(out) / "checkpoints").rmtree()
      multihost_utils.sync_global_devices(f"phema: cleared {out}")
    write_workdir(out_setup, step, params, out, report)
    logging.info("std %.3f (exponent %.2f, profile error %.4f) -> %s", report["std"],
                 report["exponent"], report["relative_profile_error"], out)
    print(json.dumps({k: report[k] for k in ("std", "exponent", "step",
                                             "relative_profile_error")} | {"workdir": out}))


def run():
  config_flags.run_main(main, checkpoint_lib.CheckpointError)


if __name__ == "__main__":
  run()
