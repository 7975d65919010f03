"""Losses: the VDM variational lower bound and the weighted diffusion losses of Kingma & Gao.

All per-example losses are in nats, summed over the data dimensions; divide by
(num_dims * ln 2) for bits per dimension (`nats_to_bpd`).

The VLB (VDM eq. 11) is  -log p(x) <= L_recon + L_prior + L_diffusion, with
  1. L_recon     = -E_q(z_0|x) log p(x | z_0)            (discrete decoder over the data levels)
  2. L_prior     = KL(q(z_1 | x) || N(0, I))
  3. L_diffusion = continuous time (T -> inf, VDM eq. 17):
                     -1/2 E_{t, eps} [ d logsnr/dt ||eps - eps_hat(z_t; t)||^2 ]
                   discrete time, T steps (VDM eq. 14, s = t - 1/T):
                     T/2 E_{i, eps} [ (exp(logsnr_s - logsnr_t) - 1) ||eps - eps_hat||^2 ]
Weighted losses (Kingma & Gao 2023, eq. 8) replace the weight of the diffusion term:
  L_w = 1/2 E_t [ w(logsnr) (-d logsnr/dt) ||eps - eps_hat||^2 ],
with w = 1 recovering the ELBO's diffusion term.
"""

import math

import jax
import jax.numpy as jnp

from vdm import process


def nats_to_bpd(nats, num_dims):
  """Bits per dimension: total nats / (num_dims * ln 2)."""
  return nats / (num_dims * math.log(2.0))


def sum_over_data(a):
  """Per-example sum over every data dimension: [B, ...] -> [B]."""
  return jnp.sum(a.reshape(a.shape[0], -1), axis=-1)


# --- data <-> continuous values --------------------------------------------------------------


def int_to_x(x_int, num_levels: int):
  """Maps integer levels {0..L-1} to the centres of L equal bins of [-1, 1] (VDM's encoder)."""
  return 2.0 * ((jnp.asarray(x_int, jnp.float32) + 0.5) / num_levels) - 1.0


def x_to_int(x, num_levels: int):
  """Inverse of `int_to_x`, rounding to the nearest level (for writing samples)."""
  k = jnp.round((x + 1.0) / 2.0 * num_levels - 0.5)
  return jnp.clip(k, 0, num_levels - 1).astype(jnp.int32)


# --- 1. reconstruction: discrete decoder p(x | z_0) ---------------------------------------------


def decoder_log_probs(z_0, logsnr_0, num_levels: int):
  """log p(x = k | z_0) for every level k, shape z_0.shape + (num_levels,).

  p(x | z_0) is proportional to N(z_0 / alpha_0; x, sigma_0^2 / alpha_0^2) evaluated at the L
  bin centres and normalized over them (VDM appendix A.3, with L levels instead of 256).
  """
  alpha_0, _ = process.alpha_sigma(logsnr_0)
  alpha_0 = process.per_example(alpha_0, z_0)[..., None]
  logsnr_0 = process.per_example(logsnr_0, z_0)[..., None]
  levels = int_to_x(jnp.arange(num_levels), num_levels)
  logits = -0.5 * jnp.exp(logsnr_0) * jnp.square(z_0[..., None] / alpha_0 - levels)
  return jax.nn.log_softmax(logits, axis=-1)


def reconstruction_loss(x_int, z_0, logsnr_0, num_levels: int):
  """-log p(x | z_0) per example (nats)."""
  logp = decoder_log_probs(z_0, logsnr_0, num_levels)
  logp_x = jnp.take_along_axis(logp, jnp.asarray(x_int, jnp.int32)[..., None], axis=-1)[..., 0]
  return -sum_over_data(logp_x)


def gaussian_reconstruction_loss(x, z_0, logsnr_0):
  """-log N(x; z_0 / alpha_0, sigma_0^2 / alpha_0^2) per example: the decoder for continuous data
  (used to check the VLB against exact likelihoods of continuous densities)."""
  alpha_0, _ = process.alpha_sigma(process.per_example(logsnr_0, z_0))
  logsnr_0 = process.per_example(logsnr_0, z_0)
  sq = jnp.exp(logsnr_0) * jnp.square(z_0 / alpha_0 - x)
  return sum_over_data(0.5 * (sq - logsnr_0 + math.log(2 * math.pi)))


# --- 2. prior: KL(q(z_1 | x) || N(0, I)) -------------------------------------------------------


def prior_kl(x, logsnr_1):
  """KL(N(alpha_1 x, sigma_1^2) || N(0, 1)) summed over dimensions (closed form)."""
  logsnr_1 = process.per_example(logsnr_1, x)
  var_1 = jax.nn.sigmoid(-logsnr_1)
  mean_sq = jax.nn.sigmoid(logsnr_1) * jnp.square(x)
  # log var_1 = -softplus(logsnr_1), stable for large logsnr.
  return sum_over_data(0.5 * (var_1 + mean_sq + jax.nn.softplus(logsnr_1) - 1.0))


# --- 3. diffusion term ---------------------------------------------------------------------------


def diffusion_loss_continuous(eps, eps_hat, dlogsnr_dt):
  """Continuous-time diffusion loss per example (VDM eq. 17)."""
  return 0.5 * (-dlogsnr_dt) * sum_over_data(jnp.square(eps - eps_hat))


def diffusion_loss_discrete(eps, eps_hat, logsnr_t, logsnr_s, num_steps: int):
  """T-step diffusion loss per example (VDM eq. 14); SNR(s)/SNR(t) - 1 = expm1(logsnr_s - logsnr_t)."""
  return 0.5 * num_steps * jnp.expm1(logsnr_s - logsnr_t) * sum_over_data(
      jnp.square(eps - eps_hat))


