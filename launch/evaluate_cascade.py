r"""Prompt alignment and Frechet distance of a digits cascade, swept over the guidance weight.

  python -m launch.evaluate_cascade --stages runs/imagen_base,runs/imagen_sr \
      --guidance 0,1,3 --num_per_digit 20 [--steps 64,64] [--aug_level 0.0]
      [--aug_sweep 0,0.1,0.2,0.4]     # pick the SR augmentation level for sampling
      [--guidance_interval LO,HI | sigma:LO,HI] [--guide_workdir W2] [--guide_step N]

For each w, one prompt per generated image (a caption of digit d in a phrasing the data
uses, d cycling over 0..9) goes through the whole cascade with guidance w at the base stage
(SR stages unguided); the final 8x8 images are scored by a small classifier trained on the
digits train split (evaluation/digits_classifier.py): alignment = share classified as the
prompt's digit (chance 0.1), FD = Frechet distance to the real test digits in the
classifier's features. The base stage's own output is scored too, upsampled to 8x8
(nearest). Results are printed as JSON lines and appended to the last stage's
workdir/cascade_eval.jsonl. The base stage's guidance can be limited to a logsnr interval
(Kynkaanniemi et al. 2024) or be autoguidance by a weaker model of the same shape instead
(Karras et al. 2024): --guide_workdir, or --guide_step alone for an earlier checkpoint.
"""

import json

import numpy as np
from absl import flags

from evaluation import digits_classifier
from launch import checkpoint as checkpoint_lib
from launch import config_flags, distributed, fs
from launch import workdir as workdir_lib
from launch.cascade import per_stage, per_stage_guides, run_cascade
from launch import metric_writer
from launch.data import digits
from vdm import losses

_STAGES = flags.DEFINE_list("stages", None, "Stage workdirs, base first.", required=True)
_GUIDANCE = flags.DEFINE_list("guidance", ["0", "1", "3"], "Base-stage guidance weights.")
_NUM = flags.DEFINE_integer("num_per_digit", 20, "Images per digit and weight.")
_STEPS = flags.DEFINE_list("steps", ["64"], "Sampling steps per stage.")
_AUG = flags.DEFINE_list("aug_level", ["0.0"], "SR augmentation level per stage.")
_AUG_SWEEP = flags.DEFINE_list("aug_sweep", None, "Sweep the SR stages' augmentation level "
                               "over these values (the same level for every SR stage; "
                               "overrides --aug_level), for each guidance weight.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_INTERVAL = flags.DEFINE_string("guidance_interval", None, "Guide the base stage only where "
                                "logsnr is in lo,hi (sigma:lo,hi in EDM's sigma; none: "
                                "everywhere). Default: its config.eval.guidance_interval.")
_GUIDE_WORKDIR = flags.DEFINE_string("guide_workdir", None, "Autoguidance of the base stage: "
                                     "the workdir of a weaker model of the same shape.")
_GUIDE_STEP = flags.DEFINE_string("guide_step", None, "Autoguidance: the guide's checkpoint "
                                  "step (alone: an earlier checkpoint of the base stage).")
flags.register_validator("num_per_digit", lambda n: n >= 1, "--num_per_digit is the number "
                         "of images per digit and weight: pass a positive number, e.g. "
                         "--num_per_digit 20.")


def digit_prompts(num_per_digit: int) -> tuple[list[str], np.ndarray]:
  """Captions of digits 0..9, each phrasing taken as the data's caption rule picks it."""
  labels = np.tile(np.arange(10), num_per_digit)
  return [digits.caption_for(int(d), i) for i, d in enumerate(labels)], labels


def score(x, labels, num_levels: int) -> dict:
  ints = digits_classifier.upsample_to_digits(losses.x_to_int(x, num_levels))
  return digits_classifier.digits_report(ints, labels, num_levels=num_levels)


def main(argv):
  del argv
  metric_writer.setup_logging()
  stages = _STAGES.value
  n = len(stages)
  try:   # per-stage counts and numbers, checked before any stage is loaded
    aug_settings = ([[0.0] + [float(a)] * (n - 1) for a in _AUG_SWEEP.value]
                    if _AUG_SWEEP.value else [per_stage(_AUG.value, n, "aug_level", float)])
    weights = [float(v) for v in _GUIDANCE.value]
    steps = per_stage(_STEPS.value, n, "steps", int)
  except ValueError as e:
    raise config_flags.InputError(
        f"{e}. --guidance, --aug_level and --aug_sweep take numbers, --steps whole numbers; "
        "per-stage flags take one value per stage or one for all.") from None
  for stage in stages:
    checkpoint_lib.require_checkpoint(stage, flag="--stages entry")
  interval = workdir_lib.parse_guidance_interval(_INTERVAL.value)
  guide = (per_stage_guides(_GUIDE_WORKDIR.value, _GUIDE_STEP.value, stages[:1]) or [None])[0]
  distributed.initialize()
  prompts, labels = digit_prompts(_NUM.value)
  results = []
  for w, aug_levels in [(v, a) for v in weights for a in aug_settings]:
    outputs, _, setups, *_ = run_cascade(
        stages, prompts, num_per_prompt=1, steps=steps,
        guidance=[w] + [0.0] * (n - 1), samplers_=["ddim"] * n,
        aug_levels=aug_levels, threshold="dynamic", seed=_SEED.value,
        guidance_intervals=[interval] + [None] * (n - 1), guides=[guide] + [None] * (n - 1))
    levels = setups[0].source.num_levels
    row = {"guidance_w": w, "aug_levels": aug_levels, "num_images": len(prompts),
           "guidance_interval": _INTERVAL.value, "guide_workdir": _GUIDE_WORKDIR.value,
           "guide_step": _GUIDE_STEP.value}
    for i, x in enumerate(outputs):
      for key, value in score(x, labels, levels).items():
        row[f"stage{i}_{key}"] = value
    print(json.dumps(row))
    results.append(row)
  if distributed.is_main_process():
    for row in results:
      fs.append_line(fs.join(stages[-1], "cascade_eval.jsonl"), json.dumps(row))


def run():
  config_flags.run_main(main, checkpoint_lib.CheckpointError)


if __name__ == "__main__":
  run()
