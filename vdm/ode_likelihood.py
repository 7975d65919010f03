"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021, "Score-Based
Generative Modeling through Stochastic Differential Equations", sec. 4.3 and appendix D.2).

Derivation in logsnr notation (shared/DESIGN.md). Write l = logsnr(t), l' = dl/dt < 0,
alpha^2 = sigmoid(l), sigma^2 = sigmoid(-l), z_t = alpha_t x + sigma_t eps. The
variance-preserving SDE dz = f(t) z dt + g(t) dW with these marginals has

  f   = d log(alpha) / dt = 0.5 d log sigmoid(l) / dt = 0.5 sigmoid(-l) l' = 0.5 sigma^2 l',
  g^2 = d sigma^2/dt - 2 f sigma^2
      = -alpha^2 sigma^2 l' - sigma^4 l' = -sigma^2 l'          (using alpha^2 + sigma^2 = 1).

Its probability-flow ODE, dz/dt = f z - 0.5 g^2 grad_z log p_t(z), with the score
grad_z log p_t(z) = -eps_hat(z) / sigma, is therefore

  dz/dt = 0.5 l' (sigma^2 z - sigma eps_hat(z, l)).                                   (*)

(Check: (*) is the continuous limit of deterministic DDIM, d(z/alpha) = eps_hat d(sigma/alpha).)
The instantaneous change of variables, d log p_t(z_t)/dt = -div(dz/dt), gives

  log p_{t0}(z_{t0}) = log p_1(z_1) + int_{t0}^{1} div_z (dz/dt) dt,

