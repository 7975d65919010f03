"""The trainer survives what happens to long runs: SIGKILL, SIGTERM, a corrupt checkpoint,
a diverging loss, and a restart on fewer devices.

The training runs are real `python -m launch.train` subprocesses on a tiny config (see
tests/runtime_helpers.py), started together by one module fixture so that they overlap:
only two configs are compiled (the reference and the diverging one); the other runs load
the compiled step from the shared persistent cache.
"""

import os
import re
import shutil
import signal

import jax
import numpy as np
import pytest

from launch import setup as setup_lib
from launch import checkpoint, trainer
from launch.data import pipeline
from tests import runtime_helpers as h

TIMEOUT = 480  # seconds per subprocess wait, on a loaded 2-core machine
# Checkpoints at 3, 6 and 9 (the last one forced at num_steps).
REFERENCE = ("train.num_steps=9", "train.checkpoint_every=3")
# Far more steps than the test waits for, and no interval checkpoint.
LONG = ("train.num_steps=10000", "train.checkpoint_every=1000")
# lr 1e30: the first updates (lr warms up from 0) make the weights ~1e28, after which the
# loss overflows; every step is checkpointed, and all checkpoints are kept.
DIVERGING = ("optim.lr=1e30", "train.num_steps=6", "train.checkpoint_every=1",
             "train.keep_checkpoints=10")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gcs_bucket):
  """Runs every subprocess of this module; returns them (finished) and what was observed.

  reference  9 steps, uninterrupted.
  killed     the same command with a gs:// workdir (the local GCS emulator), SIGKILLed once
             checkpoint 3 is committed; `resumed` then runs the same command again in the
             same workdir, to the end.
  sigterm    LONG; SIGTERM once a training step is logged.
  sigterm_race  LONG; the process SIGTERMs itself right after the trainer's save() at
             step 2 (a not-a-checkpoint step), just before the trainer checks the flag.
  nan_error  DIVERGING with nan_policy=error;  nan_skip: the same with nan_policy=skip.
  """
  root = tmp_path_factory.mktemp("runs")
  started = []

  def start(name, *overrides, log=None, workdir=None, **kwargs):
    run = h.Run(workdir or root / name, *overrides, name=log, log_dir=root / name, **kwargs)
    started.append(run)
    return run

  try:
    # The two configs that need a compile, side by side; each later run starts as soon as
    # the run whose compiled step it reuses has finished.
    reference = start("reference", *REFERENCE)
    nan_error = start("nan_error", *DIVERGING)
    reference.wait(TIMEOUT)
    on_gcs = f"{gcs_bucket}/{root.name}/resumed"
    killed = start("resumed", *REFERENCE, log="killed", workdir=on_gcs)
    sigterm = start("sigterm", *LONG)
    sigterm_race = start("sigterm_race", *LONG, module="tests.runtime_helpers",
                         env=h.train_env(SIGTERM_AFTER_SAVE_AT_STEP=2))

    h.wait_until(lambda: 3 in h.checkpoint_steps(on_gcs), [killed], TIMEOUT,
                 "checkpoint 3 of the run to kill", interval=0.5)
    killed.signal(signal.SIGKILL)
    killed.wait(60)
    at_kill = {"checkpoints": h.checkpoint_steps(on_gcs),
               "logged": sorted(h.train_records(on_gcs))}
    resumed = start("resumed", *REFERENCE, log="resume", workdir=on_gcs)

    h.wait_until(lambda: h.has_train_record(root / "sigterm"), [sigterm], TIMEOUT,
                 "a logged training step")
    sigterm.signal(signal.SIGTERM)

    nan_error.wait(TIMEOUT)
    nan_skip = start("nan_skip", *DIVERGING, "train.nan_policy=skip")
    for run in (resumed, sigterm, sigterm_race, nan_skip):
      run.wait(TIMEOUT)
    yield dict(reference=reference, killed=killed, at_kill=at_kill, resumed=resumed,
               sigterm=sigterm, sigterm_race=sigterm_race, nan_error=nan_error,
               nan_skip=nan_skip)
  finally:
    for run in started:
      run.kill()


@pytest.fixture(scope="module")
def setup_8():
  """The reference config built on the 8 devices of this process."""
  return setup_lib.build(h.load_config(*REFERENCE))


def _ok(run):
  assert run.proc.returncode == 0, run.tail()


