"""gs:// through the one file-system layer (launch/fs.py), against the local GCS emulator.

The whole runs on gs:// live with the tests of what they exercise: train, SIGKILL and
resume (test_resilience.py), a distillation pipeline with teacher and workdir on gs://
(test_distill_pipeline.py), the text-embedding cache (test_captions_cache.py), a prepared
TFDS dataset (test_data.py). Here: the emulator mapping, errors before any work, metrics.
"""

import json
import time

import jax
import pytest

from launch import checkpoint, fs, metric_writer, trainer
from tests import runtime_helpers as h


def test_storage_emulator_host_alone_points_every_client_at_the_emulator():
  env = {"STORAGE_EMULATOR_HOST": "localhost:9999", "FSSPEC_GCS_TOKEN": "mine"}
  set_now = fs.use_emulator_if_set(env)
  assert env["TENSORSTORE_GCS_HTTP_URL"] == "http://localhost:9999"        # orbax arrays
  assert env["CLOUD_STORAGE_EMULATOR_ENDPOINT"] == "http://localhost:9999"  # ArrayRecord
  assert env["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"   # no 60 s gRPC probe
  assert env["FSSPEC_GCS_TOKEN"] == "mine" and "FSSPEC_GCS_TOKEN" not in set_now  # kept
  assert "GOOGLE_AUTH_TOKEN_FOR_TESTING" in env
  assert fs.use_emulator_if_set({}) == {}                      # real GCS: nothing changed


def test_write_atomic_and_local_then_move_on_gcs(gcs_dir):
  fs.write_atomic(fs.join(gcs_dir, "a", "b.json"), '{"x": 1}')
  assert json.loads((fs.path(gcs_dir) / "a" / "b.json").read_text()) == {"x": 1}
  with fs.local_then_move(fs.join(gcs_dir, "c.bin")) as local:
    with open(local, "wb") as f:
      f.write(b"\x00\x01")
  assert (fs.path(gcs_dir) / "c.bin").read_bytes() == b"\x00\x01"
  with pytest.raises(RuntimeError):
    with fs.local_then_move(fs.join(gcs_dir, "d.bin")) as local:
      raise RuntimeError("the writer failed")
  assert not (fs.path(gcs_dir) / "d.bin").exists()   # nothing half-written


def test_missing_bucket_is_one_clear_error_before_any_work(gcs_bucket, tmp_path):
  config = h.load_config("train.num_steps=1")
  with pytest.raises(OSError) as e:
    trainer.train(config, "gs://no-such-bucket-x1/run", devices=jax.devices()[:1])
  message = str(e.value)
  assert "gs://no-such-bucket-x1/run" in message
  assert "gcloud storage buckets create gs://no-such-bucket-x1" in message
  assert "credentials" in message
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(OSError, match="cannot write .*a_file/below.*permissions"):
    fs.require_writable(blocker / "below")                 # the local twin of the error


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_metrics_rows_of_redone_steps_are_dropped_on_resume(where, tmp_path, request):
  workdir = request.getfixturevalue("gcs_dir") if where == "gcs" else str(tmp_path)
  first = metric_writer.MetricWriter(workdir, enabled=True, flush_seconds=0)
  for step in range(1, 6):
    first.write(step, {"loss": step})
  first.close()
  # The run stopped after step 5; its last checkpoint was step 3: steps 4, 5 are redone.
  resumed = metric_writer.MetricWriter(workdir, resume_step=3, enabled=True, flush_seconds=0)
  assert [r["step"] for r in metric_writer.read_metrics(workdir)] == [1, 2, 3]
  for step in (4, 5, 6):
    resumed.write(step, {"loss": 10 * step})
  resumed.close()
  rows = metric_writer.read_metrics(workdir)
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1), (2, 2), (3, 3), (4, 40), (5, 50),
                                                    (6, 60)]


def test_metrics_on_gcs_are_uploaded_on_the_flush_clock(gcs_dir):
  writer = metric_writer.MetricWriter(gcs_dir, enabled=True, flush_seconds=3600)
  writer.write(1, {"loss": 1.0})
  assert metric_writer.read_metrics(gcs_dir) == []         # not yet: GCS has no append
  writer.flush()
  assert [r["step"] for r in metric_writer.read_metrics(gcs_dir)] == [1]
  writer.write(2, {"loss": 2.0})
  writer.close()                                            # close flushes the rest
  assert [r["step"] for r in metric_writer.read_metrics(gcs_dir)] == [1, 2]
  (events,) = list((fs.path(gcs_dir) / "tensorboard").iterdir())   # TensorBoard, on GCS too
  data = events.read_bytes()
  assert events.name.startswith("events.out.tfevents.") and b"loss" in data


def test_a_reader_never_deletes_a_save_in_flight(gcs_dir):
  """On GCS a step still being saved is a folder without commit_success.txt. Evaluation,
  sampling and a distillation teacher open the workdir read-only and leave it alone; only
  the trainer, the one writer, removes such a folder (left by a crashed save)."""
  in_flight = fs.path(gcs_dir) / "checkpoints" / "7" / "state" / "part"
  in_flight.write_text("partial")
  reader = checkpoint.Checkpointer(gcs_dir, save_every=1, keep=5, read_only=True)
  assert reader.all_steps() == []
  with pytest.raises(RuntimeError, match="read-only"):
    reader.save(8, {"x": jax.numpy.zeros(2)}, force=True)
  reader.close()
  time.sleep(2)                 # orbax cleans up in a background thread: give it time
  assert in_flight.exists()
  checkpoint.Checkpointer(gcs_dir, save_every=1, keep=5).close()   # the trainer's
  deadline = time.monotonic() + 30
  while in_flight.exists() and time.monotonic() < deadline:
    time.sleep(0.2)
  assert not in_flight.exists()   # ... which is what a reader must not do
