"""Preemption of a multi-host run: SIGTERM to one of two JAX processes.

On a pod a preemption notice (or `tpu.sh stop`) arrives as SIGTERM, possibly on one host
only. JAX's preemption service, started by `jax.distributed.initialize` (on by default),
catches it in that process and tells the coordination service; every process then learns,
from `reached_preemption_sync_point(step)`, one common step at which to save: the step
after the largest one any process had reached when the notice spread. The trainer asks at
every step (`Checkpointer.preemption_requested`), saves that step collectively and stops.

Two CPU processes with 4 devices each (the harness of test_multiprocess.py) train the
digits :runlocal model; SIGTERM goes to process 1 only, once training has started. Asserted:

  * both exit 0, and both log the same saved step S, although process 0 got no signal (it
    learned of the preemption through JAX's service only);
  * the workdir holds exactly one checkpoint, step S, later than the step training had
    reached when the signal was sent and earlier than num_steps (the run was cut short);
  * each process saved its own data-iterator state at S, equal to that of a fresh loader
    for its shard after S batches (both stopped after the same step, no batch skipped);
  * the checkpoint restores in another process on 8 devices, with step == S and verified
    checksums.
"""

import re
import signal

import pytest

from launch import setup as setup_lib
from tests import runtime_helpers as h

TIMEOUT = 300
NUM_STEPS = 200  # far more than run before the signal: a missed preemption runs on and fails
OVERRIDES = (f"train.num_steps={NUM_STEPS}", "train.checkpoint_every=1000")


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
  """Two processes training; SIGTERM to process 1 after the first logged step."""
  workdir = tmp_path_factory.mktemp("preempted")
  runs = []
  try:
    # TF_CPP_MIN_LOG_LEVEL=1 (JAX's default): the C++ warning "SIGTERM caught" is logged.
    runs += h.start_processes(workdir, *OVERRIDES, TF_CPP_MIN_LOG_LEVEL=1)
    h.wait_until(lambda: h.has_train_record(workdir), runs, TIMEOUT, "the first train step")
    reached = max(h.train_records(workdir))
    runs[1].signal(signal.SIGTERM)
    codes = [run.wait(TIMEOUT) for run in runs]
    yield {"runs": runs, "codes": codes, "reached": reached, "workdir": workdir}
  finally:
    for run in runs:
      run.kill()


def saved_step(run) -> int:
  found = re.findall(r"Preemption requested: saved step (\d+), exiting", run.log())
  assert len(found) == 1, run.tail()
  return int(found[0])


def test_both_processes_save_the_same_step_and_exit_cleanly(preempted):
  runs = preempted["runs"]
  for run, code in zip(runs, preempted["codes"]):
    assert code == 0, run.tail()
  assert "SIGTERM caught" in runs[1].log() and "SIGTERM caught" not in runs[0].log()
  step = saved_step(runs[0])
  assert saved_step(runs[1]) == step
  assert preempted["reached"] < step < NUM_STEPS
  assert h.checkpoint_steps(preempted["workdir"]) == [step]
  config = h.load_config(*OVERRIDES)
  for p in range(2):
    assert (h.iterator_state(preempted["workdir"], step, p, 2) ==
            h.fresh_iterator_state(config, step, process_index=p, process_count=2))


def test_the_preemption_checkpoint_restores(preempted):
  step = saved_step(preempted["runs"][0])
  setup = setup_lib.build(h.load_config(*OVERRIDES))
  state = h.restore(setup, preempted["workdir"])  # checksums are verified on restore
  assert int(state["step"]) == step
