"""Tests for vdm/samplers.py against independent references.

References: the DDIM paper's eq. 12/16 written with alpha-bar (numpy, float64), the
`diffusers.DDIMScheduler` implementation, Gaussian conditioning of the forward process
(numpy), and exact denoisers of distributions whose sampling result is known (point masses,
Gaussians).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import process
from vdm import samplers

# --- schedules and exact denoisers, written here so the tests do not depend on vdm.schedules --


def linear_gamma(t, gamma_min=-13.3, gamma_max=5.0):
  return -(gamma_min + (gamma_max - gamma_min) * t)


def clipped_cosine(t, logsnr_min=-20.0, logsnr_max=20.0):
  """-2 log tan(pi t / 2), with t mapped onto the angles giving logsnr in [min, max]."""
  b = math.atan(math.exp(-0.5 * logsnr_max))
  a = math.atan(math.exp(-0.5 * logsnr_min)) - b
  return -2.0 * jnp.log(jnp.tan(a * t + b))


SCHEDULES = {"linear_gamma": linear_gamma, "cosine": clipped_cosine}


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _col(a, like):
  return jnp.reshape(a, a.shape + (1,) * (like.ndim - a.ndim))


def gaussian_denoiser(mu, s):
  """Exact E[x | z_t] and E[eps | z_t] for x ~ N(mu, s^2) per dimension (linear in z)."""

  def denoise(z, logsnr, cond):
    del cond
    alpha, sigma = process.alpha_sigma(_col(logsnr, z))
    var_z = alpha**2 * s**2 + sigma**2
    x = mu + alpha * s**2 * (z - alpha * mu) / var_z
    eps = sigma * (z - alpha * mu) / var_z
    return process.Prediction(x=x, eps=eps, v=alpha * eps - sigma * x)

  return denoise


def point_mass_denoiser(x0):
  """Exact denoiser of a point mass at x0: x-hat = x0, eps-hat from z."""

  def denoise(z, logsnr, cond):
    del cond
    return process.from_x(z, jnp.broadcast_to(x0, z.shape), logsnr)

  return denoise


def two_point_denoiser(w):
  """Exact denoiser of x in {-1, +1} with P(+1) = w: E[x|z] = tanh(alpha z / sigma^2 + logit/2)."""

  def denoise(z, logsnr, cond):
    del cond
    alpha, sigma = process.alpha_sigma(_col(logsnr, z))
    x = jnp.tanh(alpha * z / sigma**2 + 0.5 * math.log(w / (1 - w)))
    return process.from_x(z, x, logsnr)

  return denoise


def np_ddim_eq12(z_t, eps, abar_t, abar_s, eta, noise):
  """DDIM eq. 12 and 16 (Song et al. 2021) in the paper's alpha-bar notation, float64."""
  x0 = (z_t - np.sqrt(1 - abar_t) * eps) / np.sqrt(abar_t)
  sig = eta * np.sqrt((1 - abar_s) / (1 - abar_t)) * np.sqrt(1 - abar_t / abar_s)
  return np.sqrt(abar_s) * x0 + np.sqrt(1 - abar_s - sig**2) * eps + sig * noise, sig


# --- single steps ---------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_paper_eq12(eta):
  rng = np.random.default_rng(0)
  b = 6
  logsnr_t = rng.uniform(-8, 6, size=b).astype(np.float32)
  logsnr_s = logsnr_t + rng.uniform(0.05, 4, size=b).astype(np.float32)
  z_t = rng.normal(size=(b, 5)).astype(np.float32)
  eps = rng.normal(size=(b, 5)).astype(np.float32)
  noise = rng.normal(size=(b, 5)).astype(np.float32)
  pred = process.predict(jnp.asarray(z_t), jnp.asarray(logsnr_t), jnp.asarray(eps), "eps")
  got = samplers.ddim_step(pred, z_t, logsnr_t, logsnr_s, eta, noise)
  got_mean = samplers.ddim_step(pred, z_t, logsnr_t, logsnr_s, eta, np.zeros_like(noise))
  abar_t, abar_s = np_sigmoid(logsnr_t)[:, None], np_sigmoid(logsnr_s)[:, None]
  want, sig = np_ddim_eq12(z_t, eps, abar_t, abar_s, eta, noise)
  want_mean, _ = np_ddim_eq12(z_t, eps, abar_t, abar_s, eta, 0 * noise)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(got_mean, want_mean, rtol=2e-5, atol=2e-5)
  # The stochastic part: its scale is the paper's sigma_t(eta) (eq. 16).
  np.testing.assert_allclose((got - got_mean), sig * noise, rtol=2e-5, atol=2e-6)
  if eta > 0:
    assert np.all(sig > 1e-3)  # so the check above is not vacuous