def test_sigkill_then_rerun_on_gcs_equals_an_uninterrupted_run(runs, setup_8):
  reference, resumed, at_kill = runs["reference"], runs["resumed"], runs["at_kill"]
  _ok(reference)
  _ok(resumed)
  assert runs["killed"].proc.returncode == -signal.SIGKILL
  # The kill came before the final checkpoint, so the rerun had to train (orbax commits
  # 9 only after 6, and 6 only after 3).
  assert 3 in at_kill["checkpoints"] and 9 not in at_kill["checkpoints"], at_kill
  resumed_from = int(re.search(r"Resumed from step (\d+)", resumed.log()).group(1))
  assert resumed_from in at_kill["checkpoints"] and resumed_from < 9

  # Every step's loss (the last record of a step redone after the kill) and the final
  # train state are bit-identical to the uninterrupted run's.
  ref_records, res_records = h.train_records(reference.workdir), h.train_records(
      resumed.workdir)
  assert sorted(ref_records) == sorted(res_records) == list(range(1, 10))
  # ... each step once in metrics.jsonl: the rerun dropped rows of the steps it redid
  logged = [r["step"] for r in h.metrics(resumed.workdir) if "train/loss" in r]
  assert logged == list(range(1, 10)), logged
  for step in range(1, 10):
    assert res_records[step]["train/loss"] == ref_records[step]["train/loss"], step
  assert h.checkpoint_steps(reference.workdir) == h.checkpoint_steps(resumed.workdir) == [3, 6, 9]
  final_ref = h.host(h.restore(setup_8, reference.workdir))
  final_res = h.host(h.restore(setup_8, resumed.workdir))
  assert int(final_ref["step"]) == int(final_res["step"]) == 9
  h.assert_trees_equal(final_res, final_ref)

  # The data: both runs stopped at the same position of the same stream, namely after
  # exactly 9 batches of a fresh loader (each example seen as often as without the kill).
  config = setup_8.config
  expected = h.fresh_iterator_state(config, 9)
  assert h.iterator_state(resumed.workdir, 9) == h.iterator_state(reference.workdir, 9) \
      == expected
  assert expected["last_seen_indices"]["0"] == 9 * config.train.batch_size - 1


def test_sigterm_saves_the_current_step_and_exits_cleanly(runs, setup_8):
  run = runs["sigterm"]
  _ok(run)
  assert "Preemption requested: saved step" in run.log()
  records = h.train_records(run.workdir)
  last_logged = max(records)
  steps = h.checkpoint_steps(run.workdir)
  assert steps == [last_logged], (steps, last_logged)   # no interval save before 1000
  assert last_logged < 10000
  state = h.restore(setup_8, run.workdir)
  assert int(state["step"]) == last_logged
  assert h.iterator_state(run.workdir, last_logged) == h.fresh_iterator_state(
      setup_8.config, last_logged)


def test_sigterm_between_save_and_the_preemption_check_still_saves(runs, setup_8):
  """The flag is set after save() returned False for step 2; the trainer must not exit
  claiming to have saved step 2 without a checkpoint of it."""
  run = runs["sigterm_race"]
  _ok(run)
  assert "Preemption requested: saved step 2" in run.log()
  assert h.checkpoint_steps(run.workdir) == [2]
  assert sorted(h.train_records(run.workdir)) == [1, 2]
  assert int(h.restore(setup_8, run.workdir)["step"]) == 2


def _flip_a_bit_in_every_data_file(step_dir):
  """One flipped bit in the middle of each file of the state's OCDBT data directories.

  Every file, because a step directory also holds files that a restore does not read (a
  merged copy of the per-process b-tree, superseded nodes): flipping a bit in one of
  those alone changes nothing. The arrays are compressed, so a flip lands in a b-tree
  node (OCDBT checks those) or in compressed chunk data (wrong values, caught by the
  checkpoint's checksums); either way the step must not restore.
  """
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files
  for path in files:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupt_latest_checkpoint_raises_and_earlier_step_restores(runs, setup_8, tmp_path):
  _ok(runs["reference"])
  workdir = tmp_path / "copy"
  shutil.copytree(runs["reference"].workdir, workdir)
  _flip_a_bit_in_every_data_file(workdir / "checkpoints" / "9")
  records_before = h.metrics(workdir)

  previous_handler = signal.getsignal(signal.SIGTERM)
  try:
    with pytest.raises(checkpoint.CheckpointError) as info:
      trainer.train(setup_8.config, str(workdir))
  finally:
    signal.signal(signal.SIGTERM, previous_handler)
  message = str(info.value)
  assert "step 9" in message and str(workdir / "checkpoints" / "9") in message, message
  # Nothing was trained or saved: no silent restart from scratch.
  assert h.checkpoint_steps(workdir) == [3, 6, 9]
  assert [r for r in h.metrics(workdir) if "train/loss" in r] == [
      r for r in records_before if "train/loss" in r]

  state = h.host(h.restore(setup_8, workdir, step=6))
  untouched = h.host(h.restore(setup_8, runs["reference"].workdir, step=6))
  assert int(state["step"]) == 6
  h.assert_trees_equal(state, untouched)


