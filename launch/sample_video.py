r"""Text-to-video with a trained video stage: clips for prompts, as GIF, MP4 and a PNG strip.

  python -m launch.sample_video --workdir runs/video \
      --prompts "the digit 3 moving left,a 7 bouncing around" --num_per_prompt 4 \
      [--steps 64] [--guidance 1.0] [--sampler ddim] [--fps 8] [--out DIR [--overwrite]]
      [--extend_to 24 [--num_known 4] [--w_r 2.0]]
      [--guidance_interval LO,HI | sigma:LO,HI | none] [--guide_workdir W2] [--guide_step N]

The stage's saved config rebuilds it (EMA params of the latest checkpoint, or --step); the
prompts are encoded by the text encoder its config names (data.t5, the one its text cache
was made with). The batch of prompts x num_per_prompt clips is sharded over the mesh's data
axes, so this samples the same clips on one device and on a pod slice. Written to --out
(default WORKDIR/videos, numbered when taken): videos.gif and videos.mp4 (one row per
prompt, the clips of a prompt side by side, playing in step), videos.png (one row per clip,
its frames left to right) and prompts.txt.

Guidance (vdm/guidance.py): classifier-free on the text at --guidance; with --guide_workdir
and/or --guide_step, autoguidance at that weight instead (Karras et al. 2024): the EMA model of
a weaker video stage of the same shape (its latest checkpoint or --guide_step), or of an
earlier checkpoint of this stage (--guide_step alone). --guidance_interval restricts either
to a logsnr interval (Kynkaanniemi et al. 2024; default config.eval.guidance_interval).
The extension below keeps classifier-free guidance, everywhere.

--extend_to N continues each clip autoregressively to N frames (beyond the length the stage
was trained on) by reconstruction guidance (Ho et al. 2022, sec. 3.1, eq. 7): every round
samples a window of the stage's clip length whose first --num_known frames are the last
frames so far, guided toward them with weight --w_r (0: the replacement method, which the
paper shows loses coherence), and keeps its new frames; written as extended.gif/.mp4/.png.
"""

import numpy as np
from absl import flags

from launch import cascade, distributed
from launch import checkpoint as checkpoint_lib
from launch import config_flags, fs, metric_writer, videos
from launch import workdir as workdir_lib
from vdm import losses, samplers

_WORKDIR = flags.DEFINE_string("workdir", None, "A video stage's training workdir.",
                               required=True)
