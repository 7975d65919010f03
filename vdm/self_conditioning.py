"""Self-conditioning (Chen et al. 2022, "Analog Bits", sec. 3.2): the network also sees its
own previous estimate of x, under the conditioning key `X_SELF`.

This module holds the one convention every sampler and loss shares: the previous x-hat
travels inside `cond` (a dict) as cond["x_self"], zeros meaning "no estimate yet". Putting it
in `cond` keeps the denoiser signature `denoise_fn(z, logsnr, cond)` of vdm/samplers.py, and
guidance wrappers, which concatenate every leaf of `cond` for their two branches, carry it
along unchanged.

Where x_self is made:
  - sampling: the samplers built with `self_condition=True` pass the latest (clipped) x-hat
    (`vdm.samplers.sample`), zeros at the first evaluation;
  - training: `training_x_self`, Chen et al.'s Algorithm 1 per example (the VDM loss and
    `imagen.experiment.denoising_loss`, so every Imagen and video stage);
  - distillation targets: `with_own_estimate`, a self-conditioned teacher fed its own first
    pass at the same z;
  - evaluation of bits/dim (`vdm.experiment.per_example_vlb`, the ODE likelihood): zeros.
Where it is read: `network_input`, called by `DiffusionModel.denoise`.
"""

import jax
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


def network_input(z, cond, self_condition: bool):
  """(the network's input, the network's cond) for `DiffusionModel.denoise`.

  A self-conditioned model's network sees concat([z, x_self], channel axis), x_self =
  cond["x_self"] (zeros when absent), and the rest of cond; any other model sees z and cond
  unchanged, and refuses an x_self it would silently ignore.
  """
  x_self = cond.get(X_SELF) if isinstance(cond, dict) else None
  if not self_condition:
    if x_self is not None:
      raise ValueError("cond['x_self'] was given to a model built without self-conditioning: "
                       "sample with self_condition=False, or train the model with "
                       "--config.model.self_condition=True")
    return z, cond
  if cond is not None and not isinstance(cond, dict):
    raise TypeError(f"self-conditioning needs cond to be None or a dict, got {type(cond)}")
  rest = {k: v for k, v in (cond or {}).items() if k != X_SELF}
  x_self = no_estimate(z) if x_self is None else jnp.asarray(x_self, z.dtype)
  if x_self.shape != z.shape:
    raise ValueError(f"cond['x_self'] must be an estimate of x shaped like z {list(z.shape)}, "
                     f"got {list(x_self.shape)}")
  return jnp.concatenate([z, x_self], axis=-1), rest


def training_x_self(denoise_fn, z, logsnr, cond, rng, p: float = 0.5):
  """x_self of one training step by Chen et al.'s Algorithm 1: for each example, with
  probability p the x-hat of a first pass of the same network at the same (z, logsnr) with
  x_self = 0, under stop_gradient (no gradient flows through the first pass); otherwise
  zeros, so the model also learns to denoise without an estimate (its first sampling step).

  The estimate is clipped to the data range [-1, 1], the range of the x-hat that samplers
  carry (static clipping and dynamic thresholding both end there): an eps-model's x-hat
  (z - sigma eps-hat) / alpha is far outside it at low logsnr.

  denoise_fn(z, logsnr, cond) -> Prediction is the model in training mode (its dropout).
  """
  use = jax.random.bernoulli(rng, p, (z.shape[0],))
  first = denoise_fn(z, logsnr, with_x_self(cond, no_estimate(z))).x
  first = jnp.clip(jax.lax.stop_gradient(first), -1.0, 1.0)
  return jnp.where(use.reshape((-1,) + (1,) * (z.ndim - 1)), first, 0.0).astype(z.dtype)


def with_own_estimate(denoise_fn):
  """denoise_fn evaluated with its own estimate: a first pass with x_self = 0, then the pass
  that sees that (clipped) x-hat, the input of the self-conditioned half of training. How a
  self-conditioned teacher is evaluated where no sampling chain provides a previous estimate
  (distillation targets)."""

  def denoise(z, logsnr, cond):
    first = denoise_fn(z, logsnr, with_x_self(cond, no_estimate(z))).x
    return denoise_fn(z, logsnr, with_x_self(cond, jnp.clip(first, -1.0, 1.0)))

  return denoise
