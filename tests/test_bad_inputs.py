"""Bad input stops with one clear error (the problem and the fix), a non-zero exit status,
and nothing written or overwritten (issue 12, item 4).

The table runs each command as a user would (`python -m launch....`, in a subprocess, two
at a time), since what is tested is the process: its exit status, that its output is one
message rather than a traceback, and its files. Each row gets its own copies of the
workdirs, snapshotted (names, sizes, mtimes) before and after. The checks behind the
messages (checkpoint look-up, batch divisibility, output naming, config paths, the NaN
message) are also called in-process, where no process is needed to see them.

The workdirs are written here, in-process, without training: the digits runlocal state
from a sharded init, saved as steps 3 and 6 with its config, as the trainer saves them.
"""

import concurrent.futures
import dataclasses
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags

from launch import checkpoint, config_flags, trainer
from launch import setup as setup_lib
from tests import runtime_helpers as h

CONFIG = "configs/vdm/digits.py:runlocal"
DEVICES = 8   # conftest's fake CPU devices; the subprocesses get the same


@dataclasses.dataclass
class Row:
  """A bad command: `argv` after `python -m`, with {good}, {corrupt}, {missing} standing
  for this row's workdirs; every fragment must appear in its output."""
  name: str
  argv: str
  fragments: tuple[str, ...]
  exit_code: int = 1


ROWS = [
    Row("config file missing", "launch.train --config configs/nope.py --workdir {missing}",
        ("config file configs/nope.py does not exist",
         "Pass an existing config file, e.g. --config=configs/vdm/digits.py")),
    Row("batch size the devices do not divide",
        f"launch.train --config {CONFIG} --config.train.batch_size=12 --workdir {{missing}}",
        ("train.batch_size=12 does not split evenly", "8 batch shards", "1 process",
         "multiple of 8", "--config.train.batch_size=8 or --config.train.batch_size=16")),
    Row("corrupt checkpoint on resume", f"launch.train --config {CONFIG} --workdir {{corrupt}}",
        ("Checkpoint step 6 in {corrupt}/checkpoints/6 cannot be restored",
         "delete {corrupt}/checkpoints/6 and rerun the same launch.train command (it goes on "
         "from step 3)", "pass --step 3 to launch.evaluate or launch.sample")),
    Row("sample --num 0", "launch.sample --workdir {good} --num 0",
        ("--num=0", "pass a positive number, e.g. --num 64")),
    Row("sample --num negative", "launch.sample --workdir {good} --num -3",
        ("--num=-3", "pass a positive number, e.g. --num 64")),
    Row("sample at a step that was not saved", "launch.sample --workdir {good} --step 5",
        ("--workdir {good} has no checkpoint for step 5; its steps are [3, 6]",
         "Pass --step with one of them")),
    Row("cascade --num_per_prompt 0",
        "launch.sample_cascade --stages {good} --prompts a --num_per_prompt 0",
        ("--num_per_prompt=0", "pass a positive number, e.g. --num_per_prompt 4")),
    Row("cascade empty prompts", "launch.sample_cascade --stages {good} --prompts=,",
        ("--prompts has an empty prompt", "remove the stray comma")),
    Row("cascade --out holding earlier outputs",
        "launch.sample_cascade --stages {good} --prompts a --out {good}/cascade",
        ("--out {good}/cascade already holds the output of an earlier run",
         "pass a new --out path, or --overwrite to replace it")),
    Row("evaluate a missing workdir", "launch.evaluate --workdir {missing}",
        ("--workdir {missing} has no checkpoint (the folder does not exist): train first",
         "python -m launch.train --config <config file> --workdir {missing}")),
    Row("distil a missing teacher",
        "launch.distill --teacher {missing} --config configs/distill/digits.py:runlocal "
        "--workdir {missing}_distill",
        ("--teacher {missing} has no checkpoint (the folder does not exist): train first",)),
]


def snapshot(root) -> dict:
  """{relative path: (size, mtime_ns)} of every file under `root`, and {relative path:
  "folder"} of every folder (a folder's own mtime also moves when a file is made and
  removed again, e.g. the trainer's write probe, which leaves nothing behind)."""
  out = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs:
      out[os.path.relpath(os.path.join(folder, name), root)] = "folder"
    for name in files:
      path = os.path.join(folder, name)
      stat = os.stat(path)
      out[os.path.relpath(path, root)] = (stat.st_size, stat.st_mtime_ns)
  return out


