"""Helpers shared by the network tests."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def perturb(module, scale=0.1, seed=1):
  """Adds noise to every parameter, so that zero-initialised layers stop hiding the rest.

  The noise comes from numpy: per-leaf jax.random calls would each need an XLA compile.
  """
  rng = np.random.default_rng(seed)
  nnx.update(module, jax.tree.map(
      lambda p: jnp.asarray(np.asarray(p) + scale * rng.standard_normal(p.shape), p.dtype),
      nnx.state(module, nnx.Param)))
  return module
