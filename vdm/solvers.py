"""Step rules and solvers behind `vdm.samplers.sample`: DDIM and ancestral steps, and the
solvers people expect beside them: EDM's Heun sampler, DPM-Solver++(2M) and the score SDE's
predictor-corrector sampler.

Every solver takes `predict(z, logsnr [B], x_self) -> process.Prediction`, the denoiser with
its cond, x-hat hook and self-conditioning already bound by `samplers.sample` (`x_self` is the
latest x-hat, zeros before the first evaluation; the solvers pass it along and `predict`
ignores it unless self-conditioning is on), and `logsnr_at(i)`, logsnr [B] at t = i / N on
samplers.sample's grid (i = N: t = 1, the prior; i = 0: t = 0). Each solver is one
`jax.lax.fori_loop` and returns the x-hat of its last evaluation, like samplers.sample.

`num_steps` is the budget of denoiser evaluations (NFE). DDIM, ancestral and DPM-Solver++(2M)
spend exactly num_steps; Heun and PC take the largest grid that fits (`heun_levels`,
`pc_levels`), so they may spend one or a few fewer: `samplers.nfe` gives the exact count.

Notation (shared/DESIGN.md): z_t = alpha_t x + sigma_t eps, alpha^2 = sigmoid(logsnr),
sigma^2 = sigmoid(-logsnr); a step goes from t to an earlier s < t (logsnr_s > logsnr_t).
"""

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from vdm import process

GRIDS = ("t", "logsnr")


@dataclasses.dataclass(frozen=True)
class SolverOptions:
  """Options of the solvers (hashable, so a jitted sampler can take them as static).

  churn, s_tmin, s_tmax, s_noise, rho: EDM's S_churn, S_tmin, S_tmax, S_noise and rho
    (Karras et al. 2022, Algorithm 2 and eq. 5), in EDM's sigma = exp(-logsnr / 2);
    churn 0 is the deterministic Heun sampler.
  snr, corrector_steps: the PC sampler's Langevin signal-to-noise ratio r and number of
    corrector steps per level (Song et al. 2021, Algorithm 5); 0 steps is ancestral sampling.
  grid: DPM-Solver++(2M)'s evaluation points: "t" (samplers.sample's t_i = i / N through
    logsnr_fn) or "logsnr" (uniform in logsnr between logsnr_fn(1) and logsnr_fn(0)).
  """
  churn: float = 0.0
  s_tmin: float = 0.0
  s_tmax: float = math.inf
  s_noise: float = 1.0
  rho: float = 7.0
  snr: float = 0.16
  corrector_steps: int = 1
  grid: str = "t"

  def __post_init__(self):
    checks = [(self.churn >= 0, "churn must be >= 0 (0: deterministic Heun)"),
              (self.s_noise >= 0, "s_noise must be >= 0"),
              (0 <= self.s_tmin <= self.s_tmax, "need 0 <= s_tmin <= s_tmax"),
              (self.rho > 0, "rho must be > 0 (EDM uses 7)"),
              (self.snr > 0, "snr must be > 0 (Song et al. use 0.16 for VP)"),
              (isinstance(self.corrector_steps, int) and self.corrector_steps >= 0,
               "corrector_steps must be an int >= 0"),
              (self.grid in GRIDS, f"grid must be one of {GRIDS}")]
    for ok, message in checks:
      if not ok:
        raise ValueError(f"bad solver options {self}: {message}")

  @classmethod
  def of(cls, value: "SolverOptions | Mapping[str, Any] | None") -> "SolverOptions":
    """Options from None (the defaults), a dict or ConfigDict of some fields, or options."""
    if value is None or isinstance(value, cls):
      return value or cls()
    value = value.to_dict() if hasattr(value, "to_dict") else dict(value)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(known))
    if unknown:
      raise ValueError(f"unknown solver option(s) {unknown}; the options are {known}")
    return cls(**value)


# --- single steps (pure functions) ----------------------------------------------------------