def _flip_a_bit_in_every_data_file(step_dir):
  """As tests/test_resilience.py: one flipped bit in each OCDBT data file of the state."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state"))
           for f in fs if os.path.basename(d) == "d"]
  assert files
  for path in files:
    with open(path, "r+b") as f:
      data = bytearray(f.read())
      data[len(data) // 2] ^= 0x01
      f.seek(0)
      f.write(bytes(data))


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  """`good`: steps 3 and 6 of the digits runlocal state with its config, and a cascade
  folder holding an earlier output; `corrupt`: the same with step 6's arrays damaged."""
  root = tmp_path_factory.mktemp("workdirs")
  config = config_flags.load_config(CONFIG)
  setup = setup_lib.build(config)
  state = setup.init()
  good = root / "good"
  with checkpoint.Checkpointer(good, save_every=1, keep=10) as ckpt:
    for step in (3, 6):
      ckpt.save(step, state, config=config)
  (good / "cascade").mkdir()
  (good / "cascade" / "stage0_4x4.png").write_bytes(b"an earlier run's grid")
  shutil.copytree(good, root / "corrupt")
  _flip_a_bit_in_every_data_file(root / "corrupt" / "checkpoints" / "6")
  return root


def _run_row(row: Row, root, workdirs_root):
  """Runs one row in its own copies of the workdirs; returns (process, paths, before,
  after): the snapshots of the row's folder around the command."""
  os.makedirs(root)
  paths = {"missing": str(root / "missing")}
  for name in ("good", "corrupt"):
    shutil.copytree(workdirs_root / name, root / name)
    paths[name] = str(root / name)
  before = snapshot(root)
  argv = [sys.executable, "-m"] + row.argv.format(**paths).split()
  proc = subprocess.run(argv, cwd=h.REPO, env=h.train_env(DEVICES), capture_output=True,
                        text=True, timeout=300, check=False)
  return proc, paths, before, snapshot(root)


@pytest.fixture(scope="module")
def results(workdirs, tmp_path_factory):
  """Every row's command, run two at a time (each spends most of its few seconds importing
  jax), keyed by row name."""
  root = tmp_path_factory.mktemp("rows")
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    futures = {row.name: pool.submit(_run_row, row, root / f"row{i}", workdirs)
               for i, row in enumerate(ROWS)}
    return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_command_gives_one_clear_error_and_writes_nothing(row, results):
  proc, paths, before, after = results[row.name]
  output = proc.stdout + proc.stderr
  shown = f"$ python -m {row.argv.format(**paths)}\n{output[-3000:]}"
  assert proc.returncode == row.exit_code, shown
  for fragment in row.fragments:
    assert fragment.format(**paths) in output, (fragment.format(**paths), shown)
  # One message, not a traceback; no flood of orphaned reads after a failed restore.
  assert "Traceback" not in output and "Event loop is closed" not in output, shown
  assert len(output.splitlines()) <= 12, shown
  assert after == before, (sorted(set(after) ^ set(before)), shown)
  assert not os.path.exists(paths["missing"])


# ------------------------------------------------------------- the checks, in-process


def test_config_path_errors_name_the_file_and_the_flag():
  with pytest.raises(flags.IllegalFlagValueError) as info:
    config_flags.load_config("configs/vdm/digit.py:runlocal")
  message = str(info.value)
  assert "config file configs/vdm/digit.py does not exist" in message
  assert "nearest: configs/vdm/digits.py" in message
  # Any flag made by define_config_flag, e.g. launch.aot's --teacher_config.
  argv = ["aot", "--teacher_config=configs/distill/nope.py"]
  values = flags.FlagValues()
  config_flags.define_config_flag("teacher_config", flag_values=values, sys_argv=argv)
  with pytest.raises(flags.IllegalFlagValueError, match=r"config file configs/distill/nope\.py "
                     r"does not exist.*e\.g\. --teacher_config=configs/"):
    values(argv)
  # Unknown override keys are still an error listing the valid keys.
  with pytest.raises(config_flags.UnknownConfigKeyError, match="model.score_unet.ch"):
    config_flags.load_config(CONFIG, ["model.score_unet.chanels=4"])


