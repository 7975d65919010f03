"""Dynamic thresholding of x-hat (Imagen, Saharia et al. 2022, sec. 2.3).

At each sampling step: s = the p-th percentile of |x-hat| over each sample's pixels; if s > 1,
x-hat is clipped to [-s, s] and divided by s, pulling saturated pixels inwards instead of
flattening them at +-1 (static clipping). This is an `x_hat -> x_hat` hook for the samplers in
`vdm.samplers` (the `clip_x` argument), so the sampler itself does not change.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from vdm import samplers

HOOKS = ("dynamic", "static", "none")


def dynamic_threshold(percentile: float = 99.5) -> Callable[[jax.Array], jax.Array]:
  """Returns the hook for the given percentile (Imagen's default 99.5)."""
  if not 0.0 < percentile <= 100.0:
    raise ValueError(f"percentile must be in (0, 100], got {percentile}")

  def threshold(x_hat):
    flat = jnp.abs(x_hat.reshape(x_hat.shape[0], -1))
    s = jnp.percentile(flat, percentile, axis=-1)
    s = jnp.maximum(s, 1.0).reshape((-1,) + (1,) * (x_hat.ndim - 1))   # s < 1: no rescaling
    return jnp.clip(x_hat, -s, s) / s

  return threshold


def clip_hook(name: str, percentile: float = 99.5) -> Callable[[jax.Array], jax.Array]:
  """The sampler's x-hat hook by name: dynamic thresholding, static [-1, 1], or none."""
  if name == "dynamic":
    return dynamic_threshold(percentile)
  if name == "static":
    return samplers.static_clip()
  if name == "none":
    return samplers.no_clip
  raise ValueError(f"unknown x-hat clipping {name!r}; choose one of {HOOKS}")
