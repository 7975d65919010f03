"""Self-conditioning (Chen et al. 2022, "Analog Bits", sec. 3.2): the network also sees its
own previous estimate of x, under the conditioning key `X_SELF`.

This module holds the one convention every sampler and loss shares: the previous x-hat
travels inside `cond` (a dict) as cond["x_self"], zeros meaning "no estimate yet". Putting it
in `cond` keeps the denoiser signature `denoise_fn(z, logsnr, cond)` of vdm/samplers.py, and
guidance wrappers, which concatenate every leaf of `cond` for their two branches, carry it
along unchanged.
"""

import jax.numpy as jnp

X_SELF = "x_self"


def with_x_self(cond, x_self):
  """`cond` (None or a dict) with the previous estimate `x_self` added under X_SELF."""
  if cond is None:
    return {X_SELF: x_self}
  if not isinstance(cond, dict):
    raise TypeError(f"self-conditioning needs cond to be None or a dict, got {type(cond)}")
  return {**cond, X_SELF: x_self}


def no_estimate(z):
  """The x_self of a first step (and of the 50% of training examples without it): zeros."""
  return jnp.zeros_like(z)
