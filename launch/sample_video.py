r"""Text-to-video with a trained video stage: clips for prompts, as GIF, MP4 and a PNG strip.

  python -m launch.sample_video --workdir runs/video \
      --prompts "the digit 3 moving left,a 7 bouncing around" --num_per_prompt 4 \
      [--steps 64] [--guidance 1.0] [--sampler ddim] [--fps 8] [--out DIR [--overwrite]]

The stage's saved config rebuilds it (EMA params of the latest checkpoint, or --step); the
prompts are encoded by the text encoder its config names (data.t5, the one its text cache
was made with). The batch of prompts x num_per_prompt clips is sharded over the mesh's data
axes, so this samples the same clips on one device and on a pod slice. Written to --out
(default WORKDIR/videos, numbered when taken): videos.gif and videos.mp4 (one row per
prompt, the clips of a prompt side by side, playing in step), videos.png (one row per clip,
its frames left to right) and prompts.txt.
"""

import numpy as np
from absl import flags

from launch import cascade, distributed
from launch import checkpoint as checkpoint_lib
from launch import config_flags, fs, images, metric_writer, videos
from vdm import losses

_WORKDIR = flags.DEFINE_string("workdir", None, "A video stage's training workdir.",
                               required=True)
_PROMPTS = flags.DEFINE_list("prompts", None, "Comma-separated prompts.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
_NUM = flags.DEFINE_integer("num_per_prompt", 4, "Clips per prompt.")
_STEPS = flags.DEFINE_integer("steps", 64, "Sampling steps (network evaluations).")
_GUIDANCE = flags.DEFINE_float("guidance", 1.0, "Guidance weight w (guided = (1 + w) cond "
                               "- w uncond; 0 = conditional).")
_SAMPLER = flags.DEFINE_enum("sampler", "ddim", ["ddim", "ancestral"], "Sampler.")
_THRESHOLD = flags.DEFINE_enum("threshold", "dynamic", ["dynamic", "static", "none"],
                               "x-hat thresholding.")
_FPS = flags.DEFINE_integer("fps", 8, "Frame rate of the GIF and MP4 files.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/videos).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the files in an existing --out.")
flags.register_validator("num_per_prompt", lambda n: n >= 1, "--num_per_prompt is the "
                         "number of clips per prompt: pass a positive number, e.g. 4.")
flags.register_validator("steps", lambda n: n >= 1, "--steps is the number of sampling "
                         "steps: pass a positive number, e.g. --steps 64.")
flags.register_validator("fps", lambda n: n >= 1, "--fps is the frame rate of the files: "
                         "pass a positive whole number, e.g. --fps 8.")


def main(argv):
  del argv
  metric_writer.setup_logging()
  prompts = cascade.read_prompts(_PROMPTS.value, _PROMPTS_FILE.value)
  checkpoint_lib.require_checkpoint(_WORKDIR.value)
  out_dir = config_flags.fresh_output(_OUT.value or fs.join(_WORKDIR.value, "videos"),
                                      chosen=_OUT.value is not None,
                                      overwrite=_OVERWRITE.value)
  distributed.initialize()
  result = cascade.run_cascade(
      [_WORKDIR.value], prompts, num_per_prompt=_NUM.value, steps=[_STEPS.value],
      guidance=[_GUIDANCE.value], samplers_=[_SAMPLER.value], aug_levels=[0.0],
      threshold=_THRESHOLD.value, seed=_SEED.value)
  clips = result.images[-1]
  if clips.ndim != 5:
    raise config_flags.InputError(f"{_WORKDIR.value} is an image stage (family "
                                  f"{result.configs[-1].family!r}); sample it with "
                                  "python -m launch.sample_cascade --stages ...")
  if distributed.is_main_process():
    levels = result.setups[-1].source.num_levels
    clips = np.asarray(losses.x_to_int(clips, levels))
    written = videos.write_videos(out_dir, "videos", clips, levels, fps=_FPS.value,
                                  columns=_NUM.value)
    strip = videos.filmstrip(clips, levels, scale=videos.default_scale(clips))
    written["png"] = images.write_png(fs.join(out_dir, "videos.png"), strip)
    fs.write_atomic(fs.join(out_dir, "prompts.txt"), "\n".join(prompts) + "\n")
    for path in written.values():
      print(path)


def run():
  config_flags.run_main(main, checkpoint_lib.CheckpointError)


if __name__ == "__main__":
  run()
