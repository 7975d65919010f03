"""The `launch.distill` pipeline on the digits runlocal teacher: stages, the student's start
from its teacher, per-stage summaries, and resuming a stage after a crash.

The teacher is trained into gs:// (the local GCS emulator) and the pipeline test distills it
into a gs:// workdir, as on a pod; tests that edit a teacher checkpoint download a copy."""

import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import PIL.Image
import pytest
from flax import nnx

from configs.distill import digits as distill_digits
from configs.distill import digits_teacher
from distill import experiment
from launch import checkpoint as checkpoint_lib
from launch import distill_pipeline, families, fs, metric_writer, trainer
from launch import setup as setup_lib
from launch import workdir as workdir_lib
from tests import runtime_helpers as h


def _plan(start, end, guided=False):
  d = distill_digits.get_config().distill
  d.update(dict(start_steps=start, end_steps=end, guided=guided))
  return [(s["dir"], s["kind"], s["steps"]) for s in distill_pipeline.plan(d)]


def test_plan_halves_the_steps_stage_by_stage():
  assert _plan(64, 4) == [("stage00_n32", "progressive", 32), ("stage01_n16", "progressive", 16),
                          ("stage02_n8", "progressive", 8), ("stage03_n4", "progressive", 4)]
  assert _plan(4, 1, guided=True) == [("stage00_guided", "guided", 4),
                                      ("stage01_n2", "progressive", 2),
                                      ("stage02_n1", "progressive", 1)]
  for start, end in [(6, 1), (4, 4), (4, 0)]:
    with pytest.raises(ValueError, match="power of two"):
      _plan(start, end)


def test_missing_fid_weights_fail_before_any_training(tmp_path):
  dcfg = distill_digits.get_config("runlocal")
  dcfg.distill.fid_weights = str(tmp_path / "inception_fid.safetensors")
  with pytest.raises(FileNotFoundError, match="inception_fid.safetensors"):
    distill_pipeline.run_pipeline(dcfg, str(tmp_path / "no_teacher"), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")
  with pytest.raises(FileNotFoundError, match="train the teacher first"):
    distill_pipeline.run_pipeline(distill_digits.get_config("runlocal"), str(tmp_path / "no_teacher"),
                         str(tmp_path / "out"))


@pytest.fixture(scope="module")
def teacher(gcs_bucket, tmp_path_factory):
  workdir = f"{gcs_bucket}/{tmp_path_factory.mktemp('teacher').name}"
  config = digits_teacher.get_config("runlocal")     # v-parameterization
  config.train.update(dict(eval_every=0, sample_every=0, num_steps=4, checkpoint_every=4))
  trainer.train(config, workdir, devices=jax.devices()[:1])
  return workdir


def _download(remote, local):
  """Copies a gs:// folder to a local one, file by file."""
  for item in fs.path(remote).iterdir():
    if item.is_dir():
      _download(item, os.path.join(local, item.name))
    else:
      os.makedirs(local, exist_ok=True)
      with open(os.path.join(local, item.name), "wb") as f:
        f.write(item.read_bytes())


def _params(workdir, step):
  setup, state, ckpt = workdir_lib.load_workdir(workdir, step, devices=jax.devices()[:1],
                                            with_frozen=False)
  ckpt.close()
  return jax.tree.map(np.asarray, nnx.to_pure_dict(state["params"]))


def test_pipeline_runs_stages_and_resumes_a_crashed_stage(teacher, gcs_dir, monkeypatch):
  dcfg = distill_digits.get_config("runlocal")
  dcfg.distill.update(dict(start_steps=4, end_steps=1, train_steps=6))
  dcfg.train.update(dict(log_every=1, checkpoint_every=4, keep_checkpoints=100))  # saves 4, 6
  workdir = gcs_dir                                   # teacher and students on gs://
  devices = jax.devices()[:1]

  # 1. a crash right after stage01 saved step 4 (of 6)
  original_save = checkpoint_lib.Checkpointer.save

  def crashing_save(self, step, *args, **kwargs):
    out = original_save(self, step, *args, **kwargs)
    if str(self.directory).find("stage01_n1") >= 0 and step == 4:
      raise KeyboardInterrupt("simulated kill in stage01 at step 4")
    return out

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "save", crashing_save)
  with pytest.raises(KeyboardInterrupt):
    distill_pipeline.run_pipeline(dcfg, teacher, workdir, devices)
  monkeypatch.setattr(checkpoint_lib.Checkpointer, "save", original_save)
  stage0, stage1 = fs.join(workdir, "stage00_n2"), fs.join(workdir, "stage01_n1")
  assert (fs.path(stage0) / "summary.json").exists()
  assert not (fs.path(stage1) / "summary.json").exists()
  summary0 = json.loads((fs.path(stage0) / "summary.json").read_text())

  # 2. the same command again: stage00 is skipped, stage01 continues from step 4
  rows = distill_pipeline.run_pipeline(dcfg, teacher, workdir, devices)
  assert [r["stage"] for r in rows] == ["stage00_n2", "stage01_n1"]
  assert rows[0] == summary0
  assert [r["student_steps"] for r in rows] == [2, 1] and all(r["train_steps"] == 6 for r in rows)
  steps = [r["step"] for r in metric_writer.read_metrics(stage1) if "train/loss" in r]
  assert steps == [1, 2, 3, 4, 5, 6], steps        # no step trained twice, none skipped

  # 3. each student started as a copy of its teacher (step 0 = the teacher's EMA weights)
  for student_dir, teacher_dir, teacher_step in [(stage0, teacher, 4), (stage1, stage0, 6)]:
    got = _params(student_dir, 0)
    _, state, ckpt = workdir_lib.load_workdir(teacher_dir, teacher_step,
                                              devices=devices, with_frozen=False)
    ckpt.close()
    want = jax.tree.map(np.asarray, nnx.to_pure_dict(state["ema"]))
    jax.tree.map(np.testing.assert_array_equal, got, want)

  # 4. summaries: quality of the student and of the teacher at the same step count, a grid
  for row in rows:
    assert np.isfinite(row["student_fd"]) and np.isfinite(row["teacher_ddim_fd"])
    image = PIL.Image.open(io.BytesIO(fs.path(row["samples_png"]).read_bytes()))
    assert image.size[0] >= 8 * 4
  lines = [json.loads(line) for line in
           (fs.path(workdir) / "summary.jsonl").read_text().splitlines()]
  assert [r["stage"] for r in lines] == ["teacher", "stage00_n2", "stage01_n1"]
  assert lines[0]["student_steps"] == 4 and np.isfinite(lines[0]["teacher_ddim_fd"])