def test_batch_sizes_must_divide_over_the_batch_shards_and_processes():
  config = config_flags.load_config(CONFIG, ["train.batch_size=16", "eval.batch_size=64"])
  setup_lib.check_batch_sizes(config)   # 16 and 64 over 8 devices: fine
  three = jax.devices()[:3]
  with pytest.raises(config_flags.InputError) as info:
    setup_lib.check_batch_sizes(config, devices=three)
  assert ("train.batch_size=16 does not split evenly" in str(info.value) and
          "3 batch shards" in str(info.value) and
          "--config.train.batch_size=15 or --config.train.batch_size=18" in str(info.value))
  # The eval batch counts only when training evaluates (runlocal: eval_every=6).
  odd_eval = config_flags.load_config(CONFIG, ["train.batch_size=16", "eval.batch_size=20"])
  with pytest.raises(config_flags.InputError, match=r"eval\.batch_size=20 .* multiple of 8"):
    setup_lib.check_batch_sizes(odd_eval)
  setup_lib.check_batch_sizes(config_flags.load_config(
      CONFIG, ["train.batch_size=16", "eval.batch_size=20", "train.eval_every=0"]))
  # A batch smaller than the shards is refused too, with the smallest size that works.
  with pytest.raises(config_flags.InputError, match=r"--config\.train\.batch_size=8,"):
    setup_lib.check_batch_sizes(config_flags.load_config(CONFIG, ["train.batch_size=4"]))


def test_require_checkpoint_finds_steps_without_creating_anything(workdirs, tmp_path):
  good = str(workdirs / "good")
  assert checkpoint.require_checkpoint(good) == 6
  assert checkpoint.require_checkpoint(good, 3) == 3
  missing = tmp_path / "never_trained"
  with pytest.raises(checkpoint.CheckpointError, match="has no checkpoint .the folder does "
                     "not exist.: train first"):
    checkpoint.require_checkpoint(str(missing), flag="--teacher")
  assert not missing.exists()
  missing.mkdir()   # an empty workdir: no checkpoints folder is made by looking
  with pytest.raises(checkpoint.CheckpointError, match="--teacher .* has no checkpoint: "):
    checkpoint.require_checkpoint(str(missing), flag="--teacher")
  assert list(missing.iterdir()) == []


def test_fresh_output_never_overwrites(tmp_path):
  grid = tmp_path / "sample.png"
  assert config_flags.fresh_output(str(grid), chosen=False, overwrite=False) == str(grid)
  grid.write_bytes(b"1")
  (tmp_path / "sample_1.png").write_bytes(b"2")
  assert config_flags.fresh_output(str(grid), chosen=False, overwrite=False) == str(
      tmp_path / "sample_2.png")
  with pytest.raises(config_flags.InputError, match="--out .*sample.png already holds"):
    config_flags.fresh_output(str(grid), chosen=True, overwrite=False)
  assert config_flags.fresh_output(str(grid), chosen=True, overwrite=True) == str(grid)
  folder = tmp_path / "cascade"
  folder.mkdir()   # empty: free
  assert config_flags.fresh_output(str(folder), chosen=True, overwrite=False) == str(folder)
  (folder / "prompts.txt").write_text("a\n")
  assert config_flags.fresh_output(str(folder), chosen=False, overwrite=False) == str(
      tmp_path / "cascade_1")


def test_nonfinite_message_says_whether_a_checkpoint_exists(workdirs, tmp_path):
  metrics = {"loss": np.float32(np.nan)}
  with checkpoint.Checkpointer(tmp_path / "fresh", save_every=500, keep=2) as ckpt:
    message = str(trainer._nonfinite_error(7, metrics, ckpt))  # pylint: disable=protected-access
  assert "None" not in message
  assert ("no checkpoint has been saved yet (the first is due at step 500), so rerunning the "
          "command trains from scratch") in message
  with checkpoint.Checkpointer(workdirs / "good", save_every=3, keep=10) as ckpt:
    message = str(trainer._nonfinite_error(7, metrics, ckpt))  # pylint: disable=protected-access
  assert "the latest checkpoint is step 6, from which the same command resumes" in message
  assert "--config.optim.lr" in message and "--config.train.nan_policy=skip" in message