with p_1 replaced by the VP prior N(0, I). Following Song et al., the ODE starts at the data
itself, z_{t0} = x, so the result is -log p_{t0}(x): the model density of data blurred by
noise of scale sigma_{t0}, which is the data density once sigma_{t0} is far below the data's
resolution. The divergence is estimated with Hutchinson's trick, eps^T (dv/dz) eps, using one
probe vector per example for the whole trajectory (so the estimate of the integral is
unbiased), or computed exactly from D Jacobian-vector products for tiny D.
"""

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from vdm import losses, process

HUTCHINSON = ("rademacher", "gaussian", "exact")


def probability_flow(denoise_fn, logsnr_fn, cond=None):
  """Returns v(t, z) = dz/dt of the probability-flow ODE, eq. (*) in the module docstring.

  `t` is a scalar; logsnr and its time derivative come from one `jax.jvp` of `logsnr_fn`.
  """

  def velocity(t, z):
    t_b = jnp.full((z.shape[0],), t, jnp.float32)
    logsnr, dlogsnr_dt = jax.jvp(logsnr_fn, (t_b,), (jnp.ones_like(t_b),))
    eps_hat = denoise_fn(z, logsnr, cond).eps
    dl = process.per_example(dlogsnr_dt, z)
    _, sigma = process.alpha_sigma(process.per_example(logsnr, z))
    return 0.5 * dl * (sigma**2 * z - sigma * eps_hat)

  return velocity


def _velocity_and_divergence(velocity, hutchinson, probe):
  """Returns f(t, z) -> (dz/dt, per-example divergence estimate)."""
  if hutchinson == "exact":

    def f(t, z):
      v_fn = lambda z_: velocity(t, z_)
      dim = math.prod(z.shape[1:])
      # Tangent i is the i-th basis vector for every example; J e_i is the i-th column.
      basis = jnp.broadcast_to(
          jnp.eye(dim, dtype=z.dtype).reshape((dim, 1) + z.shape[1:]), (dim,) + z.shape)
      v = v_fn(z)
      columns = jax.vmap(lambda e: jax.jvp(v_fn, (z,), (e,))[1])(basis)
      columns = columns.reshape(dim, z.shape[0], dim)
      return v, jnp.einsum("ibi->b", columns)  # trace = sum_i (J e_i)_i

    return f

  def f(t, z):
    v, jvp = jax.jvp(lambda z_: velocity(t, z_), (z,), (probe,))
    return v, losses.sum_over_data(probe * jvp)  # Hutchinson: E[e^T J e] = tr J

  return f


def _rk4_step(f, t, h, state):
  """Classical Runge-Kutta step for the augmented state (z, integral of the divergence)."""
  z, acc = state
  v1, d1 = f(t, z)
  v2, d2 = f(t + 0.5 * h, z + 0.5 * h * v1)
  v3, d3 = f(t + 0.5 * h, z + 0.5 * h * v2)
  v4, d4 = f(t + h, z + h * v3)
  z = z + h / 6.0 * (v1 + 2.0 * v2 + 2.0 * v3 + v4)
  acc = acc + h / 6.0 * (d1 + 2.0 * d2 + 2.0 * d3 + d4)
  return z, acc


def standard_normal_logpdf(z):
  """Per-example log N(z; 0, I), the VP prior at t = 1."""
  d = math.prod(z.shape[1:])
  return -0.5 * losses.sum_over_data(z**2) - 0.5 * d * math.log(2.0 * math.pi)


def ode_log_likelihood(denoise_fn: Callable[..., process.Prediction],
                       logsnr_fn: Callable[[jax.Array], jax.Array],
                       x,
                       rng,
                       *,
                       num_steps: int,
                       hutchinson: str = "rademacher",
                       t_min: float = 0.0,
                       cond: Any = None):
  """Negative log-likelihood (nats per example) of x under the probability-flow ODE.

  Integrates (*) and the divergence from t_min to 1 with `num_steps` fixed RK4 steps in one
  `jax.lax.fori_loop` (four denoiser evaluations per step).

  Args:
    denoise_fn: (z, logsnr [B], cond) -> process.Prediction; only eps-hat is used.
    logsnr_fn: t [B] -> logsnr [B], strictly decreasing and differentiable.
    x: data, shape [B, ...] (batch first), continuous.
    rng: PRNG key for the Hutchinson probe vectors.
    num_steps: RK4 steps (static).
    hutchinson: "rademacher", "gaussian" (one probe per example for the whole trajectory),
      or "exact" (D Jacobian-vector products per evaluation: tiny D only).
    t_min: start time of the ODE, in [0, 1).
    cond: conditioning pytree passed to denoise_fn.

  Returns:
    dict with, per example, "nll_nats" = -(prior_logp + delta_logp), "prior_logp"
    = log N(z_1; 0, I), "delta_logp" = int div(dz/dt) dt, and "z1" the ODE's end point.
  """
  if hutchinson not in HUTCHINSON:
    raise ValueError(f"unknown hutchinson={hutchinson!r}; choose one of {HUTCHINSON}")
  if not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"num_steps must be a positive Python int, got {num_steps!r}")
  if not 0.0 <= t_min < 1.0:
    raise ValueError(f"t_min must lie in [0, 1), got {t_min}")
  x = jnp.asarray(x, jnp.float32)
  if x.ndim < 2:
    raise ValueError(f"x must be batch-first with shape [B, ...], got shape {x.shape}; "
                     "add a leading batch axis for a single example")

  if hutchinson == "rademacher":
    probe = jax.random.rademacher(rng, x.shape).astype(jnp.float32)
  elif hutchinson == "gaussian":
    probe = jax.random.normal(rng, x.shape, jnp.float32)
  else:
    probe = None
  f = _velocity_and_divergence(probability_flow(denoise_fn, logsnr_fn, cond), hutchinson, probe)

  h = (1.0 - t_min) / num_steps

  def body(i, state):
    t = t_min + h * jnp.asarray(i, jnp.float32)
    return _rk4_step(f, t, h, state)

  z1, delta_logp = jax.lax.fori_loop(0, num_steps, body,
                                     (x, jnp.zeros((x.shape[0],), jnp.float32)))
  prior_logp = standard_normal_logpdf(z1)
  return dict(nll_nats=-(prior_logp + delta_logp), prior_logp=prior_logp,
              delta_logp=delta_logp, z1=z1)


def dequantize(x_int, num_levels: int, rng):
  """Uniform dequantization: x = 2 (k + u) / num_levels - 1, u ~ U[0, 1)^D, so x in [-1, 1).

  Bin k of the integers 0..num_levels-1 becomes the interval [2k/L - 1, 2(k+1)/L - 1).
  """
  u = jax.random.uniform(rng, x_int.shape, jnp.float32)
  return 2.0 * (x_int.astype(jnp.float32) + u) / num_levels - 1.0


def _check_levels(x_int, num_levels):
  if not isinstance(num_levels, int) or num_levels < 2:
    raise ValueError(f"num_levels must be an int >= 2 (256 for 8-bit data), got {num_levels!r}")
  if not jnp.issubdtype(jnp.asarray(x_int).dtype, jnp.integer):
    raise ValueError(f"x_int must hold integer levels 0..{num_levels - 1}, got dtype "
                     f"{jnp.asarray(x_int).dtype}; pass the raw discrete data, not [-1, 1] "
                     "floats")
  try:
    values = np.asarray(x_int)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return  # Traced under jit: the range cannot be checked here.
  if values.size and (values.min() < 0 or values.max() >= num_levels):
    raise ValueError(f"x_int has values in [{values.min()}, {values.max()}], outside "
                     f"0..{num_levels - 1} (num_levels={num_levels})")


def ode_bits_per_dim(denoise_fn: Callable[..., process.Prediction],
                     logsnr_fn: Callable[[jax.Array], jax.Array],
                     x_int,
                     rng,
                     *,
                     num_levels: int,
                     num_steps: int,
                     hutchinson: str = "rademacher",
                     t_min: float = 0.0,
                     cond: Any = None):
  """Bits per dimension of discrete data, an upper bound via uniform dequantization.

  With y = k + u, u ~ U[0,1)^D, and x = 2 y / L - 1 (L = num_levels), the density of y is
  p_y(y) = p_x(x) (2 / L)^D, and by Jensen
    -log P(k) <= E_u[-log p_y(k + u)] = E_u[-log p_x(x)] - D log(2 / L).
  One draw of u per example gives an unbiased estimate of the bound:
    bits/dim = (nll_x - D log(2 / L)) / (D ln 2).

  Returns:
    dict with, per example, "bpd", "nll_nats" (of the discrete data, the bound), "x" (the
    dequantized input) and the continuous "ode" result of `ode_log_likelihood`.
  """
  _check_levels(x_int, num_levels)
  x_int = jnp.asarray(x_int)
  dequant_rng, probe_rng = jax.random.split(rng)
  x = dequantize(x_int, num_levels, dequant_rng)
  ode = ode_log_likelihood(denoise_fn, logsnr_fn, x, probe_rng, num_steps=num_steps,
                           hutchinson=hutchinson, t_min=t_min, cond=cond)
  dim = math.prod(x.shape[1:])
  nll = ode["nll_nats"] - dim * math.log(2.0 / num_levels)
  return dict(bpd=nll / (dim * math.log(2.0)), nll_nats=nll, x=x, ode=ode)
