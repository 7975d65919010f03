r"""Train any family from a config file.

  python -m launch.train --config configs/vdm/digits.py --workdir runs/digits \
      [--config.train.num_steps=1000 ...]

Rerunning the same command resumes from the latest checkpoint in --workdir. Bad input (a
config file that does not exist, a batch size the devices do not divide, a checkpoint that
cannot be restored) stops with one message and exit status 1, before anything is written.
"""


from absl import app, flags

from launch import checkpoint as checkpoint_lib
from launch import config_flags, trainer
from launch import metric_writer
from launch import setup as setup_lib

_CONFIG = config_flags.define_config_flag("config", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics, "
                               "samples); a local path or gs://...", required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  metric_writer.setup_logging()
  setup_lib.check_batch_sizes(_CONFIG.value)
  trainer.train(_CONFIG.value, _WORKDIR.value)


def run():
  config_flags.run_main(main, checkpoint_lib.CheckpointError)


if __name__ == "__main__":
  run()
