r"""Text-to-image (or text-to-video) with a trained cascade: base stage, then each
super-resolution stage.

  python -m launch.sample_cascade --stages runs/imagen_base,runs/imagen_sr \
      --prompts "a handwritten digit seven,the number 3" --num_per_prompt 4 \
      [--steps 64,32] [--guidance 3,0] [--sampler ddim,ddim] [--aug_level 0,0.1] \
      [--guidance_interval '-2.1,2.5;none'] [--guide_workdir 'runs/small_base;none']
      [--guide_step N] [--out runs/cascade [--overwrite]]

Each stage is a training workdir (its saved config rebuilds the model; EMA params). Prompts
are encoded once, with the text encoder named by the base stage's config (data.t5: the same
encoder its text cache was made with), and every stage's images are written as a PNG grid;
a video stage's clips (Imagen Video's base, temporal and spatial SR stages) as an animated
GIF, an MP4 (both a grid of the clips playing in step, at the stage's model.fps when its
config sets one, else 8 fps) and a PNG filmstrip (one row per clip), named
stageI_FxHxW.{gif,mp4,png}. Per-stage options take one value per stage, or one value for all.
--guidance_interval restricts each stage's guidance to a logsnr interval (Kynkaanniemi et al.
2024; vdm/guidance.py): "lo,hi", "sigma:lo,hi" (EDM's sigma) or "none" (everywhere), one
for all stages or one per stage separated by ';'; not given, each stage's
config.eval.guidance_interval applies. --guide_workdir / --guide_step replace a stage's
classifier-free guidance by autoguidance at the same weight (Karras et al. 2024): the EMA
model of a weaker workdir of the same shape, or (--guide_step alone) an earlier checkpoint
of the stage; one for all stages or ';'-separated per stage, "none" for unguided ones.

Earlier outputs are never overwritten silently: without --out, a run whose default folder
(the last stage's workdir/cascade) already holds images writes to cascade_1, cascade_2, ...
(each run's images are kept, since the user named no place for them); an --out folder that
holds files is refused unless --overwrite (the user chose that folder, so writing
elsewhere would surprise them, and replacing its files would lose the earlier run).
"""


from absl import flags

from launch import cascade, distributed
from launch import checkpoint as checkpoint_lib
from launch import config_flags, fs
from launch import metric_writer

_STAGES = flags.DEFINE_list("stages", None, "Stage workdirs, base first.", required=True)
_PROMPTS = flags.DEFINE_list("prompts", None, "Comma-separated prompts.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
_NUM = flags.DEFINE_integer("num_per_prompt", 4, "Images per prompt.")
_STEPS = flags.DEFINE_list("steps", ["64"], "Sampling steps per stage.")
_GUIDANCE = flags.DEFINE_list("guidance", ["1.0"], "Guidance weight w per stage "
                              "(guided = (1 + w) cond - w uncond; 0 = conditional).")
_SAMPLER = flags.DEFINE_list("sampler", ["ddim"], "One of vdm.samplers.SAMPLERS (ddim, "
                             "ancestral, heun, dpmpp_2m, pc) per stage.")
_AUG = flags.DEFINE_list("aug_level", ["0.0"], "Noise-augmentation level t_aug of the "
                         "low-resolution input, per SR stage (the base ignores it).")
_INTERVAL = flags.DEFINE_string("guidance_interval", None, "Guide only where logsnr is in "
                                "lo,hi (sigma:lo,hi in EDM's sigma; none: everywhere), one "
                                "for all stages or ';'-separated per stage. Default: each "
                                "stage's config.eval.guidance_interval.")
_GUIDE_WORKDIR = flags.DEFINE_string("guide_workdir", None, "Autoguidance (Karras et al. "
                                     "2024) instead of classifier-free guidance: a weaker "
                                     "model of the stage's shape, one for all stages or "
                                     "';'-separated per stage (none: no guide).")
_GUIDE_STEP = flags.DEFINE_string("guide_step", None, "Autoguidance: the guide's checkpoint "
                                  "step, one or ';'-separated per stage (alone: an earlier "
                                  "checkpoint of the stage itself).")
_THRESHOLD = flags.DEFINE_enum("threshold", "dynamic", ["dynamic", "static", "none"],
                               "x-hat thresholding.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: the last stage's "
                           "workdir/cascade).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the files in an existing --out.")
flags.register_validator("num_per_prompt", lambda n: n >= 1, "--num_per_prompt is the number "
                         "of images per prompt: pass a positive number, e.g. --num_per_prompt 4.")
flags.register_validator("prompts", lambda p: p is None or all(x.strip() for x in p),
                         "--prompts has an empty prompt (prompts are separated by commas): "
                         "remove the stray comma, e.g. --prompts 'a digit seven,the number 3'.")
flags.register_validator("stages", lambda s: s is None or all(x.strip() for x in s),
                         "--stages has an empty workdir (workdirs are separated by commas): "
                         "remove the stray comma, e.g. --stages runs/base,runs/sr.")
flags.register_validator("steps", lambda v: all(x.isdigit() and int(x) >= 1 for x in v),
                         "--steps takes positive whole numbers, one per stage or one for all, "
                         "e.g. --steps 64,32.")
flags.register_multi_flags_validator(
    ["prompts", "prompts_file"], lambda f: not (f["prompts"] and f["prompts_file"]),
    "pass either --prompts or --prompts_file, not both.")


def main(argv):
  del argv
  metric_writer.setup_logging()
  stages = _STAGES.value
  prompts = cascade.read_prompts(_PROMPTS.value, _PROMPTS_FILE.value)
  n = len(stages)
  try:
    options = dict(steps=cascade.per_stage(_STEPS.value, n, "steps", int),
                   guidance=cascade.per_stage(_GUIDANCE.value, n, "guidance", float),
                   samplers_=cascade.per_stage(_SAMPLER.value, n, "sampler", str),
                   aug_levels=cascade.per_stage(_AUG.value, n, "aug_level", float))
  except ValueError as e:   # a count that is neither 1 nor n, or a value that is no number
    raise config_flags.InputError(
        f"{e}. --guidance and --aug_level take numbers, --steps whole numbers; per-stage "
        "flags take one value per stage or one for all.") from None
  intervals = cascade.per_stage_intervals(_INTERVAL.value, n)
  for stage in stages:
    checkpoint_lib.require_checkpoint(stage, flag="--stages entry")
  guides = cascade.per_stage_guides(_GUIDE_WORKDIR.value, _GUIDE_STEP.value, stages)
  out_dir = config_flags.fresh_output(_OUT.value or fs.join(stages[-1], "cascade"),
                                      chosen=_OUT.value is not None,
                                      overwrite=_OVERWRITE.value)
  distributed.initialize()
  outputs, _, setups, *_ = cascade.run_cascade(
      stages, prompts, num_per_prompt=_NUM.value, **options,
      threshold=_THRESHOLD.value, seed=_SEED.value, guidance_intervals=intervals,
      guides=guides)
  if distributed.is_main_process():
    for i, (x, setup) in enumerate(zip(outputs, setups)):
      fps = int(round(setup.config.model.get("fps", 0) or 0)) or 8
      for path in cascade.write_stage(out_dir, i, x, setup.source.num_levels, columns=_NUM.value,
                              fps=fps):
        print(path)
    fs.write_atomic(fs.join(out_dir, "prompts.txt"), "\n".join(prompts) + "\n")


def run():
  config_flags.run_main(main, checkpoint_lib.CheckpointError)


if __name__ == "__main__":
  run()
