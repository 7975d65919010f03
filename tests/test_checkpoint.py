"""launch/checkpoint.py: resharded restore, keep-N, corruption, crash safety, preemption."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import grain
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from launch.checkpoint import Checkpointer, CheckpointError

REPO = pathlib.Path(__file__).resolve().parents[1]

# After a failed save or restore, orbax leaves coroutines unawaited; they only warn.
pytestmark = [pytest.mark.filterwarnings("ignore:coroutine .* was never awaited"),
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]


def _mesh(shape, names):
  devices = np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape)
  return Mesh(devices, names)


def _expected(step=0):
  """The state as numpy, written independently of any jax sharding."""
  return {
      "params": {
          "w": np.arange(16 * 8, dtype=np.float32).reshape(16, 8) + step,
          "b": np.linspace(-1, 1, 8, dtype=np.float32) * (step + 1),
      },
      "ema": {"w": np.full((16, 8), 0.5 + step, np.float32)},
      "count": np.asarray(step, np.int32),
  }


def _specs(names):
  two_d = P(*names) if len(names) == 2 else P(names[0])
  return {"params": {"w": two_d, "b": P(names[-1])}, "ema": {"w": two_d}, "count": P()}


def _put(tree, mesh, specs):
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)


def _abstract(tree, mesh, specs):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
      tree, specs)


def _assert_equal_tree(restored, expected):
  jax.tree.map(lambda r, e: np.testing.assert_array_equal(np.asarray(r), e), restored,
               expected)


def test_save_on_8_devices_restore_on_4_2_1(tmp_path):
  names = ("data", "fsdp")
  mesh8 = _mesh((4, 2), names)
  expected = _expected(step=3)
  state = _put(expected, mesh8, _specs(names))
  assert len(state["params"]["w"].sharding.device_set) == 8
  ckpt = Checkpointer(tmp_path, save_every=1, keep=3)
  assert ckpt.save(3, state)
  ckpt.wait()

  targets = [((2, 2), names), ((4,), ("data",)), ((2, 1), names), ((2,), ("data",)),
             ((1, 1), names)]
  for shape, target_names in targets:
    mesh = _mesh(shape, target_names)
    specs = _specs(target_names)
    restored, data_state = ckpt.restore(_abstract(expected, mesh, specs))
    assert data_state is None
    _assert_equal_tree(restored, expected)
    for leaf, spec in zip(jax.tree.leaves(restored), jax.tree.leaves(specs)):
      assert leaf.sharding == NamedSharding(mesh, spec), (shape, leaf.sharding)
    # Each device holds exactly its slice of the global array.
    w = restored["params"]["w"]
    assert {d.id for d in w.sharding.device_set} == set(range(int(np.prod(shape))))
    for shard in w.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), expected["params"]["w"][shard.index])
  ckpt.close()


def test_keep_n_latest_step_data_state_and_config(tmp_path):
  mesh = _mesh((8,), ("data",))
  config = ml_collections.ConfigDict({"model": {"mults": (1, 2), "dropout": None},
                                      "tags": ["a", "b"], "lr": 1e-3})
  ckpt = Checkpointer(tmp_path, save_every=5, keep=2)
  assert ckpt.latest_step() is None
  saved = [s for s in range(1, 21)
           if ckpt.save(s, _put(_expected(s), mesh, _specs(("data",))),
                        data_state={"epoch": s // 7, "seen": [s, s + 1]}, config=config)]
  ckpt.wait()
  assert saved == [5, 10, 15, 20]
  assert ckpt.all_steps() == [15, 20]
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
      "15", "20"]
  assert ckpt.latest_step() == 20
  ckpt.close()

  ckpt = Checkpointer(tmp_path, save_every=5, keep=2)  # a fresh process resuming
  assert ckpt.latest_step() == 20
  abstract = _abstract(_expected(), _mesh((2,), ("data",)), _specs(("data",)))
  state, data_state = ckpt.restore(abstract)
  _assert_equal_tree(state, _expected(20))
  assert data_state == {"epoch": 2, "seen": [20, 21]}
  state, data_state = ckpt.restore(abstract, step=15)
  _assert_equal_tree(state, _expected(15))
  assert data_state == {"epoch": 2, "seen": [15, 16]}
  restored_config = ckpt.restore_config()
  assert restored_config.model.mults == (1, 2) and restored_config.tags == ["a", "b"]
  assert restored_config.to_dict() == config.to_dict()
  with pytest.raises(CheckpointError, match=r"step 10 .*available steps: \[15, 20\]"):
    ckpt.restore(abstract, step=10)
  ckpt.close()


def test_grain_iterator_resumes_where_it_stopped(tmp_path):
  dataset = grain.MapDataset.range(30).shuffle(seed=3).to_iter_dataset()
  reference = list(dataset)
  iterator = iter(dataset)
  first = [next(iterator) for _ in range(7)]
  ckpt = Checkpointer(tmp_path, save_every=1, keep=1, async_save=False)
  state = {"x": jnp.zeros((2,))}
  ckpt.save(7, state, data_state=iterator)
  [next(iterator) for _ in range(5)]  # the run goes on past the checkpoint, then dies
  fresh = iter(dataset)
  abstract = _abstract({"x": np.zeros(2, np.float32)}, _mesh((1,), ("data",)), {"x": P()})
  _, resumed = ckpt.restore(abstract, data_iterator=fresh)
  assert resumed is fresh
  assert first + [next(fresh) for _ in range(23)] == reference
  ckpt.close()


def _data_file(step_dir):
  """The largest chunk-data file of the state item (holds the 64x256 array)."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "missing_item", "wrong_shape"])