def _posterior_fraction(logsnr_t, logsnr_s):
  """c = 1 - SNR_t / SNR_s = -expm1(logsnr_t - logsnr_s), stable when the two are close.

  c is the fraction of sigma_s^2 that the true posterior q(z_s | z_t, x) keeps as variance:
  Var[z_s | z_t, x] = sigma_s^2 * c (VDM, Kingma et al. 2021, appendix A)."""
  return -jnp.expm1(logsnr_t - logsnr_s)


def is_zero(eta):
  """True if `eta` is concretely zero; False if it is nonzero or traced (unknown)."""
  try:
    return float(eta) == 0.0
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, TypeError):
    return False


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
  if noise is None and not is_zero(eta):
    raise ValueError("ddim_step with eta > 0 (or a traced eta) needs `noise`, a standard "
                     "normal array shaped like z_t")
  eta = jnp.asarray(eta, x.dtype)
  z_s = alpha_s * x + sigma_s * jnp.sqrt(jnp.maximum(1.0 - eta**2 * c, 0.0)) * eps
  if noise is None:
    return z_s
  return z_s + eta * sigma_s * jnp.sqrt(c) * noise


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


def _noise(rng, i, like):
  return jax.random.normal(jax.random.fold_in(rng, i), like.shape, jnp.float32)


# --- EDM's Heun sampler (Karras et al. 2022, Algorithm 2) -----------------------------------


def heun_levels(num_steps: int) -> int:
  """EDM's N (noise levels) within a budget of num_steps evaluations: N Heun steps cost
  2 N - 1 evaluations (the last, to sigma = 0, is one evaluation), so N = (num_steps + 1) // 2."""
  return (num_steps + 1) // 2


def edm_sigmas(sigma_min, sigma_max, n: int, rho: float):
  """EDM eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
  for i = 0 .. n-1 (n = 1: sigma_max alone); sigma_min/max of any shape, stacked first."""
  if n == 1:
    return sigma_max[None]
  frac = (jnp.arange(n, dtype=jnp.float32) / (n - 1)).reshape((n,) + (1,) * sigma_max.ndim)
  a, b = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
  return (a + frac * (b - a)) ** rho


def heun(predict: Callable, logsnr_at: Callable, z_init, rng, *, num_steps: int,
         options: SolverOptions):
  """EDM's stochastic (churn > 0) or deterministic (churn = 0) Heun sampler.

  EDM's scaled variables for the VP process: x~ = z / alpha and sigma~ = sigma / alpha =
  exp(-logsnr / 2), so x~ = x + sigma~ eps and the probability-flow ODE is
  dx~/dsigma~ = (x~ - x_hat) / sigma~ (EDM eq. 4 with s(t) = 1). The denoiser is called at
  z = alpha x~ with logsnr = -2 log sigma~. The levels are EDM's (eq. 5) between
  sigma~_max = exp(-logsnr_fn(1) / 2) and sigma~_min = exp(-logsnr_fn(0) / 2);
  x~ starts at z_init / alpha_max (z_1 of the VP prior).

  Each of the N - 1 steps from sigma_i to sigma_{i+1}: churn (raise the noise to
  sigma_hat = (1 + gamma_i) sigma_i, gamma_i = min(S_churn / N, sqrt(2) - 1) where
  S_tmin <= sigma_i <= S_tmax, by adding sqrt(sigma_hat^2 - sigma_i^2) S_noise noise), an
  Euler step to sigma_{i+1} and Heun's correction (2 evaluations). The last step, from
  sigma_{N-1} = sigma~_min to 0, is EDM's Euler step, whose result x~ + (0 - sigma_hat) d is
  exactly x_hat(x~, sigma_hat): we return that x-hat (1 evaluation), like samplers.sample.
  With churn and S_tmax >= sigma~_max (the default S_tmax is inf, as in EDM's generate.py)
  the first level is raised above sigma~_max, below the logsnr range the schedule was
  trained on; an S_tmax under sigma~_max keeps every evaluation inside it.
  """
  o = options
  n = heun_levels(num_steps)
  sigma_of = lambda logsnr: jnp.exp(-0.5 * logsnr)
  sigmas = edm_sigmas(sigma_of(logsnr_at(0)), sigma_of(logsnr_at(num_steps)), n, o.rho)
  gamma_max = min(o.churn / n, math.sqrt(2.0) - 1.0)

  def denoise(x, sigma, x_self):    # x-hat of x~ at sigma~ (both per example)
    logsnr = -2.0 * jnp.log(sigma)
    alpha, _ = process.alpha_sigma(process.per_example(logsnr, x))
    return predict(alpha * x, logsnr, x_self).x

  def churn(x, i):                  # (x~ at sigma_hat, sigma_hat): EDM Algorithm 2, lines 4-6
    sigma = sigmas[i]
    if o.churn == 0:
      return x, sigma
    gamma = jnp.where((sigma >= o.s_tmin) & (sigma <= o.s_tmax), gamma_max, 0.0)
    # sqrt(sigma_hat^2 - sigma^2), written so that it is exactly 0 (not sqrt of a rounding
    # residual, possibly negative) where gamma = 0.
    extra = process.per_example(sigma * jnp.sqrt(gamma * (2.0 + gamma)), x)
    return x + extra * o.s_noise * _noise(rng, i, x), sigma * (1.0 + gamma)

  def step(i, carry):               # Algorithm 2, lines 7-10: Euler, then Heun's correction
    x, x_self = carry
    x_hat, sigma_hat = churn(x, i)
    sigma_next = sigmas[i + 1]
    col = lambda a: process.per_example(a, x)
    d0 = denoise(x_hat, sigma_hat, x_self)
    slope = (x_hat - d0) / col(sigma_hat)
    x_euler = x_hat + col(sigma_next - sigma_hat) * slope
    d1 = denoise(x_euler, sigma_next, d0)
    slope_next = (x_euler - d1) / col(sigma_next)
    return x_hat + col(sigma_next - sigma_hat) * 0.5 * (slope + slope_next), d1

  alpha_max, _ = process.alpha_sigma(process.per_example(logsnr_at(num_steps), z_init))
  x, x_self = jax.lax.fori_loop(0, n - 1, step,
                                (z_init / alpha_max, jnp.zeros_like(z_init)))
  x_hat, sigma_hat = churn(x, n - 1)
  return denoise(x_hat, sigma_hat, x_self)