def test_student_samples_with_one_step_equal_one_ddim_step_of_its_network(teacher):
  """The family's sampler: N=1 is x-hat at t = 1 from z_1 ~ N(0, I), statically clipped."""
  setup, state, ckpt = workdir_lib.load_workdir(teacher, devices=jax.devices()[:1])
  ckpt.close()
  model = setup_lib.model_with(setup, state["ema"])
  config = setup.config.unlock()
  config.distill = dict(kind="progressive", base_family="vdm", sample_w=1.0, sampler="ddim",
                        clip="static")
  config.model.guidance_embedding = False
  batch = {"image": np.zeros((3, 8, 8, 1), np.int32), "label": np.zeros(3, np.int32)}
  rng = jax.random.key(0)
  got = families.get_family("distill").sample(model, rng, batch, config, num_steps=1)
  _, k_sample = jax.random.split(rng)
  z = jax.random.normal(jax.random.split(k_sample)[0], (3, 8, 8, 1))
  x = np.clip(np.asarray(model.denoise(z, model.logsnr(np.ones(3, np.float32))).x), -1, 1)
  want = np.clip(np.floor((x + 1) / 2 * 17), 0, 16)
  assert np.mean(np.asarray(got) == want) > 0.97


def test_bad_teachers_are_clear_errors(teacher, tmp_path):
  dcfg = distill_digits.get_config("runlocal")
  dcfg.distill.guided = True      # the runlocal teacher is unconditional
  with pytest.raises(ValueError, match="guided distillation needs a conditional teacher"):
    distill_pipeline.run_pipeline(dcfg, teacher, str(tmp_path / "out"), jax.devices()[:1])
  dcfg.distill.update(dict(guided=False, start_steps=6))
  with pytest.raises(ValueError, match="power of two"):
    distill_pipeline.run_pipeline(dcfg, teacher, str(tmp_path / "out"), jax.devices()[:1])


