"""Restoring weights only (a distillation teacher, a sampler): the EMA parameters of a
checkpoint without its optimizer state, checked against a full restore."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs.vdm import digits
from launch import checkpoint as checkpoint_lib
from launch import setup as setup_lib
from launch import trainer
from launch import workdir as workdir_lib


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("weights_only"))
  config = digits.get_config("runlocal")
  config.train.update(dict(eval_every=0, sample_every=0, num_steps=4, checkpoint_every=4))
  trainer.train(config, workdir, devices=jax.devices()[:1])
  return workdir, config


def test_ema_model_equals_the_ema_of_a_full_restore(trained):
  workdir, _ = trained
  model, config = workdir_lib.load_ema_model(workdir, devices=jax.devices()[:1])
  setup, state, ckpt = workdir_lib.load_workdir(workdir, devices=jax.devices()[:1])
  ckpt.close()
  assert config.family == "vdm" and int(state["step"]) == 4
  got = nnx.state(model, nnx.Param)
  jax.tree.map(np.testing.assert_array_equal, got, state["ema"])
  # and the EMA really differs from the raw parameters after 4 updates
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state["ema"]),
                                                       jax.tree.leaves(state["params"])))


def test_restore_items_reads_only_what_is_asked(trained):
  workdir, config = trained
  setup = setup_lib.build(config, jax.devices()[:1])
  ckpt = checkpoint_lib.Checkpointer(workdir, save_every=1, keep=10)
  out = ckpt.restore_items(setup.abstract_state, ("ema",))
  assert set(out) == {"ema"}
  # A model the checkpoint does not hold (wider network): a clear error, not silent zeros.
  wider = config.copy_and_resolve_references()
  wider.model.score_unet.ch = 16
  other = setup_lib.build(wider, jax.devices()[:1])
  with pytest.raises(checkpoint_lib.CheckpointError, match="cannot be restored"):
    ckpt.restore_items(other.abstract_state, ("ema",))
  ckpt.close()
