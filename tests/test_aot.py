"""`launch.aot`: the real train step compiled for a TPU slice described by libtpu on this
CPU-only machine, its memory checked against the sharded state computed here."""

import importlib.util
import math
import os

import jax
import numpy as np
import pytest

from launch import config_flags

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason='needs libtpu: pip install -e ".[test]" (or ".[tpu]")')


def _tile_padded_elements(shape) -> int:
  """A TPU array's size in its least-padded tiled layout: XLA picks which dimension is
  minor (padded to 128 lanes) and which second-minor (padded to 8 sublanes); a vector is
  padded to 128, a scalar takes one 128-lane row."""
  shape = list(shape)
  if not shape:
    return 128
  if len(shape) == 1:
    return math.ceil(shape[0] / 128) * 128
  best = None
  for i in range(len(shape)):
    for j in range(len(shape)):
      if i != j:
        padded = list(shape)
        padded[i] = math.ceil(shape[i] / 128) * 128
        padded[j] = math.ceil(shape[j] / 8) * 8
        best = math.prod(padded) if best is None else min(best, math.prod(padded))
  return best


def test_fsdp_step_on_v5e_2x2_holds_its_shard_of_the_state_per_chip():
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from launch import aot  # pylint: disable=g-import-not-at-top
  devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
  # FSDP over 4 chips on the dims that stay tile-aligned when split 4 ways (a conv kernel's
  # input channels and the MLP width: 128 / 4 = 32 sublanes), so tile padding is small and
  # the check below is tight; rules may be any (logical name, mesh axis) pairs.
  config = config_flags.load_config("configs/vdm/cifar10.py:runlocal", [
      "model.score_unet.ch=128", "model.score_unet.n_layer=0", "model.schedule.n_features=128",
      "data.name=synthetic:8x8x3", "mesh.ici=(1, 4, 1)"]).unlock()
  with config.ignore_type():
    config.mesh.rules = (("batch", ("data", "fsdp")), ("conv_in", "fsdp"), ("mlp", "fsdp"),
                         ("conv_out", None), ("embed", None), ("heads", None), ("kv", None),
                         ("norm", None), ("vocab", None))
  out = aot.report(config, devices, sample=False)
  assert out["device_kind"] == "TPU v5 lite" and out["mesh"] == {"data": 1, "fsdp": 4,
                                                                 "tensor": 1}
  assert out["hbm_per_device"] == 16 * 2**30

  # What one chip must hold as arguments: its shard of every state leaf and of the batch.
  from launch import setup as setup_lib  # pylint: disable=g-import-not-at-top
  source = aot.metadata_source(config)
  setup = setup_lib.build(config, devices, source=source)
  shards = [(leaf.sharding.shard_shape(leaf.shape), np.dtype(leaf.dtype).itemsize)
            for leaf in jax.tree.leaves(setup.abstract_state)]
  batch = aot.example_batch(config, source, config.train.batch_size)
  shards += [((v.shape[0] // 4,) + v.shape[1:], v.dtype.itemsize) for v in batch.values()]
  exact = sum(math.prod(s) * size for s, size in shards)
  bound = sum(_tile_padded_elements(s) * size for s, size in shards)
  full_state = sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
                   for leaf in jax.tree.leaves(setup.abstract_state))
  assert bound < 1.1 * exact, (exact, bound)   # the check is tight ...
  assert exact < 0.3 * full_state           # ... and fsdp really split the state 4 ways
  arguments = out["train"]["memory"]["arguments"]
  assert exact <= arguments <= bound, (exact, arguments, bound)
  assert out["train"]["state_bytes_per_device"] == sum(
      math.prod(s) * size for s, size in shards[:len(jax.tree.leaves(setup.abstract_state))])
  assert out["train"]["memory"]["total"] >= arguments + out["train"]["memory"]["temporaries"]
  # fsdp gathers parameters and reduce-scatters gradients over the 4 chips
  assert set(out["train"]["collectives"]) & {"all-gather", "reduce-scatter", "all-reduce"}
  assert aot.fits(out)
