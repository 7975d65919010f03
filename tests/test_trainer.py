"""The one train step gives the same result on 1 device and on 8 under every sharding preset,
and gradient accumulation equals one big batch."""

import jax
import numpy as np
import pytest

from launch import config_flags
from tests import runtime_helpers as h

CONFIG = "configs/vdm/digits.py:runlocal"


def _config(*overrides):
  return config_flags.load_config(CONFIG, list(overrides))


@pytest.fixture(scope="module")
def single_device():
  return h.one_train_step(_config("mesh.ici=(1, 1, 1)"), jax.devices()[:1])


@pytest.mark.parametrize("rules,ici", [("data_parallel", "(8, 1, 1)"), ("fsdp", "(2, 4, 1)"),
                                       ("tensor", "(2, 1, 4)")])
def test_one_step_on_8_devices_equals_1_device(single_device, rules, ici):
  params_1, metrics_1 = single_device
  params_8, metrics_8 = h.one_train_step(_config(f"mesh.ici={ici}", f"mesh.rules={rules}"),
                                  jax.devices())
  np.testing.assert_allclose(metrics_8["loss"], metrics_1["loss"], rtol=1e-5)
  leaves_1, leaves_8 = jax.tree.leaves(params_1), jax.tree.leaves(params_8)
  assert len(leaves_1) == len(leaves_8) > 10
  for a, b in zip(leaves_1, leaves_8):
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6)


def test_gradient_accumulation_matches_a_single_batch():
  """With a fixed schedule, grad_accum=2 over the batch equals one batch of the same examples,
  up to the order of the (t, eps) draws; compare gradients through identical draws instead:
  accumulated grads of two halves equal the mean of the halves' grads computed separately."""
  import jax.numpy as jnp
  from launch import train_state
  calls = []

  def fake_loss_and_grads(params, batch, rng):
    del rng
    x = batch["image"].astype(jnp.float32)
    loss = jnp.mean(x) * params["w"]
    calls.append(batch["image"].shape)
    return loss, {"loss": loss}, {"w": jnp.mean(x)}

  import optax
  tx = optax.sgd(1.0)
  params = {"w": jnp.array(2.0)}
  state = train_state.init_state(params, tx, 0)
  batch = {"image": jnp.arange(8.0).reshape(8, 1)}
  step = train_state.make_train_step(fake_loss_and_grads, tx, ema_decay=0.0, grad_accum=2)
  new, metrics = step(state, batch)
  # Micro-batches are examples (0,2,4,6) and (1,3,5,7): means 3 and 4, average 3.5 = mean(x).
  np.testing.assert_allclose(new["params"]["w"], 2.0 - 3.5)
  np.testing.assert_allclose(metrics["loss"], 3.5 * 2.0)
  assert calls[-1] == (4, 1)
  with pytest.raises(ValueError, match="grad_accum"):
    train_state.make_train_step(fake_loss_and_grads, tx, ema_decay=0.0, grad_accum=3)(state, batch)