# --- DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) -----------------------------------------


def logsnr_uniform(logsnr_at: Callable, num_steps: int) -> Callable:
  """The grid uniform in logsnr with samplers.sample's indexing: logsnr at i is
  logsnr_fn(1) + (1 - i / N) (logsnr_fn(0) - logsnr_fn(1)) (i = N: t = 1; i = 0: t = 0)."""
  lo, hi = logsnr_at(num_steps), logsnr_at(0)
  return lambda i: lo + (1.0 - jnp.asarray(i, jnp.float32) / num_steps) * (hi - lo)


def dpmpp_2m(predict: Callable, logsnr_at: Callable, z_init, *, num_steps: int):
  """DPM-Solver++(2M): the multistep second-order solver of the probability-flow ODE in
  lambda = logsnr / 2 with the data prediction x-hat.

  Evaluations at logsnr_at(N), ..., logsnr_at(1) (N = num_steps). Step k from t_i to
  t_{i-1}, h = lambda_{i-1} - lambda_i (Lu et al., Algorithm 2):

    D = x_i                                                  (first step: DDIM)
    D = (1 + 1 / (2 r)) x_i - 1 / (2 r) x_{i+1},  r = h_prev / h   (later steps)
    z_{i-1} = (sigma_{i-1} / sigma_i) z_i - alpha_{i-1} expm1(-h) D.

  The last evaluation, at i = 1, returns its x-hat (a first-order step to sigma = 0, as in
  samplers.sample), so N evaluations in all. The previous x-hat that the multistep formula
  needs is the one self-conditioning passes too, so one carry serves both.
  """
  def step(k, carry):
    z, x_prev, h_prev = carry
    i = num_steps - k
    logsnr_t, logsnr_s = logsnr_at(i), logsnr_at(i - 1)
    x = predict(z, logsnr_t, x_prev).x
    h = 0.5 * (logsnr_s - logsnr_t)
    two_r = process.per_example(2.0 * h_prev / h, x)
    d = jnp.where(k == 0, x, (1.0 + 1.0 / two_r) * x - x_prev / two_r)
    col = lambda a: process.per_example(a, z)
    # sigma_s / sigma_t in log space: log sigma^2 = log_sigmoid(-logsnr).
    ratio = jnp.exp(0.5 * (jax.nn.log_sigmoid(-logsnr_s) - jax.nn.log_sigmoid(-logsnr_t)))
    alpha_s, _ = process.alpha_sigma(col(logsnr_s))
    return col(ratio) * z - alpha_s * col(jnp.expm1(-h)) * d, x, h

  ones = jnp.ones(z_init.shape[:1], jnp.float32)
  z, x_prev, _ = jax.lax.fori_loop(0, num_steps - 1, step,
                                   (z_init, jnp.zeros_like(z_init), ones))
  return predict(z, logsnr_at(1), x_prev).x