def test_an_eps_teacher_is_refused_below_8_steps_before_any_training(teacher, tmp_path):
  """Salimans & Ho sec. 4: an eps-teacher's x-hat blows up as alpha -> 0, so students of
  fewer than 8 steps cannot be distilled from it; the pipeline says so before stage one."""
  eps_teacher = str(tmp_path / "eps_teacher")
  _download(teacher, eps_teacher)
  for meta in (tmp_path / "eps_teacher" / "checkpoints").glob("*/config/metadata"):
    saved = json.loads(meta.read_text())
    assert saved["model"]["parameterization"] == "v"
    saved["model"]["parameterization"] = "eps"
    meta.write_text(json.dumps(saved))
  dcfg = distill_digits.get_config("runlocal")          # 4 -> 2 -> 1 steps
  out = tmp_path / "out"
  with pytest.raises(ValueError, match="predicts eps.*parameterization=v"):
    distill_pipeline.run_pipeline(dcfg, eps_teacher, str(out), jax.devices()[:1])
  assert not out.exists() or not any(out.iterdir())
  dcfg.distill.update(dict(start_steps=64, end_steps=8))   # 32, 16, 8: allowed
  assert [s["steps"] for s in distill_pipeline.plan(dcfg.distill)] == [32, 16, 8]
  for stage in distill_pipeline.plan(dcfg.distill):
    experiment.check_settings(stage["kind"], stage["steps"], "eps")
  experiment.check_settings("progressive", 1, "eps", allow_eps_teacher=True)


def test_a_checkpoint_saved_before_a_config_key_existed_still_loads(teacher, tmp_path):
  """Old workdirs: keys added to the configs later get their defaults when loading."""
  old = str(tmp_path / "old")
  _download(teacher, old)
  (meta,) = [p for p in (tmp_path / "old" / "checkpoints").glob("*/config/metadata")]
  saved = json.loads(meta.read_text())
  del saved["model"]["p_uncond"], saved["eval"]["guidance_w"]
  meta.write_text(json.dumps(saved))
  setup, _, ckpt = workdir_lib.load_workdir(old, devices=jax.devices()[:1], with_frozen=False)
  ckpt.close()
  assert setup.config.model.p_uncond == 0.0 and setup.config.eval.guidance_w == 0.0


def test_evaluate_and_sample_commands_on_a_gcs_workdir(teacher):
  """`launch.evaluate` and `launch.sample` with --workdir gs://... (the emulator), as a pod
  user runs them: the result row lands in gs://.../eval_results.jsonl with the bits/dim an
  in-process evaluation of the same checkpoint gives, the grid in gs://.../samples/."""
  env = h.train_env(8)
  commands = {"evaluate": ["launch.evaluate", "--max_examples", "16"],
              "sample": ["launch.sample", "--num", "4", "--steps", "2"]}
  procs = {k: subprocess.Popen([sys.executable, "-m", *argv, "--workdir", teacher],
                               cwd=h.REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
           for k, argv in commands.items()}
  outputs = {k: p.communicate(timeout=300)[0] for k, p in procs.items()}
  for k, p in procs.items():
    assert p.returncode == 0, outputs[k][-3000:]
  (row,) = [json.loads(line) for line in
            (fs.path(teacher) / "eval_results.jsonl").read_text().splitlines()]
  setup, state, ckpt = workdir_lib.load_workdir(teacher, overrides={"eval.max_examples": 16})
  ckpt.close()
  want = workdir_lib.evaluate_bpd(setup, state["ema"], split=setup.config.data.eval_split,
                                  rng=jax.random.key(setup.config.seed + 2))
  assert row["step"] == 4 and row["num_examples"] == 16
  np.testing.assert_allclose(row["bpd"], want["bpd"], rtol=1e-5)
  png = outputs["sample"].strip().splitlines()[-1]
  assert png.startswith(f"{teacher}/samples/") and png.endswith(".png")
  grid = PIL.Image.open(io.BytesIO(fs.path(png).read_bytes()))
  assert grid.size == ((2 * (8 + 1) + 1) * 8,) * 2   # 2 x 2 cells of 8 px, 1 px gaps, x 8
