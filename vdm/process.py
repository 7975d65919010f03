"""The forward (noising) process in logSNR notation, and conversions between predictions.

Notation (shared/DESIGN.md): logsnr = lambda = log(alpha^2 / sigma^2), with the
variance-preserving choice alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr), and
z_t = alpha_t x + sigma_t eps. VDM's gamma is -logsnr.

Every formula is written so that it stays finite for |logsnr| up to ~20 in float32: alpha and
sigma come from sigmoids (never sqrt(1 - alpha^2)), and conversions that divide use the
division that is well conditioned at that end of the schedule.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

PARAMETERIZATIONS = ("eps", "x", "v", "both")


def per_example(a, like):
  """Broadcasts a per-example array (shape [B] or scalar) against a batch of images."""
  a = jnp.asarray(a, dtype=like.dtype if jnp.issubdtype(like.dtype, jnp.floating) else None)
  return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def alpha_sigma(logsnr):
  """alpha = sqrt(sigmoid(lambda)), sigma = sqrt(sigmoid(-lambda)) (VDM eq. 3, VP case)."""
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def diffuse(x, logsnr, eps):
  """Samples q(z_t | x): z_t = alpha_t x + sigma_t eps (VDM eq. 1)."""
  alpha, sigma = alpha_sigma(per_example(logsnr, x))
  return alpha * x + sigma * eps


# --- conversions between x-hat, eps-hat and v-hat given z_t (v = alpha eps - sigma x) ------
# Using alpha^2 + sigma^2 = 1:  x = alpha z - sigma v,  eps = sigma z + alpha v.


def x_from_eps(z, eps, logsnr):
  alpha, sigma = alpha_sigma(per_example(logsnr, z))
  return (z - sigma * eps) / alpha


def eps_from_x(z, x, logsnr):
  alpha, sigma = alpha_sigma(per_example(logsnr, z))
  return (z - alpha * x) / sigma


def v_from_x_eps(x, eps, logsnr):
  alpha, sigma = alpha_sigma(per_example(logsnr, x))
  return alpha * eps - sigma * x


def x_from_v(z, v, logsnr):
  alpha, sigma = alpha_sigma(per_example(logsnr, z))
  return alpha * z - sigma * v


def eps_from_v(z, v, logsnr):
  alpha, sigma = alpha_sigma(per_example(logsnr, z))
  return sigma * z + alpha * v


def v_from_x(z, x, logsnr):
  return v_from_x_eps(x, eps_from_x(z, x, logsnr), logsnr)


def v_from_eps(z, eps, logsnr):
  return v_from_x_eps(x_from_eps(z, eps, logsnr), eps, logsnr)


class Prediction(NamedTuple):
  """A denoiser's output expressed every way: x-hat, eps-hat and v-hat for the same z_t."""
  x: jax.Array
  eps: jax.Array
  v: jax.Array


def merge_both(z, x_tilde, eps_tilde, logsnr) -> tuple[jax.Array, jax.Array]:
  """(x-hat, eps-hat) of the mixed "x & eps" output (Salimans & Ho 2022, sec. 4).

  x-hat = sigma^2 x_tilde + alpha (z - sigma eps_tilde), i.e. the convex combination
  sigma^2 x_tilde + alpha^2 x_from_eps(z, eps_tilde): the x-output near pure noise, the
  eps-output near the data. eps-hat = eps_from_x(z, x-hat), written without the division by
  sigma: eps-hat = sigma (z - alpha x_tilde) + alpha^2 eps_tilde
  (= sigma^2 eps_from_x(z, x_tilde) + alpha^2 eps_tilde), so both stay finite at either end.
  """
  alpha, sigma = alpha_sigma(per_example(logsnr, z))
  x = sigma**2 * x_tilde + alpha * (z - sigma * eps_tilde)
  eps = sigma * (z - alpha * x_tilde) + alpha**2 * eps_tilde
  return x, eps


def _check_output_shape(z, output, parameterization: str):
  """The output must match z (2x its channels for "both"): broadcasting would hide a net
  built with the wrong out_channels (e.g. 2C outputs against 1-channel z)."""
  channels = z.shape[-1] * (2 if parameterization == "both" else 1)
  want = tuple(z.shape[:-1]) + (channels,)
  if tuple(output.shape) != want:
    hint = ("the net must output 2C channels (x_tilde, eps_tilde): build it with "
            "out_channels=2*C" if parameterization == "both" else
            "build the net with out_channels=C (2*C is for the 'both' parameterization)")
    raise ValueError(f"network output has shape {tuple(output.shape)} but parameterization "
                     f"{parameterization!r} needs {want} for z of shape {tuple(z.shape)}; "
                     f"{hint}")


def predict(z, logsnr, output, parameterization: str) -> Prediction:
  """Turns a network output in `parameterization` into all three predictions.

  eps-parameterized models divide by alpha to get x (fine except at very low logsnr), x-models
  divide by sigma to get eps (fine except at very high logsnr); v-models never divide.
  "both" (Salimans & Ho 2022, sec. 4) outputs 2C channels, x_tilde then eps_tilde on the
  last axis, merged by `merge_both`; it never divides either.
  """
  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(f"unknown parameterization {parameterization!r}; choose one of "
                     f"{PARAMETERIZATIONS}")
  output = jnp.asarray(output)
  _check_output_shape(z, output, parameterization)
  if parameterization == "eps":
    x = x_from_eps(z, output, logsnr)
    return Prediction(x=x, eps=output, v=v_from_x_eps(x, output, logsnr))
  if parameterization == "x":
    eps = eps_from_x(z, output, logsnr)
    return Prediction(x=output, eps=eps, v=v_from_x_eps(output, eps, logsnr))
  if parameterization == "v":
    return Prediction(x=x_from_v(z, output, logsnr), eps=eps_from_v(z, output, logsnr), v=output)
  x_tilde, eps_tilde = jnp.split(output, 2, axis=-1)
  x, eps = merge_both(z, x_tilde, eps_tilde, logsnr)
  return Prediction(x=x, eps=eps, v=v_from_x_eps(x, eps, logsnr))


def from_x(z, x, logsnr) -> Prediction:
  """The Prediction implied by an x-hat (e.g. after clipping or thresholding x-hat)."""
  return predict(z, logsnr, x, "x")
