"""Samplers for any denoiser: DDIM (deterministic or stochastic), VDM ancestral sampling,
EDM's Heun sampler, DPM-Solver++(2M) and predictor-corrector sampling (the last three and
the step rules live in vdm/solvers.py; `sample` is the one entry point for all of them).

Interfaces (shared with guidance, distillation and the cascade):
- `denoise_fn(z, logsnr, cond) -> process.Prediction`, with `logsnr` of shape [B] and `cond`
  an arbitrary pytree passed through untouched (may be None). With `self_condition=True`,
  cond (None or a dict) also carries the latest x-hat under cond["x_self"]
  (vdm/self_conditioning.py; zeros before the first evaluation).
- `logsnr_fn(t) -> logsnr`: a pure, strictly decreasing function of t in [0, 1] (t=0 data,
  t=1 noise), finite on the whole interval. It is called with t of shape [B]. Learned
  schedules are passed as closures over their parameters.
- `clip_x(x_hat) -> x_hat`: a post-processing hook on x-hat (`no_clip`, `static_clip(lo, hi)`,
  `dynamic_threshold(p)`; `clip_hook(name)` picks one by config name). eps-hat and v-hat are
  then recomputed from the clipped x-hat and z_t (`process.from_x`), so every step sees a
  self-consistent prediction.

Notation (shared/DESIGN.md): z_t = alpha_t x + sigma_t eps, alpha^2 = sigmoid(logsnr),
sigma^2 = sigmoid(-logsnr). A step goes from time t to an earlier time s < t
(logsnr_s > logsnr_t).
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

from vdm import process, self_conditioning, solvers
from vdm.solvers import SolverOptions, ancestral_step, ddim_step  # noqa: F401 (public API)

SAMPLERS = ("ddim", "ancestral", "heun", "dpmpp_2m", "pc")
STEP_SAMPLERS = ("ddim", "ancestral")    # the one-step rules `step_to` takes


# --- x-hat post-processing hooks ------------------------------------------------------------


def no_clip(x_hat):
  """Identity hook: x-hat is used as predicted."""
  return x_hat


def static_clip(lo: float = -1.0, hi: float = 1.0) -> Callable[[jax.Array], jax.Array]:
  """Returns a hook clipping x-hat to [lo, hi] (the data range; DDPM/Imagen static clipping)."""
  if not lo < hi:
    raise ValueError(f"static_clip needs lo < hi, got lo={lo}, hi={hi}")

  def clip(x_hat):
    return jnp.clip(x_hat, lo, hi)

  return clip


def dynamic_threshold(percentile: float = 99.5) -> Callable[[jax.Array], jax.Array]:
  """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3): s = the p-th percentile
  of |x-hat| over each sample's pixels; if s > 1, x-hat is clipped to [-s, s] and divided by
  s, pulling saturated pixels inwards instead of flattening them at +-1."""
  if not 0.0 < percentile <= 100.0:
    raise ValueError(f"percentile must be in (0, 100], got {percentile}")

  def threshold(x_hat):
    flat = jnp.abs(x_hat.reshape(x_hat.shape[0], -1))
    s = jnp.percentile(flat, percentile, axis=-1)
    s = jnp.maximum(s, 1.0).reshape((-1,) + (1,) * (x_hat.ndim - 1))   # s < 1: no rescaling
    return jnp.clip(x_hat, -s, s) / s

  return threshold


CLIP_HOOKS = ("dynamic", "static", "none")


def clip_hook(name: str, percentile: float = 99.5) -> Callable[[jax.Array], jax.Array]:
  """The x-hat hook by config name: dynamic thresholding, static [-1, 1], or none."""
  if name == "dynamic":
    return dynamic_threshold(percentile)
  if name == "static":
    return static_clip()
  if name == "none":
    return no_clip
  raise ValueError(f"unknown x-hat clipping {name!r}; choose one of {CLIP_HOOKS}")


def clip_prediction(pred: process.Prediction, z, logsnr, clip_x=no_clip) -> process.Prediction:
  """Applies `clip_x` to x-hat and recomputes eps-hat and v-hat from it and z_t.

  `no_clip` returns `pred` unchanged: recomputing eps = (z - alpha x) / sigma would only lose
  precision at high logsnr, where sigma is tiny.
  """
  if clip_x is no_clip:
    return pred
  return process.from_x(z, clip_x(pred.x), logsnr)


# --- the sampling loop ----------------------------------------------------------------------


def sample(denoise_fn: Callable[..., process.Prediction],
           logsnr_fn: Callable[[jax.Array], jax.Array],
           shape,
           rng,
           *,
           num_steps: int,
           sampler: str = "ddim",
           eta: float = 0.0,
           clip_x: Callable[[jax.Array], jax.Array] = no_clip,
           cond: Any = None,
           z_init=None,
           solver_options: "SolverOptions | dict | None" = None,
           self_condition: bool = False):
  """Draws samples x from noise in at most `num_steps` denoiser evaluations.

  "ddim" and "ancestral" work on the uniform grid t_i = i / num_steps, i = N .. 1: steps
  i = N, ..., 2 move z from t = i/N to s = (i-1)/N with the chosen rule; the last
  evaluation, at t = 1/N, returns the (clipped) x-hat instead of stepping to t = 0 (as in VDM
  and progressive distillation: at t -> 0 the best estimate of x given z is x-hat).
  "dpmpp_2m" and "pc" use the same grid (pc with fewer levels, as its correctors also cost
  evaluations); "heun" uses EDM's noise levels between logsnr_fn(1) and logsnr_fn(0). Every
  sampler returns the x-hat of its last evaluation. `nfe(sampler, num_steps, options)` is
  the exact number of evaluations: num_steps, except for heun (2 N - 1 <= num_steps) and pc.

  Each sampler is one `jax.lax.fori_loop`, so under `jax.jit` (with `num_steps`, `sampler`,
  `clip_x`, `denoise_fn`, `logsnr_fn`, `solver_options` static) the whole run is one
  compiled program.

  Args:
    denoise_fn: (z, logsnr [B], cond) -> process.Prediction.
    logsnr_fn: t [B] -> logsnr [B], strictly decreasing.
    shape: output shape, batch first.
    rng: PRNG key for z_init (if not given) and the per-step noise.
    num_steps: the budget of denoiser evaluations (>= 1).
    sampler: one of SAMPLERS.
    eta: DDIM stochasticity in [0, 1]; only "ddim" reads it.
    clip_x: x-hat hook, applied at every evaluation and to the returned x.
    cond: conditioning pytree passed to denoise_fn.
    z_init: starting latent at t = 1; by default z_1 ~ N(0, I), the VP prior.
    solver_options: SolverOptions, or a dict (a ConfigDict) of some of its fields (EDM's
      churn, s_tmin, s_tmax, s_noise, rho; PC's snr, corrector_steps; DPM-Solver++'s grid).
    self_condition: pass the latest x-hat (the clipped one the sampler uses) as
      cond["x_self"] to every evaluation, zeros to the first.

  Returns:
    x of `shape`, float32.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
  if not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"num_steps must be a positive Python int (static under jit), "
                     f"got {num_steps!r}")
  options = SolverOptions.of(solver_options)
  shape = tuple(shape)
  z_init, loop_rng, logsnr_at = loop_start(rng, shape, z_init, logsnr_fn, num_steps)

  def predict(z, logsnr, x_self):
    c = self_conditioning.with_x_self(cond, x_self) if self_condition else cond
    return clip_prediction(denoise_fn(z, logsnr, c), z, logsnr, clip_x)

  if sampler == "heun":
    return solvers.heun(predict, logsnr_at, z_init, loop_rng, num_steps=num_steps,
                        options=options)
  if sampler == "dpmpp_2m":
    grid = logsnr_at if options.grid == "t" else solvers.logsnr_uniform(logsnr_at, num_steps)
    return solvers.dpmpp_2m(predict, grid, z_init, num_steps=num_steps)
  if sampler == "pc":
    return solvers.pc(predict, logsnr_at, z_init, loop_rng, num_steps=num_steps,
                      options=options)

  def body(k, carry):
    z, x_self = carry
    i = num_steps - k  # k = 0 .. N-2 steps from t = i/N to s = (i-1)/N.
    pred = predict(z, logsnr_at(i), x_self)
    return step_to(sampler, eta, pred, z, i, logsnr_at, loop_rng), pred.x

  z, x_self = jax.lax.fori_loop(0, num_steps - 1, body,
                                (z_init, self_conditioning.no_estimate(z_init)))
  return predict(z, logsnr_at(1), x_self).x


