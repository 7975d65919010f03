"""Guided distillation, stage one (Meng et al. 2023, sec. 3.1): a student that takes the
guidance weight w as an input learns, in one network evaluation, the classifier-free guided
prediction that costs the teacher two,

  x_target(z_t, c, w) = (1 + w) x_hat(z_t, c) - w x_hat(z_t, no c)      (their eq. 5),

over w drawn uniformly from [w_min, w_max] and t uniform in [0, 1]. Stage two distils this
w-conditioned student progressively (`distill.progressive`), w drawn per example and given
to teacher and student alike. Pure functions of arrays; `teacher_fn` and `student_fn` are
`denoise_fn(z, logsnr, cond) -> Prediction`.
"""

import jax

from vdm import guidance, process, samplers


def sample_guidance_weights(rng, batch_size: int, w_min: float, w_max: float):
  """w ~ U[w_min, w_max] per example."""
  if not 0.0 <= w_min <= w_max:
    raise ValueError(f"guidance weights need 0 <= w_min <= w_max, got [{w_min}, {w_max}]")
  return jax.random.uniform(rng, (batch_size,), minval=w_min, maxval=w_max)


def with_guidance_weight(cond, w):
  """The student's cond: the teacher's plus the guidance weight ([B])."""
  return {**(cond or {}), "guidance_w": w}


def guided_target(teacher_fn, z, logsnr, cond, w, drop, clip_x=samplers.no_clip):
  """The guided teacher's x-hat at (z, logsnr), both branches in one batch of 2B; `drop`
  removes the conditioning (the teacher's `drop_conditioning`). Unclipped by default: the
  guided x-hat leaves [-1, 1] for large w, and the student must learn it as it is."""
  return clip_x(guidance.guided(teacher_fn, w, drop)(z, logsnr, cond).x)


def stage_one_inputs(rng, x, logsnr_fn):
  """(z_t, logsnr_t) at t ~ U[0, 1] per example (the student must work at every noise
  level, not only on a sampling grid)."""
  k_t, k_eps = jax.random.split(rng)
  t = jax.random.uniform(k_t, (x.shape[0],))
  logsnr = logsnr_fn(t)
  return process.diffuse(x, logsnr, jax.random.normal(k_eps, x.shape)), logsnr
