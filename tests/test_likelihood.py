"""Full-pass bits/dim bookkeeping: every real example once, K draws averaged, padding ignored."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import likelihood


def _batches(values, batch_size):
  """Batches of example ids with padding marked by mask, as epoch_iterator yields them."""
  n = len(values)
  for start in range(0, n, batch_size):
    ids = np.arange(start, start + batch_size)
    yield {"id": np.where(ids < n, ids, 0), "mask": ids < n}


def test_full_pass_mean_stderr_and_terms():
  n, dims, k = 23, 64, 3
  base = np.linspace(10.0, 40.0, n)   # nats per example

  def terms(batch, key):
    ids = jnp.asarray(batch["id"])
    noise = jax.random.uniform(key, ids.shape)   # a different draw each (batch, k)
    return {"recon": 0.5 * base[batch["id"]] + 0 * noise, "prior": jnp.ones_like(noise),
            "diffusion": 0.5 * jnp.asarray(base)[ids] + noise}

  out = likelihood.vlb_bits_per_dim(terms, _batches(base, 8), jax.random.key(0),
                                    num_time_samples=k, num_dims=dims)
  assert out["num_examples"] == n
  # Reconstruct the draws independently to get the expected per-example averages.
  noise = np.zeros(n)
  for i, start in enumerate(range(0, n, 8)):
    ids = np.arange(start, start + 8)
    for j in range(k):
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), i), j)
      u = np.asarray(jax.random.uniform(key, (8,)))
      noise[ids[ids < n]] += u[ids < n] / k
  per_example = (base + 1.0 + noise) / (dims * math.log(2))
  assert out["bpd"] == pytest.approx(per_example.mean(), rel=1e-6)
  assert out["bpd_stderr"] == pytest.approx(per_example.std(ddof=1) / math.sqrt(n), rel=1e-5)
  assert out["bpd_prior"] == pytest.approx(1.0 / (dims * math.log(2)), rel=1e-6)
  assert out["bpd_recon"] + out["bpd_prior"] + out["bpd_diffusion"] == pytest.approx(out["bpd"])


def test_bad_arguments():
  with pytest.raises(ValueError, match="num_time_samples"):
    likelihood.vlb_bits_per_dim(lambda b, k: {}, [], jax.random.key(0), num_time_samples=0,
                                num_dims=1)


def test_mask_from_the_terms_and_custom_term_names():
  """Multi-process evaluation: the jitted function returns the global mask with its values."""
  nats = np.array([[4.0, 8.0, 99.0], [6.0, 99.0, 99.0]])
  batches = [{"mask": np.array([True, True, True])}, {"mask": np.array([True, True, True])}]
  masks = [np.array([True, True, False]), np.array([True, False, False])]
  calls = iter(range(2))

  def terms(batch, key):
    i = next(calls)
    return {"ode": nats[i], "mask": masks[i]}

  out = likelihood.vlb_bits_per_dim(terms, batches, jax.random.key(0), num_time_samples=1,
                                    num_dims=1, terms=("ode",))
  assert out["num_examples"] == 3
  assert out["bpd"] == pytest.approx(np.mean([4.0, 8.0, 6.0]) / math.log(2))
  assert out["bpd_ode"] == pytest.approx(out["bpd"])
