"""optim.name: AdamW and Adafactor, against their update rules written out here."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from launch import train_state


def _cfg(**kw):
  base = dict(name="adamw", lr=1e-2, warmup_steps=0, decay="constant", b1=0.9, b2=0.99,
              eps=1e-8, weight_decay=0.0, grad_clip=0.0)
  return ml_collections.ConfigDict({**base, **kw})


def _state_bytes(state):
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(state))


def test_adafactor_keeps_factored_second_moments_only():
  params = {"w": jnp.ones((256, 512)), "b": jnp.ones((512,))}
  adam = train_state.make_optimizer(_cfg(), 10).init(params)
  ada = train_state.make_optimizer(_cfg(name="adafactor"), 10).init(params)
  # Adam: two full copies (mu, nu). Adafactor: a row and a column for the matrix, the
  # full vector for the bias (too small to factor), no first moment.
  assert _state_bytes(adam) >= 2 * 4 * (256 * 512 + 512)
  assert _state_bytes(ada) < 4 * (256 + 512 + 512) + 64


def test_adafactor_first_step_is_the_factored_rms_normalised_gradient():
  """Step 1 (decay 1 - 1^-0.8 = 0): v = g^2, factored as r = mean over columns, c = mean over
  rows, v_hat = r c^T / mean(r); update = -lr g / sqrt(v_hat) (no parameter scaling)."""
  rng = np.random.default_rng(0)
  g = rng.normal(size=(128, 256)).astype(np.float32)
  params = {"w": jnp.zeros((128, 256))}
  tx = train_state.make_optimizer(_cfg(name="adafactor", lr=1e-2), 10)
  updates, _ = tx.update({"w": jnp.asarray(g)}, tx.init(params), params)
  g2 = g.astype(np.float64) ** 2 + 1e-30
  r, c = g2.mean(axis=1), g2.mean(axis=0)
  want = -1e-2 * g / np.sqrt(np.outer(r, c) / r.mean())
  np.testing.assert_allclose(updates["w"], want, rtol=2e-4)


def test_unknown_optimizer_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown optim.name 'sgd'.*adafactor"):
    train_state.make_optimizer(_cfg(name="sgd"), 10)
