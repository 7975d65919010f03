r"""Sample a PNG grid from a trained workdir (EMA params of the latest checkpoint).

  python -m launch.sample --workdir runs/digits --num 100 --steps 200 [--sampler ancestral]
      [--out runs/digits/samples/final.png] [--seed 0]
"""

import os

import jax
from absl import app, flags

from launch import workdir as workdir_lib
from launch import distributed
from launch import metric_writer

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.", required=True)
_NUM = flags.DEFINE_integer("num", 64, "Number of samples.")
_STEPS = flags.DEFINE_integer("steps", 256, "Sampling steps (network evaluations).")
_SAMPLER = flags.DEFINE_enum("sampler", None, ["ddim", "ancestral"],
                             "Sampler (default: config.eval.sampler).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_OUT = flags.DEFINE_string("out", None, "PNG path (default: workdir/samples/sample_*.png).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
  del argv
  metric_writer.setup_logging()
  distributed.initialize()
  setup, state, ckpt = workdir_lib.load_workdir(_WORKDIR.value, _STEP.value,
                                            {"eval.sampler": _SAMPLER.value})
  config = setup.config
  step = int(jax.device_get(state["step"]))
  samples = workdir_lib.sample_images(setup, state["ema"], jax.random.key(_SEED.value),
                                  num=_NUM.value, num_steps=_STEPS.value)
  out = _OUT.value or os.path.join(
      _WORKDIR.value, "samples", f"sample_step{step}_{config.eval.sampler}{_STEPS.value}.png")
  workdir_lib.write_samples(setup, samples, out)
  print(out)
  ckpt.close()


def run():
  app.run(main)


if __name__ == "__main__":
  run()