def nfe(sampler: str, num_steps: int, options: "SolverOptions | dict | None" = None) -> int:
  """The number of denoiser evaluations `sample` spends with this sampler and budget."""
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
  options = SolverOptions.of(options)
  if sampler == "heun":
    return 2 * solvers.heun_levels(num_steps) - 1
  if sampler == "pc":
    m = options.corrector_steps
    return solvers.pc_levels(num_steps, m) * (m + 1) - m
  return num_steps


def loop_start(rng, shape, z_init, logsnr_fn, num_steps):
  """What a sampling loop starts from: z_1 (`z_init`, else ~ N(0, I) from rng's first
  half), the key of the per-step noise (the second half), and logsnr at step i (t = i/N)."""
  init_rng, loop_rng = jax.random.split(rng)
  if z_init is None:
    z_init = jax.random.normal(init_rng, shape, jnp.float32)
  elif tuple(z_init.shape) != shape:
    raise ValueError(f"z_init has shape {z_init.shape} but shape={shape}")

  def logsnr_at(i):
    t = jnp.asarray(i, jnp.float32) / num_steps
    return jnp.asarray(logsnr_fn(jnp.full((shape[0],), t, jnp.float32)), jnp.float32)

  return jnp.asarray(z_init, jnp.float32), loop_rng, logsnr_at


def step_to(sampler: str, eta, pred: process.Prediction, z, i, logsnr_at, loop_rng):
  """One step from t = i/N to s = (i-1)/N: ancestral, or DDIM with `eta` (noise drawn from
  loop_rng folded with i when the step is stochastic). The multi-evaluation solvers (heun,
  dpmpp_2m, pc) are whole loops, not steps: they go through `sample` only."""
  if sampler not in STEP_SAMPLERS:
    raise ValueError(f"sampler {sampler!r} is not a one-step rule; step_to takes one of "
                     f"{STEP_SAMPLERS} (use samplers.sample for {sampler!r})")
  stochastic = sampler == "ancestral" or not (isinstance(eta, (int, float)) and eta == 0)
  noise = (jax.random.normal(jax.random.fold_in(loop_rng, i), z.shape, jnp.float32)
           if stochastic else None)
  if sampler == "ancestral":
    return ancestral_step(pred, z, logsnr_at(i), logsnr_at(i - 1), noise)
  return ddim_step(pred, z, logsnr_at(i), logsnr_at(i - 1), eta, noise)