def _all_finite(state):
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def test_nonfinite_loss_stops_with_a_clear_error_and_keeps_checkpoints(runs):
  run = runs["nan_error"]
  assert run.proc.returncode not in (0, None)
  log = run.log()
  match = re.search(r"FloatingPointError: Non-finite loss or gradient at step (\d+).*"
                    r"the latest checkpoint is step (\d+)", log)
  assert match, run.tail()
  assert "nan_policy" in log[match.start():]
  bad, latest = int(match.group(1)), int(match.group(2))
  assert bad >= 2 and latest == bad - 1
  # Every step before the bad one is on disk (the raise waits for the async save) and
  # restores with finite values; the bad step's update is in no checkpoint.
  assert h.checkpoint_steps(run.workdir) == list(range(1, bad))
  setup = setup_lib.build(h.load_config(*DIVERGING))
  for step in range(1, bad):
    state = h.restore(setup, run.workdir, step=step)
    assert int(state["step"]) == step and _all_finite(state), step
  records = h.train_records(run.workdir)
  assert all(records[s]["train/nonfinite"] == 0 for s in range(1, bad))


def test_nan_policy_skip_finishes_without_applying_bad_updates(runs):
  run = runs["nan_skip"]
  _ok(run)
  records = h.train_records(run.workdir)
  assert sorted(records) == list(range(1, 7))
  skipped = [s for s in records if records[s]["train/nonfinite"] == 1]
  assert skipped and skipped[-1] == 6, records   # the run did diverge
  setup = setup_lib.build(h.load_config(*DIVERGING, "train.nan_policy=skip"))
  states = {s: h.host(h.restore(setup, run.workdir, step=s))
            for s in h.checkpoint_steps(run.workdir)}
  assert sorted(states) == list(range(1, 7))
  for s, state in states.items():
    assert int(state["step"]) == s and _all_finite(state), s
    if s in skipped and s - 1 in states:   # a skipped update changes nothing but the step
      h.assert_trees_equal({k: v for k, v in state.items() if k != "step"},
                           {k: v for k, v in states[s - 1].items() if k != "step"})


def test_checkpoint_from_8_devices_restores_and_evaluates_on_4_2_1(runs, setup_8):
  _ok(runs["reference"])
  config = setup_8.config
  source = pipeline.get_source(config.data.name, config.data.eval_split)
  batch = next(iter(pipeline.epoch_iterator(source, global_batch_size=16)))
  rng = jax.random.key(1234)
  params, terms = {}, {}
  for k in (8, 4, 2, 1):
    setup = setup_8 if k == 8 else setup_lib.build(config, devices=jax.devices()[:k])
    state = h.restore(setup, runs["reference"].workdir)
    leaves = jax.tree.leaves(state["params"])
    assert all(len(x.sharding.device_set) == k for x in leaves)
    if k == 8:  # the saved layout really is sharded, so the restore reshards
      assert any(not x.sharding.is_fully_replicated for x in leaves)
    fn = jax.jit(lambda p, b, r, s=setup: s.family.eval_terms(setup_lib.model_with(s, p), b, r,
                                                                config))
    params[k] = h.host(state["params"])
    terms[k] = h.host(fn(state["params"], setup_lib.put_batch(setup, batch), rng))
  # The restored parameters are bit-identical on every mesh. The terms agree to float32
  # rounding: the recon term -log p(x | z_0) is a log-softmax over logits
  # -(z_0 - alpha_0 x_k)^2 / (2 sigma_0^2) with sigma_0^2 = sigmoid(-7.9) ~ 4e-4, so one
  # ulp of z_0 (~1e-7) moves it by ~1e-5 nats, and the per-device shapes change how XLA
  # fuses that arithmetic; 1e-4 nats is 1e-7 of an example's VLB (~700 nats).
  for k in (4, 2, 1):
    h.assert_trees_equal(params[k], params[8])
    assert sorted(terms[k]) == sorted(terms[8])
    for name in terms[8]:
      assert terms[8][name].shape == (16,)
      np.testing.assert_allclose(terms[k][name], terms[8][name], rtol=1e-5, atol=1e-4,
                                 err_msg=f"{name} on {k} devices")