# --- predictor-corrector sampling (Song et al. 2021, "Score-Based Generative Modeling
# --- through SDEs", Algorithms 2 and 5) -----------------------------------------------------


def pc_levels(num_steps: int, corrector_steps: int) -> int:
  """Noise levels N within num_steps evaluations: N predictor evaluations and
  corrector_steps Langevin evaluations at each of the N - 1 levels stepped to."""
  return (num_steps + corrector_steps) // (corrector_steps + 1)


def langevin_step(z, score, noise, snr: float, alpha):
  """Song et al.'s corrector for the VP SDE (Algorithm 5, lines 6-8), per example:

    eps = 2 alpha (r ||noise|| / ||score||)^2,   z <- z + eps score + sqrt(2 eps) noise,

  norms over each example's entries (Song et al.'s code averages them over the batch). alpha
  [B] is the DDPM alpha_i = 1 - beta_i of the level."""
  norm = lambda a: jnp.sqrt(jnp.sum(jnp.square(a).reshape(a.shape[0], -1), axis=-1))
  step = 2.0 * alpha * (snr * norm(noise) / norm(score)) ** 2
  step = process.per_example(step, z)
  return z + step * score + jnp.sqrt(2.0 * step) * noise


def pc(predict: Callable, logsnr_at: Callable, z_init, rng, *, num_steps: int,
       options: SolverOptions):
  """Predictor-corrector sampling on samplers.sample's grid t_i = i / N,
  N = pc_levels(num_steps, corrector_steps).

  Each of the N - 1 steps from t_i to t_{i-1}: the predictor is the ancestral step (Song et
  al.'s ancestral predictor for VP; its noise is ancestral sampling's, so corrector_steps = 0
  gives the "ancestral" sampler's numbers), then `corrector_steps` Langevin steps at t_{i-1}
  with the score -eps_hat / sigma and the SNR step-size rule. alpha_i = 1 - beta_i of the
  discrete VP chain is alpha-bar_{i-1} / alpha-bar_{i-2} = sigmoid(logsnr_{i-1}) /
  sigmoid(logsnr_{i-2}), the next level on the grid (t = 0 for the last). The last
  evaluation, at t_1, returns its x-hat.
  """
  corrector_steps = options.corrector_steps
  n = pc_levels(num_steps, corrector_steps)
  level = lambda i: logsnr_at(jnp.asarray(i, jnp.float32) * (num_steps / n))  # t = i / n

  def step(k, carry):
    z, x_self = carry
    i = n - k
    logsnr_t, logsnr_s = level(i), level(i - 1)
    pred = predict(z, logsnr_t, x_self)
    z, x_self = ancestral_step(pred, z, logsnr_t, logsnr_s, _noise(rng, i, z)), pred.x
    alpha = jnp.exp(jax.nn.log_sigmoid(logsnr_s) - jax.nn.log_sigmoid(level(i - 2)))
    _, sigma_s = process.alpha_sigma(process.per_example(logsnr_s, z))
    for j in range(corrector_steps):
      pred = predict(z, logsnr_s, x_self)
      noise = _noise(jax.random.fold_in(rng, i), j + 1, z)
      z, x_self = langevin_step(z, -pred.eps / sigma_s, noise, options.snr, alpha), pred.x
    return z, x_self

  z, x_self = jax.lax.fori_loop(0, n - 1, step, (z_init, jnp.zeros_like(z_init)))
  return predict(z, level(1), x_self).x