# --- time sampling -------------------------------------------------------------------------------


def sample_times(rng, batch_size: int, *, antithetic: bool = True, num_steps: int = 0):
  """t for each example. Antithetic (low-discrepancy, VDM appendix I.1): one uniform offset
  shifted by i/B, so the batch covers [0, 1] evenly and the estimator's variance drops.

  With num_steps = T > 0, t is rounded up onto the grid {1/T, ..., 1} of the discrete VLB.
  """
  if antithetic:
    t = jnp.mod(jax.random.uniform(rng, ()) + jnp.arange(batch_size) / batch_size, 1.0)
  else:
    t = jax.random.uniform(rng, (batch_size,))
  if num_steps:
    t = (jnp.floor(t * num_steps) + 1.0) / num_steps
  return t


# --- weightings over logsnr (Kingma & Gao 2023, table 1) ---------------------------------------

WEIGHTINGS = ("elbo", "eps_mse", "x_mse", "v_mse", "sigmoid", "edm", "truncated_snr", "snr_plus_one",
              "min_snr")


def loss_weight(name: str, logsnr, dlogsnr_dt, *, sigmoid_bias: float = 0.0,
                edm_mean: float = 2.4, edm_std: float = 2.4, sigma_data: float = 0.5,
                min_snr_gamma: float = 5.0):
  """The factor c(t) = w(logsnr) * (-d logsnr/dt) multiplying 1/2 ||eps - eps_hat||^2.

  Losses written in x or v are rewritten in eps using ||x - x_hat||^2 = e^-logsnr ||eps - eps_hat||^2
  and ||v - v_hat||^2 = (1 + e^-logsnr) ||eps - eps_hat||^2 (process.py's identities).
  """
  rate = -dlogsnr_dt
  if name == "elbo":          # w = 1
    return rate
  if name == "eps_mse":       # ||eps - eps_hat||^2, i.e. w = p(logsnr) of the schedule
    return jnp.ones_like(logsnr)
  if name == "x_mse":         # ||x - x_hat||^2
    return jnp.exp(-logsnr)
  if name in ("v_mse", "snr_plus_one"):  # ||v - v_hat||^2 = (SNR + 1) ||x - x_hat||^2
    return 1.0 + jnp.exp(-logsnr)
  if name == "sigmoid":       # w = sigmoid(b - logsnr)
    return jax.nn.sigmoid(sigmoid_bias - logsnr) * rate
  if name == "edm":           # w = N(logsnr; 2.4, 2.4^2) (e^-logsnr + sigma_data^2) / sigma_data^2
    density = jnp.exp(-0.5 * jnp.square((logsnr - edm_mean) / edm_std)) / (
        edm_std * math.sqrt(2 * math.pi))
    return density * (jnp.exp(-logsnr) + sigma_data**2) / sigma_data**2 * rate
  if name == "truncated_snr":  # max(SNR, 1) ||x - x_hat||^2 (progressive distillation)
    return jnp.maximum(1.0, jnp.exp(-logsnr))
  if name == "min_snr":       # min(SNR, gamma) ||x - x_hat||^2 (Hang et al. 2023)
    return jnp.minimum(1.0, min_snr_gamma * jnp.exp(-logsnr))
  raise ValueError(f"unknown weighting {name!r}; choose one of {WEIGHTINGS}")


def weighted_diffusion_loss(eps, eps_hat, logsnr, dlogsnr_dt, weighting: str, **params):
  """1/2 c(t) ||eps - eps_hat||^2 per example, for any weighting name."""
  c = loss_weight(weighting, logsnr, dlogsnr_dt, **params)
  return 0.5 * c * sum_over_data(jnp.square(eps - eps_hat))


# --- variance-minimizing schedule update (VDM appendix I.2) ------------------------------------


def variance_minimizing_grads(per_example_loss, params, schedule_values_fn, schedule_params,
                              *, has_aux: bool = False):
  """Gradients for a model with a learned schedule, from one forward pass.

  The model parameters descend the mean loss E[L]; the schedule parameters descend
  E[L^2] = Var[L] + E[L]^2. Between pinned endpoints E[L] does not depend on the schedule
  (VDM eq. 18), so this is the variance of the estimator; free endpoints also descend the
  VLB through the E[L]^2 part (VDM appendix I.2).

  per_example_loss(params, sched) -> L [B] takes schedule *values* per example (e.g. logsnr_t,
  its rate, logsnr_0, logsnr_1, each of shape [B]) rather than schedule parameters, so each
  example's values get their own cotangent: d mean(L^2) / d s_i = 2 L_i dL_i/ds_i / B.
  Returns (L, grads_params, grads_schedule_params), plus the auxiliary output of
  per_example_loss when has_aux (it then returns (L, aux)).
  """
  sched, sched_vjp = jax.vjp(schedule_values_fn, schedule_params)
  if has_aux:
    losses, loss_vjp, aux = jax.vjp(per_example_loss, params, sched, has_aux=True)
  else:
    losses, loss_vjp = jax.vjp(per_example_loss, params, sched)
  batch = losses.shape[0]
  g_params, g_sched_values = loss_vjp(jnp.full_like(losses, 1.0 / batch))
  scale = 2.0 * jax.lax.stop_gradient(losses)
  g_sched_values = jax.tree.map(lambda g: g * scale.reshape((-1,) + (1,) * (g.ndim - 1)),
                                g_sched_values)
  (g_schedule,) = sched_vjp(g_sched_values)
  if has_aux:
    return losses, g_params, g_schedule, aux
  return losses, g_params, g_schedule
