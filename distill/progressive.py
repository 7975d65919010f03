"""Progressive distillation (Salimans & Ho 2022): one student DDIM step does what two
teacher DDIM steps do, so each stage halves the number of sampling steps.

For a student that samples with N steps on the grid t_i = i / N (the core sampler's grid,
`vdm.samplers.sample`), an example's training target at t = i / N is built as in Algorithm 2
of the paper:

  1. two deterministic DDIM steps of the teacher, t -> t - 1/(2N) -> t - 1/N, give z'';
  2. the x-target is the x-hat for which one DDIM step from z_t lands on z'' (eq. 8 solved):
       x_target = (z'' - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t);
  3. at the last step (i = 1) the sampler returns x-hat instead of stepping to t = 0, and so
     does the 2N-step teacher at t = 1/(2N): the target is the teacher's x-hat there.

The student regresses its x-hat on the target with an x-space weight (truncated SNR
max(SNR, 1) or SNR + 1, sec. 4 of the paper). Pure functions of arrays: the teacher is any
`denoise_fn(z, logsnr, cond) -> Prediction`, unclipped as in the paper's Algorithm 2 and
released code (clipping x-hat is for sampling; `distill.experiment` can apply a hook).
"""

import jax
import jax.numpy as jnp

from vdm import losses, process, samplers


def x_target_for_ddim_step(z_t, z_s, logsnr_t, logsnr_s):
  """The x-hat whose deterministic DDIM step from (z_t, t) reaches z_s at s (paper eq. 8):
  z_s = alpha_s x + sigma_s (z_t - alpha_t x) / sigma_t, solved for x."""
  alpha_t, sigma_t = process.alpha_sigma(process.per_example(logsnr_t, z_t))
  alpha_s, sigma_s = process.alpha_sigma(process.per_example(logsnr_s, z_t))
  ratio = sigma_s / sigma_t
  return (z_s - ratio * z_t) / (alpha_s - ratio * alpha_t)


def teacher_two_steps(teacher_fn, z_t, logsnr_t, logsnr_mid, logsnr_s, cond):
  """(z at s after two teacher DDIM steps, the teacher's x-hat at the midpoint)."""
  pred_t = teacher_fn(z_t, logsnr_t, cond)
  z_mid = samplers.ddim_step(pred_t, z_t, logsnr_t, logsnr_mid)
  pred_mid = teacher_fn(z_mid, logsnr_mid, cond)
  z_s = samplers.ddim_step(pred_mid, z_mid, logsnr_mid, logsnr_s)
  return z_s, pred_mid.x


def distillation_target(teacher_fn, z_t, logsnr_t, logsnr_mid, logsnr_s, last, cond=None):
  """The student's x-target at z_t (Algorithm 2); `last` ([B] bool) marks examples at the
  student's final step t = 1/N, whose target is the teacher's final x-hat."""
  z_s, x_mid = teacher_two_steps(teacher_fn, z_t, logsnr_t, logsnr_mid, logsnr_s, cond)
  x_step = x_target_for_ddim_step(z_t, z_s, logsnr_t, logsnr_s)
  return jnp.where(process.per_example(last, z_t), x_mid, x_step)


def student_times(rng, batch_size: int, num_steps: int):
  """(i, t, t_mid, s): i ~ U{1..N} per example, t = i/N, t_mid = t - 1/(2N), s = t - 1/N."""
  i = jax.random.randint(rng, (batch_size,), 1, num_steps + 1)
  t = i.astype(jnp.float32) / num_steps
  return i, t, t - 0.5 / num_steps, t - 1.0 / num_steps


def x_space_loss(x_target, x_hat, logsnr, weighting: str):
  """1/2 w(logsnr) ||x_target - x_hat||^2 per example, w in x-space: "truncated_snr" is
  max(SNR, 1), "snr_plus_one" is SNR + 1 (vdm.losses.loss_weight gives the factor on the
  eps error, which is the x-space factor divided by SNR)."""
  if weighting not in ("truncated_snr", "snr_plus_one", "x_mse", "v_mse"):
    raise ValueError(f"distillation weighting must be truncated_snr, snr_plus_one, x_mse or "
                     f"v_mse, got {weighting!r}")
  w_eps = losses.loss_weight(weighting, logsnr, jnp.zeros_like(logsnr))
  w_x = w_eps * jnp.exp(logsnr)
  return 0.5 * w_x * losses.sum_over_data(jnp.square(x_target - x_hat))