def test_ddim_step_matches_diffusers():
  # diffusers is optional: `pip install torch==2.13.0 diffusers` (CPU wheel). It is the most
  # widely used published DDIM implementation; we give it our alpha-bars through trained_betas.
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  n_train, n_infer = 1000, 10
  t = (np.arange(n_train) + 1) / n_train
  abar = np_sigmoid(-(-13.3 + 18.3 * t))
  betas = 1 - abar / np.concatenate([[1.0], abar[:-1]])
  sched = diffusers.DDIMScheduler(num_train_timesteps=n_train, trained_betas=betas,
                                  clip_sample=False, prediction_type="epsilon",
                                  set_alpha_to_one=True, steps_offset=0)
  sched.set_timesteps(n_infer)
  abar_used = sched.alphas_cumprod.double().numpy()  # float32 cumprod of our betas
  logsnr_of = lambda k: np.float32(np.log(abar_used[k]) - np.log1p(-abar_used[k]))
  rng = np.random.default_rng(1)
  checked = 0
  for eta in (0.0, 0.3, 1.0):
    for timestep in sched.timesteps.numpy():
      prev = timestep - n_train // n_infer
      if prev < 0:
        continue  # diffusers then steps to alpha-bar = 1, which our sampler never does.
      z_t = rng.normal(size=(2, 3, 4)).astype(np.float32)
      eps = rng.normal(size=(2, 3, 4)).astype(np.float32)
      noise = rng.normal(size=(2, 3, 4)).astype(np.float32)
      want = sched.step(torch.from_numpy(eps), int(timestep), torch.from_numpy(z_t), eta=eta,
                        variance_noise=torch.from_numpy(noise)).prev_sample.numpy()
      l_t = np.full((2,), logsnr_of(timestep), np.float32)
      l_s = np.full((2,), logsnr_of(prev), np.float32)
      pred = process.predict(jnp.asarray(z_t), l_t, jnp.asarray(eps), "eps")
      got = samplers.ddim_step(pred, z_t, l_t, l_s, eta, noise)
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
      checked += 1
  assert checked == 27


