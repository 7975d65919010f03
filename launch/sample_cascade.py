r"""Text-to-image with a trained cascade: base stage, then each super-resolution stage.

  python -m launch.sample_cascade --stages runs/imagen_base,runs/imagen_sr \
      --prompts "a handwritten digit seven,the number 3" --num_per_prompt 4 \
      [--steps 64,32] [--guidance 3,0] [--sampler ddim,ddim] [--aug_level 0,0.1] \
      [--out runs/cascade]

Each stage is a training workdir (its saved config rebuilds the model; EMA params). Prompts
are encoded once, with the text encoder named by the base stage's config (data.t5: the same
encoder its text cache was made with), and every stage's images are written as a PNG grid.
Per-stage options take one value per stage, or one value for all.
"""

import os

import numpy as np
from absl import app, flags

from launch import cascade, distributed, images
from launch import metric_writer
from vdm import losses

_STAGES = flags.DEFINE_list("stages", None, "Stage workdirs, base first.", required=True)
_PROMPTS = flags.DEFINE_list("prompts", None, "Comma-separated prompts.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
_NUM = flags.DEFINE_integer("num_per_prompt", 4, "Images per prompt.")
_STEPS = flags.DEFINE_list("steps", ["64"], "Sampling steps per stage.")
_GUIDANCE = flags.DEFINE_list("guidance", ["1.0"], "Guidance weight w per stage "
                              "(guided = (1 + w) cond - w uncond; 0 = conditional).")
_SAMPLER = flags.DEFINE_list("sampler", ["ddim"], "ddim or ancestral, per stage.")
_AUG = flags.DEFINE_list("aug_level", ["0.0"], "Noise-augmentation level t_aug of the "
                         "low-resolution input, per SR stage (the base ignores it).")
_THRESHOLD = flags.DEFINE_enum("threshold", "dynamic", ["dynamic", "static", "none"],
                               "x-hat thresholding.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: the last stage's "
                           "workdir/cascade).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def read_prompts() -> list[str]:
  if _PROMPTS_FILE.value:
    with open(_PROMPTS_FILE.value, encoding="utf-8") as f:
      prompts = [line.strip() for line in f if line.strip()]
  else:
    prompts = list(_PROMPTS.value or [])
  if not prompts:
    raise ValueError("no prompts: pass --prompts or --prompts_file")
  return prompts


def main(argv):
  del argv
  metric_writer.setup_logging()
  distributed.initialize()
  stages, prompts = _STAGES.value, read_prompts()
  n = len(stages)
  outputs, _, setups, _, _ = cascade.run_cascade(
      stages, prompts, num_per_prompt=_NUM.value,
      steps=cascade.per_stage(_STEPS.value, n, "steps", int),
      guidance=cascade.per_stage(_GUIDANCE.value, n, "guidance", float),
      samplers_=cascade.per_stage(_SAMPLER.value, n, "sampler", str),
      aug_levels=cascade.per_stage(_AUG.value, n, "aug_level", float),
      threshold=_THRESHOLD.value, seed=_SEED.value)
  out_dir = _OUT.value or os.path.join(stages[-1], "cascade")
  if distributed.is_main_process():
    for i, (x, setup) in enumerate(zip(outputs, setups)):
      levels = setup.source.num_levels
      path = os.path.join(out_dir, f"stage{i}_{x.shape[1]}x{x.shape[2]}.png")
      images.write_grid(path, np.asarray(losses.x_to_int(x, levels)), levels,
                        columns=_NUM.value)
      print(path)
    with open(os.path.join(out_dir, "prompts.txt"), "w", encoding="utf-8") as f:
      f.write("\n".join(prompts) + "\n")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