def test_damaged_checkpoint_raises_and_earlier_step_restores(tmp_path, damage):
  mesh = _mesh((4, 2), ("data", "fsdp"))
  sharding = NamedSharding(mesh, P("data", "fsdp"))
  big = {s: np.random.default_rng(s).normal(size=(64, 256)).astype(np.float32) for s in (10, 20)}
  ckpt = Checkpointer(tmp_path, save_every=10, keep=5)
  for step in (10, 20):
    ckpt.save(step, {"w": jax.device_put(big[step], sharding), "step": jnp.asarray(step)})
  ckpt.close()

  step_dir = tmp_path / "checkpoints" / "20"
  one = NamedSharding(_mesh((1,), ("data",)), P())
  shape = (64, 256)
  if damage == "truncate":
    path = _data_file(step_dir)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  elif damage == "flip_byte":  # one flipped bit that neither OCDBT nor zarr would notice
    path = _data_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
  elif damage == "missing_item":
    (step_dir / "state").rename(step_dir / "state_moved_away")
  elif damage == "wrong_shape":
    shape = (64, 128)
  abstract = {"w": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=one),
              "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=one)}

  ckpt = Checkpointer(tmp_path, save_every=10, keep=5)
  assert ckpt.latest_step() == 20
  with pytest.raises(CheckpointError) as info:
    ckpt.restore(abstract)
  message = str(info.value)
  assert "step 20" in message and str(step_dir) in message and "step=" in message

  if damage != "wrong_shape":
    state, _ = ckpt.restore(abstract, step=10)
    np.testing.assert_array_equal(np.asarray(state["w"]), big[10])
    assert int(state["step"]) == 10
  ckpt.close()


class _FailingIterator:
  """A data iterator whose state cannot be taken: the save fails after it has begun."""

  def get_state(self):
    raise RuntimeError("disk full (simulated)")

  def set_state(self, state):
    raise AssertionError("never restored")


def test_failed_save_leaves_earlier_step_restorable(tmp_path):
  ckpt = Checkpointer(tmp_path, save_every=10, keep=5)
  ckpt.save(10, {"w": jnp.full((4, 4), 10.0)})
  ckpt.wait()
  with pytest.raises(RuntimeError, match="simulated"):
    ckpt.save(20, {"w": jnp.full((4, 4), 20.0)}, data_state=_FailingIterator())
  names = {p.name for p in (tmp_path / "checkpoints").iterdir()}
  assert "20" not in names and any(n.startswith("20.") for n in names), names  # tmp dir only
  ckpt.close()

  ckpt = Checkpointer(tmp_path, save_every=10, keep=5)
  assert ckpt.all_steps() == [10]
  one = NamedSharding(_mesh((1,), ("data",)), P())
  abstract = {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32, sharding=one)}
  np.testing.assert_array_equal(np.asarray(ckpt.restore(abstract)[0]["w"]), np.full((4, 4), 10.0))
  # The retry of the same step succeeds.
  assert ckpt.save(20, {"w": jnp.full((4, 4), 20.0)})
  ckpt.wait()
  np.testing.assert_array_equal(np.asarray(ckpt.restore(abstract)[0]["w"]), np.full((4, 4), 20.0))
  ckpt.close()


