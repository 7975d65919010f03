r"""Sample a PNG grid from a trained workdir (EMA params of the latest checkpoint).

  python -m launch.sample --workdir runs/digits --num 100 --steps 200 [--sampler ancestral]
      [--step N] [--out runs/digits/samples/final.png [--overwrite]] [--seed 0]

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
flags.register_validator("num", lambda n: n >= 1, "--num is the number of images to sample: "
                         "pass a positive number, e.g. --num 64.")
flags.register_validator("steps", lambda n: n >= 1, "--steps is the number of sampling "
                         "steps: pass a positive number, e.g. --steps 256.")


def main(argv):
  del argv
  metric_writer.setup_logging()
  checkpoint_lib.require_checkpoint(_WORKDIR.value, _STEP.value)
  if _OUT.value:
    config_flags.fresh_output(_OUT.value, chosen=True, overwrite=_OVERWRITE.value)
  distributed.initialize()
  setup, state, ckpt = workdir_lib.load_workdir(_WORKDIR.value, _STEP.value,
                                            {"eval.sampler": _SAMPLER.value})
  config = setup.config
  step = int(jax.device_get(state["step"]))
  out = _OUT.value or config_flags.fresh_output(fs.join(
      _WORKDIR.value, "samples", f"sample_step{step}_{config.eval.sampler}{_STEPS.value}.png"),
      chosen=False, overwrite=False)
  samples = workdir_lib.sample_images(setup, state["ema"], jax.random.key(_SEED.value),
                                  num=_NUM.value, num_steps=_STEPS.value)
  workdir_lib.write_samples(setup, samples, out)
  print(out)
  ckpt.close()


def run():
  config_flags.run_main(main, checkpoint_lib.CheckpointError)


if __name__ == "__main__":
  run()
