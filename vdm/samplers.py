"""Samplers for any denoiser: DDIM (deterministic or stochastic) and VDM ancestral sampling.

Interfaces (shared with guidance, distillation and the cascade):
- `denoise_fn(z, logsnr, cond) -> process.Prediction`, with `logsnr` of shape [B] and `cond`
  an arbitrary pytree passed through untouched (may be None).
- `logsnr_fn(t) -> logsnr`: a pure, strictly decreasing function of t in [0, 1] (t=0 data,
  t=1 noise), finite on the whole interval. It is called with t of shape [B]. Learned
  schedules are passed as closures over their parameters.
- `clip_x(x_hat) -> x_hat`: a post-processing hook on x-hat (`no_clip`, `static_clip(lo, hi)`,
  `dynamic_threshold(p)`; `clip_hook(name)` picks one by config name). eps-hat and v-hat are
  then recomputed from the clipped x-hat and z_t (`process.from_x`), so every step sees a self-consistent prediction.

Notation (shared/DESIGN.md): z_t = alpha_t x + sigma_t eps, alpha^2 = sigmoid(logsnr),
sigma^2 = sigmoid(-logsnr). A step goes from time t to an earlier time s < t
(logsnr_s > logsnr_t). Both step rules are built from one quantity,

  c = 1 - exp(logsnr_t - logsnr_s) = -expm1(logsnr_t - logsnr_s)  in [0, 1),

which is the fraction of sigma_s^2 that the true posterior q(z_s | z_t, x) keeps as variance:
Var[z_s | z_t, x] = sigma_s^2 * c (VDM, Kingma et al. 2021, appendix A).
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

from vdm import process

SAMPLERS = ("ddim", "ancestral")


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


# --- single steps (pure functions) ----------------------------------------------------------


def _posterior_fraction(logsnr_t, logsnr_s):
  """c = 1 - SNR_t / SNR_s = -expm1(logsnr_t - logsnr_s), stable when the two are close."""
  return -jnp.expm1(logsnr_t - logsnr_s)


def ddim_step(pred: process.Prediction, z_t, logsnr_t, logsnr_s, eta=0.0, noise=None):
  """One DDIM update from t to s < t (Song et al. 2021, "Denoising Diffusion Implicit Models").

  DDIM eq. 12, with alpha-bar_t = alpha_t^2 = sigmoid(logsnr_t):

    z_s = alpha_s x_hat + sqrt(sigma_s^2 - sigma_eta^2) eps_hat + sigma_eta noise,
    sigma_eta^2 = eta^2 (sigma_s^2 / sigma_t^2) (1 - alpha_t^2 / alpha_s^2)    (DDIM eq. 16).

  For the variance-preserving process sigma_eta^2 = eta^2 sigma_s^2 c with
  c = -expm1(logsnr_t - logsnr_s), so the update is computed as

    z_s = alpha_s x_hat + sigma_s sqrt(1 - eta^2 c) eps_hat + eta sigma_s sqrt(c) noise,

  which never subtracts two nearly equal variances. eta = 0 is deterministic DDIM; eta = 1
  has the variance of the true posterior q(z_s | z_t, x) and equals `ancestral_step` when
  `pred` is consistent with z_t (z_t = alpha_t x_hat + sigma_t eps_hat). `z_t` itself does not
  enter eq. 12; it is an argument so that all step rules share one signature.

  Args:
    pred: prediction at (z_t, logsnr_t), already clipped if wanted.
    z_t: current latent, shape [B, ...].
    logsnr_t, logsnr_s: shape [B] (or scalars), logsnr_s > logsnr_t.
    eta: in [0, 1].
    noise: standard normal of z_t's shape; may be None only when eta == 0.
  """
  del z_t  # Eq. 12 uses only x-hat and eps-hat.
  if isinstance(eta, (int, float)) and not 0.0 <= eta <= 1.0:
    raise ValueError(f"DDIM eta must lie in [0, 1] (0 deterministic, 1 ancestral), got {eta}")
  x, eps = pred.x, pred.eps
  logsnr_t, logsnr_s = process.per_example(logsnr_t, x), process.per_example(logsnr_s, x)
  alpha_s, sigma_s = process.alpha_sigma(logsnr_s)
  c = _posterior_fraction(logsnr_t, logsnr_s)
  if noise is None and not _is_zero(eta):
    raise ValueError("ddim_step with eta > 0 (or a traced eta) needs `noise`, a standard "
                     "normal array shaped like z_t")
  eta = jnp.asarray(eta, x.dtype)
  z_s = alpha_s * x + sigma_s * jnp.sqrt(jnp.maximum(1.0 - eta**2 * c, 0.0)) * eps
  if noise is None:
    return z_s
  return z_s + eta * sigma_s * jnp.sqrt(c) * noise


def _is_zero(eta):
  """True if `eta` is concretely zero; False if it is nonzero or traced (unknown)."""
  try:
    return float(eta) == 0.0
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, TypeError):
    return False


def ancestral_step(pred: process.Prediction, z_t, logsnr_t, logsnr_s, noise):
  """Samples p(z_s | z_t) = q(z_s | z_t, x = x_hat) (VDM, Kingma et al. 2021, appendix A).

  The posterior of the forward process is Gaussian with

    mean = (alpha_{t|s} sigma_s^2 / sigma_t^2) z_t + (alpha_s sigma_{t|s}^2 / sigma_t^2) x,
    var  = sigma_{t|s}^2 sigma_s^2 / sigma_t^2,

  where alpha_{t|s} = alpha_t / alpha_s and sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2.
  In logsnr form, with c = sigma_{t|s}^2 / sigma_t^2 = -expm1(logsnr_t - logsnr_s):

    mean = exp(logsnr_t - logsnr_s) (alpha_s / alpha_t) z_t + c alpha_s x_hat,
    var  = c sigma_s^2.

  The z_t coefficient is evaluated in log space with log alpha^2 = log_sigmoid(logsnr)
  (a softplus), so it stays finite when alpha_t is tiny (logsnr_t ~ -20).
  """
  x = pred.x
  logsnr_t, logsnr_s = process.per_example(logsnr_t, x), process.per_example(logsnr_s, x)
  alpha_s, sigma_s = process.alpha_sigma(logsnr_s)
  c = _posterior_fraction(logsnr_t, logsnr_s)
  log_coef_z = (logsnr_t - logsnr_s) + 0.5 * (jax.nn.log_sigmoid(logsnr_s) -
                                              jax.nn.log_sigmoid(logsnr_t))
  mean = jnp.exp(log_coef_z) * z_t + c * alpha_s * x
  return mean + jnp.sqrt(c) * sigma_s * noise


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
           z_init=None):
  """Draws samples x from noise on the uniform grid t_i = i / num_steps, i = N .. 1.

  Steps i = N, ..., 2 move z from t = i/N to s = (i-1)/N with the chosen rule; the last
  evaluation, at t = 1/N, returns the (clipped) x-hat instead of stepping to t = 0 (as in VDM
  and progressive distillation: at t -> 0 the best estimate of x given z is x-hat). So
  `num_steps` is the number of denoiser evaluations, and logsnr_fn(0) is never needed.

  The loop is one `jax.lax.fori_loop`, so under `jax.jit` (with `num_steps`, `sampler`,
  `clip_x`, `denoise_fn`, `logsnr_fn` static) the whole run is one compiled program.

  Args:
    denoise_fn: (z, logsnr [B], cond) -> process.Prediction.
    logsnr_fn: t [B] -> logsnr [B], strictly decreasing.
    shape: output shape, batch first.
    rng: PRNG key for z_init (if not given) and the per-step noise.
    num_steps: number of denoiser evaluations (>= 1).
    sampler: "ddim" or "ancestral".
    eta: DDIM stochasticity in [0, 1]; ignored by "ancestral".
    clip_x: x-hat hook, applied at every step and to the returned x.
    cond: conditioning pytree passed to denoise_fn.
    z_init: starting latent at t = 1; by default z_1 ~ N(0, I), the VP prior.

  Returns:
    x of `shape`, float32.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
  if not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"num_steps must be a positive Python int (static under jit), "
                     f"got {num_steps!r}")
  shape = tuple(shape)
  z_init, loop_rng, logsnr_at = loop_start(rng, shape, z_init, logsnr_fn, num_steps)

  def predict(z, logsnr):
    return clip_prediction(denoise_fn(z, logsnr, cond), z, logsnr, clip_x)

  def body(k, z):
    i = num_steps - k  # k = 0 .. N-2 steps from t = i/N to s = (i-1)/N.
    return step_to(sampler, eta, predict(z, logsnr_at(i)), z, i, logsnr_at, loop_rng)

  z = jax.lax.fori_loop(0, num_steps - 1, body, z_init)
  return predict(z, logsnr_at(1)).x


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
  loop_rng folded with i when the step is stochastic)."""
  stochastic = sampler == "ancestral" or not (isinstance(eta, (int, float)) and eta == 0)
  noise = (jax.random.normal(jax.random.fold_in(loop_rng, i), z.shape, jnp.float32)
           if stochastic else None)
  if sampler == "ancestral":
    return ancestral_step(pred, z, logsnr_at(i), logsnr_at(i - 1), noise)
  return ddim_step(pred, z, logsnr_at(i), logsnr_at(i - 1), eta, noise)
