"""N-step samplers for distilled students: deterministic DDIM and the stochastic sampler of
Meng et al. 2023 ("On distillation of guided diffusion models", sec. 3.3).

Deterministic: the core DDIM sampler on the grid t_i = i / N (`vdm.samplers.sample`), the grid
the student was distilled on (solver_options are passed on to it, and checked there).

Stochastic: each step goes twice as far with deterministic DDIM, t -> t - 2/N, then noises
forward again to t - 1/N with the forward process q(z_u | z_r):

  z_u = (alpha_u / alpha_r) z_r + sigma_{u|r} noise,
  sigma_{u|r}^2 = sigma_u^2 - (alpha_u / alpha_r)^2 sigma_r^2 = sigma_u^2 (1 - SNR_u / SNR_r),

so N evaluations still reach t = 1/N, where x-hat is returned. Fresh noise at every step
trades a little sharpness for diversity, which helps at 2-8 steps (the paper's finding).
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

from vdm import process, samplers, self_conditioning

DISTILLED_SAMPLERS = ("ddim", "stochastic")


def forward_noise(z_r, logsnr_r, logsnr_u, noise):
  """A draw of q(z_u | z_r) for u later than r (logsnr_u < logsnr_r)."""
  logsnr_r, logsnr_u = process.per_example(logsnr_r, z_r), process.per_example(logsnr_u, z_r)
  alpha_r, _ = process.alpha_sigma(logsnr_r)
  alpha_u, sigma_u = process.alpha_sigma(logsnr_u)
  return (alpha_u / alpha_r) * z_r + sigma_u * jnp.sqrt(-jnp.expm1(logsnr_u - logsnr_r)) * noise


def sample(denoise_fn: Callable, logsnr_fn: Callable, shape, rng, *, num_steps: int,
           sampler: str = "ddim", clip_x: Callable = samplers.no_clip, cond: Any = None,
           solver_options=None, self_condition: bool = False):
  """`shape` samples in num_steps evaluations of denoise_fn, deterministic or stochastic;
  self_condition: every evaluation sees the latest x-hat as cond["x_self"] (zeros first)."""
  if sampler not in DISTILLED_SAMPLERS:
    raise ValueError(f"unknown distilled sampler {sampler!r}; choose one of "
                     f"{DISTILLED_SAMPLERS}")
  if sampler == "ddim" or num_steps == 1:
    return samplers.sample(denoise_fn, logsnr_fn, shape, rng, num_steps=num_steps,
                           sampler="ddim", clip_x=clip_x, cond=cond,
                           solver_options=solver_options, self_condition=self_condition)
  shape = tuple(shape)
  init_rng, loop_rng = jax.random.split(rng)
  batch = shape[0]

  def logsnr_at(i):
    t = jnp.maximum(jnp.asarray(i, jnp.float32), 0.0) / num_steps
    return jnp.asarray(logsnr_fn(jnp.full((batch,), t, jnp.float32)), jnp.float32)

  def predict(z, logsnr, x_self):
    c = self_conditioning.with_x_self(cond, x_self) if self_condition else cond
    return samplers.clip_prediction(denoise_fn(z, logsnr, c), z, logsnr, clip_x)

  def body(k, carry):
    z, x_self = carry
    i = num_steps - k                       # from t = i/N: DDIM to (i-2)/N, noise to (i-1)/N
    logsnr_t, logsnr_r, logsnr_u = logsnr_at(i), logsnr_at(i - 2), logsnr_at(i - 1)
    pred = predict(z, logsnr_t, x_self)
    z_r = samplers.ddim_step(pred, z, logsnr_t, logsnr_r)
    noise = jax.random.normal(jax.random.fold_in(loop_rng, i), shape, jnp.float32)
    return forward_noise(z_r, logsnr_r, logsnr_u, noise), pred.x

  z_1 = jax.random.normal(init_rng, shape, jnp.float32)
  z, x_self = jax.lax.fori_loop(0, num_steps - 1, body, (z_1, jnp.zeros_like(z_1)))
  return predict(z, logsnr_at(1), x_self).x