_PROMPTS = flags.DEFINE_list("prompts", None, "Comma-separated prompts.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
_NUM = flags.DEFINE_integer("num_per_prompt", 4, "Clips per prompt.")
_STEPS = flags.DEFINE_integer("steps", 64, "Sampling steps (network evaluations).")
_GUIDANCE = flags.DEFINE_float("guidance", 1.0, "Guidance weight w (guided = (1 + w) cond "
                               "- w uncond; 0 = conditional).")
_SAMPLER = flags.DEFINE_enum("sampler", "ddim", samplers.SAMPLERS, "Sampler.")
_THRESHOLD = flags.DEFINE_enum("threshold", "dynamic", ["dynamic", "static", "none"],
                               "x-hat thresholding.")
_INTERVAL = flags.DEFINE_string("guidance_interval", None, "Guide only where logsnr is in "
                                "lo,hi (sigma:lo,hi in EDM's sigma; none: everywhere). "
                                "Default: config.eval.guidance_interval.")
_GUIDE_WORKDIR = flags.DEFINE_string("guide_workdir", None, "Autoguidance: the workdir of a "
                                     "weaker video stage of the same shape.")
_GUIDE_STEP = flags.DEFINE_integer("guide_step", None, "Autoguidance: the guide's checkpoint "
                                   "step (alone: an earlier checkpoint of --workdir).")
_FPS = flags.DEFINE_integer("fps", 8, "Frame rate of the GIF and MP4 files.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/videos).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the files in an existing --out.")
_EXTEND_TO = flags.DEFINE_integer("extend_to", 0, "Extend every clip to this many frames "
                                  "(0: no extension).")
_NUM_KNOWN = flags.DEFINE_integer("num_known", None, "Frames each extension window is "
                                  "conditioned on (default: half the clip length).")
_W_R = flags.DEFINE_float("w_r", 2.0, "Reconstruction guidance weight of the extension.")
flags.register_validator("num_per_prompt", lambda n: n >= 1, "--num_per_prompt is the "
                         "number of clips per prompt: pass a positive number, e.g. 4.")
flags.register_validator("steps", lambda n: n >= 1, "--steps is the number of sampling "
                         "steps: pass a positive number, e.g. --steps 64.")
flags.register_validator("fps", lambda n: n >= 1, "--fps is the frame rate of the files: "
                         "pass a positive whole number, e.g. --fps 8.")
flags.register_multi_flags_validator(
    ["extend_to", "sampler"],
    lambda f: not f["extend_to"] or f["sampler"] in samplers.STEP_SAMPLERS,
    f"--extend_to extends clips by reconstruction guidance, which steps with "
    f"{samplers.STEP_SAMPLERS}: pass --sampler ddim or ancestral")


def main(argv):
  del argv
  metric_writer.setup_logging()
  prompts = cascade.read_prompts(_PROMPTS.value, _PROMPTS_FILE.value)
  checkpoint_lib.require_checkpoint(_WORKDIR.value)
  interval = workdir_lib.parse_guidance_interval(_INTERVAL.value)
  guide = None
  if _GUIDE_WORKDIR.value or _GUIDE_STEP.value is not None:
    guide = (_GUIDE_WORKDIR.value, _GUIDE_STEP.value)
    checkpoint_lib.require_checkpoint(_GUIDE_WORKDIR.value or _WORKDIR.value, _GUIDE_STEP.value,
                                      flag="--guide_workdir", step_flag="--guide_step")
  out_dir = config_flags.fresh_output(_OUT.value or fs.join(_WORKDIR.value, "videos"),
                                      chosen=_OUT.value is not None,
                                      overwrite=_OVERWRITE.value)
  distributed.initialize()
  cascade.video_stage_config(_WORKDIR.value, "launch.sample_video")   # before any sampling
  result = cascade.run_cascade(
      [_WORKDIR.value], prompts, num_per_prompt=_NUM.value, steps=[_STEPS.value],
      guidance=[_GUIDANCE.value], samplers_=[_SAMPLER.value], aug_levels=[0.0],
      threshold=_THRESHOLD.value, seed=_SEED.value, guidance_intervals=[interval],
      guides=[guide])
  clips = result.images[-1]
  outputs = {"videos": clips}
  if _EXTEND_TO.value:
    outputs["extended"] = extend(result, clips)
  if distributed.is_main_process():
    levels = result.setups[-1].source.num_levels
    for name, x in outputs.items():
      x = np.asarray(losses.x_to_int(x, levels))
      for path in videos.write_clips(out_dir, name, x, levels, fps=_FPS.value,
                                     columns=_NUM.value):
        print(path)
    fs.write_atomic(fs.join(out_dir, "prompts.txt"), "\n".join(prompts) + "\n")


def extend(result, clips):
  """The sampled clips extended to --extend_to frames (module docstring)."""
  frames = clips.shape[1]
  num_known = _NUM_KNOWN.value or frames // 2
  if _EXTEND_TO.value <= frames or not 1 <= num_known < frames:
    raise config_flags.InputError(
        f"--extend_to {_EXTEND_TO.value} must exceed the clip length {frames}, and "
        f"--num_known {num_known} must be between 1 and {frames - 1}")
  return cascade.extend_clips(result, clips, total_frames=_EXTEND_TO.value,
                              num_known=num_known, num_steps=_STEPS.value,
                              guidance_w=_GUIDANCE.value, w_r=_W_R.value,
                              sampler=_SAMPLER.value, threshold=_THRESHOLD.value,
                              seed=_SEED.value + 1)


def run():
  config_flags.run_main(main, checkpoint_lib.CheckpointError)


if __name__ == "__main__":
  run()