def test_ancestral_step_is_gaussian_conditioning_of_forward_process():
  rng = np.random.default_rng(2)
  b = 8
  logsnr_t = rng.uniform(-15, 8, size=b)
  logsnr_s = logsnr_t + rng.uniform(0.01, 6, size=b)
  x = rng.normal(size=(b, 3))
  z_t = rng.normal(size=(b, 3))
  noise = rng.normal(size=(b, 3))
  # Joint of (z_s, z_t) given x: means alpha x, variances sigma^2, and
  # Cov(z_s, z_t) = (alpha_t / alpha_s) sigma_s^2 (z_t = alpha_{t|s} z_s + independent noise).
  a_s, a_t = np.sqrt(np_sigmoid(logsnr_s))[:, None], np.sqrt(np_sigmoid(logsnr_t))[:, None]
  s_s, s_t = np.sqrt(np_sigmoid(-logsnr_s))[:, None], np.sqrt(np_sigmoid(-logsnr_t))[:, None]
  cov = a_t / a_s * s_s**2
  want_mean = a_s * x + cov / s_t**2 * (z_t - a_t * x)
  want_std = np.sqrt(s_s**2 - cov**2 / s_t**2)

  f32 = lambda a: jnp.asarray(a, jnp.float32)
  pred = process.from_x(f32(z_t), f32(x), f32(logsnr_t))
  step = lambda n: np.asarray(
      samplers.ancestral_step(pred, f32(z_t), f32(logsnr_t), f32(logsnr_s), f32(n)), np.float64)
  mean = step(0 * noise)
  np.testing.assert_allclose(mean, want_mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(step(noise) - mean, want_std * noise, rtol=1e-4, atol=1e-5)


def test_ddim_eta_one_equals_ancestral():
  rng = np.random.default_rng(3)
  logsnr_t = jnp.asarray(rng.uniform(-10, 5, size=4), jnp.float32)
  logsnr_s = logsnr_t + 1.5
  z_t = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  noise = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  pred = process.predict(z_t, logsnr_t, jnp.asarray(rng.normal(size=(4, 6)), jnp.float32), "v")
  np.testing.assert_allclose(samplers.ddim_step(pred, z_t, logsnr_t, logsnr_s, 1.0, noise),
                             samplers.ancestral_step(pred, z_t, logsnr_t, logsnr_s, noise),
                             rtol=1e-4, atol=1e-5)


def test_static_clip_clips_x_and_recomputes_eps():
  rng = np.random.default_rng(4)
  z = jnp.asarray(3 * rng.normal(size=(4, 5)), jnp.float32)
  logsnr = jnp.asarray([-2.0, 0.0, 1.0, 3.0], jnp.float32)
  pred = process.predict(z, logsnr, 2.0 * z, "x")  # x-hat far outside [-1, 1]
  clipped = samplers.clip_prediction(pred, z, logsnr, samplers.static_clip(-1.0, 1.0))
  x_want = np.clip(2.0 * np.asarray(z), -1, 1)
  np.testing.assert_allclose(clipped.x, x_want)
  assert np.abs(np.asarray(pred.x)).max() > 2  # clipping had work to do
  a = np.sqrt(np_sigmoid(logsnr))[:, None]
  s = np.sqrt(np_sigmoid(-logsnr))[:, None]
  np.testing.assert_allclose(clipped.eps, (np.asarray(z) - a * x_want) / s, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(clipped.v, a * clipped.eps - s * x_want, rtol=1e-5, atol=1e-5)
  # no_clip leaves the prediction untouched.
  assert samplers.clip_prediction(pred, z, logsnr, samplers.no_clip) is pred
  with pytest.raises(ValueError, match="lo < hi"):
    samplers.static_clip(1.0, -1.0)


# --- full sampling loops --------------------------------------------------------------------


def np_ddim_loop(z, mu, s, schedule_np, num_steps, clip=None):
  """Reference DDIM (eta = 0) loop in numpy float64 with the Gaussian denoiser (eq. 12)."""
  z = np.asarray(z, np.float64)

  def denoise(z, abar):
    x0 = mu + np.sqrt(abar) * s**2 * (z - np.sqrt(abar) * mu) / (abar * s**2 + 1 - abar)
    if clip is not None:
      x0 = np.clip(x0, *clip)
    return x0, (z - np.sqrt(abar) * x0) / np.sqrt(1 - abar)

  for i in range(num_steps, 1, -1):
    abar_t, abar_s = np_sigmoid(schedule_np(i / num_steps)), np_sigmoid(
        schedule_np((i - 1) / num_steps))
    x0, eps = denoise(z, abar_t)
    z = np.sqrt(abar_s) * x0 + np.sqrt(1 - abar_s) * eps
  return denoise(z, np_sigmoid(schedule_np(1 / num_steps)))[0]


@pytest.mark.parametrize("clip", [None, (-1.0, 1.0)])
def test_sample_ddim_matches_numpy_loop(clip):
  # A gentle schedule (logsnr from 3 to -3), so that every grid point matters: x-hat at
  # t = 1/N and at t = 0 differ by far more than the tolerance.
  mu, s, n = 0.8, 0.5, 7
  schedule = lambda t: 3.0 - 6.0 * t
  z_init = jax.random.normal(jax.random.key(0), (16, 3))
  clip_x = samplers.no_clip if clip is None else samplers.static_clip(*clip)
  got = samplers.sample(gaussian_denoiser(mu, s), schedule, z_init.shape, jax.random.key(1),
                        num_steps=n, clip_x=clip_x, z_init=z_init)
  want = np_ddim_loop(z_init, mu, s, schedule, n, clip)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  if clip is not None:
    assert np.asarray(got).max() <= 1.0 and np.any(np.asarray(got) == 1.0)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("num_steps", [1, 3, 20])
@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_point_mass_lands_on_point(schedule, num_steps, sampler):
  x0 = jnp.asarray([0.3, -0.7, 0.9], jnp.float32)
  x = samplers.sample(point_mass_denoiser(x0), SCHEDULES[schedule], (5, 3), jax.random.key(0),
                      num_steps=num_steps, sampler=sampler)
  np.testing.assert_allclose(x, np.broadcast_to(x0, (5, 3)), atol=1e-5)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_ddim_step_keeps_point_mass_trajectory(schedule):
  # For a point mass, deterministic DDIM keeps eps fixed: z_s = alpha_s x0 + sigma_s eps0.
  x0 = jnp.asarray([[0.3, -0.7]], jnp.float32)
  eps0 = jnp.asarray([[1.1, 0.4]], jnp.float32)
  for t, s in [(1.0, 0.9), (0.5, 0.45), (0.1, 0.0)]:
    l_t, l_s = SCHEDULES[schedule](jnp.full((1,), t)), SCHEDULES[schedule](jnp.full((1,), s))
    z_t = process.diffuse(x0, l_t, eps0)
    z_s = samplers.ddim_step(point_mass_denoiser(x0)(z_t, l_t, None), z_t, l_t, l_s)
    np.testing.assert_allclose(z_s, process.diffuse(x0, l_s, eps0), atol=2e-5)


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.5), ("ancestral", 0.0)])
def test_two_point_masses_hit_points_with_right_weights(sampler, eta):
  w, n = 0.3, 20000
  x = samplers.sample(two_point_denoiser(w), linear_gamma, (n, 1), jax.random.key(5),
                      num_steps=100, sampler=sampler, eta=eta)
  x = np.asarray(x)
  np.testing.assert_allclose(np.abs(x), 1.0, atol=1e-4)  # every sample on a point
  frac = np.mean(x > 0)
  assert abs(frac - w) < 4 * math.sqrt(w * (1 - w) / n), frac


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ancestral", 0.0)])
def test_gaussian_data_moments(schedule, sampler, eta):
  mu, s, n = 0.7, 0.4, 20000
  # Start from the true marginal at t = 1, N(alpha_1 mu, alpha_1^2 s^2 + sigma_1^2): at
  # logsnr(1) = -5 (linear gamma) N(0, I) would bias the mean by about s alpha_1 mu = 0.02.
  alpha_1, sigma_1 = process.alpha_sigma(SCHEDULES[schedule](jnp.float32(1.0)))
  z_init = alpha_1 * mu + jnp.sqrt(alpha_1**2 * s**2 + sigma_1**2) * jax.random.normal(
      jax.random.key(6), (n // 4, 4))
  sample_fn = jax.jit(functools.partial(
      samplers.sample, gaussian_denoiser(mu, s), SCHEDULES[schedule], (n // 4, 4),
      num_steps=500, sampler=sampler, eta=eta))
  x = np.asarray(sample_fn(jax.random.key(7), z_init=z_init), np.float64).ravel()
  # 4 standard errors: of the mean s / sqrt(n), of the std s / sqrt(2 n); plus the
  # discretization error, far below these at 500 steps.
  assert abs(x.mean() - mu) < 4 * s / math.sqrt(n) + 1e-3, x.mean()
  assert abs(x.std() - s) < 4 * s / math.sqrt(2 * n) + 1e-3, x.std()


def test_jit_equals_eager_and_validation():
  den = gaussian_denoiser(0.1, 0.9)
  kw = dict(num_steps=6, sampler="ddim", eta=0.5)
  eager = samplers.sample(den, clipped_cosine, (3, 2), jax.random.key(2), **kw)
  jitted = jax.jit(functools.partial(samplers.sample, den, clipped_cosine, (3, 2), **kw))(
      jax.random.key(2))
  np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="unknown sampler"):
    samplers.sample(den, clipped_cosine, (3, 2), jax.random.key(0), num_steps=2, sampler="pndm")
  with pytest.raises(ValueError, match="eta"):
    samplers.sample(den, clipped_cosine, (3, 2), jax.random.key(0), num_steps=2, eta=1.5)
  with pytest.raises(ValueError, match="num_steps"):
    samplers.sample(den, clipped_cosine, (3, 2), jax.random.key(0), num_steps=0)
