r"""Distil a trained teacher, stage by stage, into a student that samples in a few steps.

  python -m launch.distill --teacher runs/digits --config configs/distill/digits.py \
      --workdir runs/digits_distill [--config.distill.end_steps=4 ...]

Stages (progressive distillation, Salimans & Ho 2022; guided distillation, Meng et al. 2023):

  stage00_guided   only with distill.guided: the w-conditioned student of the guided teacher
  stageKK_nN       a student sampling in N steps, trained against the previous stage's
                   student (the teacher for the first) sampling in 2N; N runs from
                   start_steps / 2 down to end_steps

Each stage is an ordinary training run of the "distill" family in its own subdirectory
(checkpoints, metrics.jsonl, TensorBoard), started from a copy of its teacher's weights
(a step-0 checkpoint written before training). Running the same command again skips the
stages whose summary exists and resumes the first unfinished one at its latest checkpoint.
After each stage `summary.json` records the step count, sample quality (for the digits: the
Frechet distance in a small classifier's features and, for conditional models, the class
accuracy; evaluation/digits_classifier.py), the same measure for the original teacher
sampled with the same number of DDIM steps (other data: FID, given distill.fid_weights),
the stage's training time, and a PNG grid of samples;
`WORKDIR/summary.jsonl` and the printed table gather all stages.
"""

import json

from absl import app, flags

from launch import checkpoint as checkpoint_lib
from launch import config_flags, distill_pipeline, distributed, fs, metric_writer
from launch import setup as setup_lib

_CONFIG = config_flags.define_config_flag("config", required=True)
_TEACHER = flags.DEFINE_string("teacher", None, "The teacher's training workdir.",
                               required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: TEACHER/distill).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  metric_writer.setup_logging()
  check_inputs(_CONFIG.value, _TEACHER.value)
  distributed.initialize()
  workdir = fs.join(_WORKDIR.value or fs.join(_TEACHER.value, "distill"))  # local or gs://
  distill_pipeline.run_pipeline(_CONFIG.value, _TEACHER.value, workdir)
  summary = (fs.path(workdir) / "summary.jsonl").read_text(encoding="utf-8")
  print(distill_pipeline.table([json.loads(line) for line in summary.splitlines()]))


def check_inputs(dcfg, teacher: str):
  """Bad input as one clear error before anything is written: a teacher without the
  checkpoint to distil, a batch size the devices do not divide."""
  step = dcfg.distill.teacher_step or None
  checkpoint_lib.require_checkpoint(teacher, step, flag="--teacher",
                                    step_flag="--config.distill.teacher_step")
  ckpt = checkpoint_lib.Checkpointer(teacher, save_every=1, keep=1_000_000, read_only=True)
  teacher_config = ckpt.restore_config(step)
  ckpt.close()
  try:
    first = distill_pipeline.plan(dcfg.distill)[0]
  except ValueError as e:   # start_steps / end_steps that do not halve down
    raise config_flags.InputError(str(e)) from None
  setup_lib.check_batch_sizes(
      distill_pipeline.stage_config(teacher_config, dcfg, first, teacher, teacher))


def run():
  config_flags.run_main(main, checkpoint_lib.CheckpointError)


if __name__ == "__main__":
  run()