_KILLED_CHILD = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {repo!r})
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from launch.checkpoint import Checkpointer

    ckpt = Checkpointer(sys.argv[1], save_every=10, keep=5)
    ckpt.save(10, {{"w": jnp.full((8, 8), 10.0)}})
    ckpt.wait()

    async def killed(self, *args, **kwargs):  # the process dies just before the rename
      os._exit(17)

    atomicity.AtomicRenameTemporaryPath.finalize = killed
    ckpt.save(20, {{"w": jnp.full((8, 8), 20.0)}})
    ckpt.wait()
    os._exit(0)
""")


def test_process_killed_mid_save_leaves_earlier_step(tmp_path):
  script = tmp_path / "child.py"
  script.write_text(_KILLED_CHILD.format(repo=str(REPO)))
  workdir = tmp_path / "run"
  result = subprocess.run([sys.executable, str(script), str(workdir)], capture_output=True,
                          text=True, timeout=180)
  assert result.returncode == 17, result.stderr[-3000:]
  names = {p.name for p in (workdir / "checkpoints").iterdir()}
  assert "10" in names and "20" not in names and any(n.startswith("20.") for n in names), names

  ckpt = Checkpointer(workdir, save_every=10, keep=5)
  assert ckpt.latest_step() == 10
  one = NamedSharding(_mesh((1,), ("data",)), P())
  abstract = {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=one)}
  state, _ = ckpt.restore(abstract)
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((8, 8), 10.0))
  ckpt.close()


def test_sigterm_sets_flag_and_triggers_a_save(tmp_path):
  original = signal.getsignal(signal.SIGTERM)
  ckpt = Checkpointer(tmp_path, save_every=5, keep=2)
  ckpt.install_sigterm_handler()
  assert not ckpt.should_save(7) and not ckpt.preemption_requested(7)
  os.kill(os.getpid(), signal.SIGTERM)
  deadline = time.time() + 5
  while not ckpt.preemption_requested(7) and time.time() < deadline:
    time.sleep(0.01)  # the Python-level handler runs between bytecodes of the main thread
  assert ckpt.preemption_requested(7)
  assert ckpt.should_save(7)  # off the save_every interval, saved because of preemption
  assert ckpt.save(7, {"w": jnp.ones((2,))})
  ckpt.close()
  assert ckpt.all_steps() == [7]
  assert signal.getsignal(signal.SIGTERM) is original


def test_bad_inputs_have_clear_errors(tmp_path):
  ckpt = Checkpointer(tmp_path, save_every=1, keep=1)
  with pytest.raises(TypeError, match=r"\['step'\].*jnp.asarray"):
    ckpt.save(1, {"w": jnp.ones((2,)), "step": np.int32(1)})
  with pytest.raises(CheckpointError, match="No checkpoint"):
    ckpt.restore({"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
  ckpt.save(1, {"w": jnp.ones((2,))})
  ckpt.wait()
  with pytest.raises(ValueError, match="no sharding"):
    ckpt.restore({"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
  with pytest.raises(ValueError, match="save_every"):
    Checkpointer(tmp_path, save_every=0, keep=1)
  ckpt.close()


def test_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
  """`--workdir runs/x` (relative, as in the README) must work: orbax needs absolute paths."""
  monkeypatch.chdir(tmp_path)
  state = {"w": jnp.arange(4.0)}
  with Checkpointer("runs/rel", save_every=1, keep=2, async_save=True) as ckpt:
    ckpt.save(1, state, force=True)
  with Checkpointer("runs/rel", save_every=1, keep=2) as ckpt:
    assert ckpt.latest_step() == 1
    abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32,
                                          sharding=jax.sharding.SingleDeviceSharding(
                                              jax.devices()[0]))}
    restored, _ = ckpt.restore(abstract)
  np.testing.assert_array_equal(restored["w"], np.arange(4.0))
  assert (tmp_path / "runs" / "rel" / "checkpoints" / "1").is_dir()
