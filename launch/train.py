r"""Train any family from a config file.

  python -m launch.train --config configs/vdm/digits.py --workdir runs/digits \
      [--config.train.num_steps=1000 ...]

Rerunning the same command resumes from the latest checkpoint in --workdir.
"""


from absl import app, flags

from launch import config_flags, trainer
from launch import metric_writer

_CONFIG = config_flags.define_config_flag("config")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics, "
                               "samples); a local path or gs://...", required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  metric_writer.setup_logging()
  trainer.train(_CONFIG.value, _WORKDIR.value)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
