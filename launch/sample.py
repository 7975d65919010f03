r"""Sample a PNG grid from a trained workdir (EMA params of the latest checkpoint).

  python -m launch.sample --workdir runs/digits --num 100 --steps 200 [--sampler ancestral]
      [--step N] [--out runs/digits/samples/final.png [--overwrite]] [--seed 0]
      [--guidance W] [--guidance_interval LO,HI | sigma:LO,HI | none]
      [--guide_workdir W2] [--guide_step N2]

Guidance (vdm/guidance.py; guided = (1 + w) main - w other, w = 0 the plain model):
classifier-free for class-conditional runs at --guidance (default config.eval.guidance_w);
with --guide_workdir and/or --guide_step, autoguidance instead (Karras et al. 2024): the
other prediction is the EMA model of a weaker run of the same family (--guide_workdir, its
latest checkpoint or --guide_step) or of an earlier checkpoint of this run (--guide_step
alone); conditional or not. --guidance_interval restricts either to a logsnr interval
(Kynkaanniemi et al. 2024; default config.eval.guidance_interval, () = everywhere).

Earlier grids are never overwritten silently: the default name gets a number (_1, _2, ...)
when taken, and an --out that exists is refused unless --overwrite.
"""


import jax
from absl import flags

from launch import checkpoint as checkpoint_lib
from launch import config_flags, fs
from launch import workdir as workdir_lib
from launch import distributed
from launch import metric_writer
from vdm import samplers

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.", required=True)
_NUM = flags.DEFINE_integer("num", 64, "Number of samples.")
_STEPS = flags.DEFINE_integer("steps", 256, "Sampling steps (network evaluations).")
_SAMPLER = flags.DEFINE_enum("sampler", None, samplers.SAMPLERS,
                             "Sampler (default: config.eval.sampler).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_OUT = flags.DEFINE_string("out", None, "PNG path (default: workdir/samples/sample_*.png).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out file.")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Guidance weight w (default: "
                               "config.eval.guidance_w): (1 + w) main - w other.")
_INTERVAL = flags.DEFINE_string("guidance_interval", None, "Guide only where logsnr is in "
                                "lo,hi (or sigma:lo,hi in EDM's sigma; none: everywhere). "
                                "Default: config.eval.guidance_interval.")
_GUIDE_WORKDIR = flags.DEFINE_string("guide_workdir", None, "Autoguidance: the workdir of a "
                                     "weaker run of the same family (its EMA model guides).")
_GUIDE_STEP = flags.DEFINE_integer("guide_step", None, "Autoguidance: the guide's checkpoint "
                                   "step (alone: an earlier checkpoint of --workdir).")
flags.register_validator("num", lambda n: n >= 1, "--num is the number of images to sample: "
                         "pass a positive number, e.g. --num 64.")
flags.register_validator("steps", lambda n: n >= 1, "--steps is the number of sampling "
                         "steps: pass a positive number, e.g. --steps 256.")


def main(argv):
  del argv
  metric_writer.setup_logging()
  checkpoint_lib.require_checkpoint(_WORKDIR.value, _STEP.value)
  interval = workdir_lib.parse_guidance_interval(_INTERVAL.value)
  if _GUIDE_WORKDIR.value or _GUIDE_STEP.value is not None:   # before anything is loaded
    checkpoint_lib.require_checkpoint(_GUIDE_WORKDIR.value or _WORKDIR.value, _GUIDE_STEP.value,
                                      flag="--guide_workdir", step_flag="--guide_step")
  if _OUT.value:
    config_flags.fresh_output(_OUT.value, chosen=True, overwrite=_OVERWRITE.value)
  distributed.initialize()
  setup, state, ckpt = workdir_lib.load_workdir(
      _WORKDIR.value, _STEP.value, {"eval.sampler": _SAMPLER.value,
                                    "eval.guidance_w": _GUIDANCE.value,
                                    "eval.guidance_interval": interval})
  guide = None
  if _GUIDE_WORKDIR.value or _GUIDE_STEP.value is not None:
    guide = workdir_lib.load_guide(setup, _WORKDIR.value, _GUIDE_WORKDIR.value,
                                   _GUIDE_STEP.value)
  elif _GUIDANCE.value and _unconditional(setup.config):
    raise config_flags.InputError(
        f"--guidance {_GUIDANCE.value}: {_WORKDIR.value} is an unconditional run, so there is "
        "no conditioning to guide by; pass --guide_workdir / --guide_step for autoguidance")
  config = setup.config
  step = int(jax.device_get(state["step"]))
  out = _OUT.value or config_flags.fresh_output(fs.join(
      _WORKDIR.value, "samples", f"sample_step{step}_{config.eval.sampler}{_STEPS.value}.png"),
      chosen=False, overwrite=False)
  samples = workdir_lib.sample_images(setup, state["ema"], jax.random.key(_SEED.value),
                                  num=_NUM.value, num_steps=_STEPS.value, guide=guide)
  workdir_lib.write_samples(setup, samples, out)
  print(out)
  ckpt.close()


def _unconditional(config) -> bool:
  """A VDM run without classes: classifier-free guidance has nothing to drop."""
  return config.family == "vdm" and not config.model.get("num_classes", 0)


def run():
  config_flags.run_main(main, checkpoint_lib.CheckpointError)


if __name__ == "__main__":
  run()
