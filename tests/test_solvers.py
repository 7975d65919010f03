"""Tests for the solvers of vdm/solvers.py, reached through `samplers.sample`.

References: a Gaussian toy (x ~ N(mu, s^2) per dimension) whose denoiser and probability-flow
ODE solution are known in closed form (the closed form is itself checked against a numpy
RK4 integration), the order of convergence each solver must show against it, the moments of
the toy's distribution, the stationary variance of the discretized Langevin chain, and
hand-written loops for self-conditioning.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import process, samplers, self_conditioning, solvers

MU, S = 0.2, 0.6


def vdm_linear(t):
  """VDM's fixed schedule, gamma from -13.3 to 5: logsnr from 13.3 (t = 0) to -5 (t = 1)."""
  return 13.3 - 18.3 * t


def linear_6(t):
  return 6.0 - 12.0 * t


def cosine_10(t, logsnr_min=-10.0, logsnr_max=10.0):
  b = math.atan(math.exp(-0.5 * logsnr_max))
  a = math.atan(math.exp(-0.5 * logsnr_min)) - b
  return -2.0 * jnp.log(jnp.tan(a * t + b))


def gaussian_denoiser(mu=MU, s=S, parameterization="v"):
  """Exact E[x | z_t] for x ~ N(mu, s^2), handed to the sampler as a network output in the
  given parameterization (so that each solver is run through process.predict)."""

  def denoise(z, logsnr, cond):
    del cond
    alpha, sigma = process.alpha_sigma(process.per_example(logsnr, z))
    var_z = alpha**2 * s**2 + sigma**2
    x = mu + alpha * s**2 * (z - alpha * mu) / var_z
    eps = sigma * (z - alpha * mu) / var_z
    out = {"x": x, "eps": eps, "v": alpha * eps - sigma * x}[parameterization]
    return process.predict(z, logsnr, out, parameterization)

  return denoise


def exact_x_hat(z_1, logsnr_1, logsnr_e, mu=MU, s=S):
  """x-hat at logsnr_e on the exact probability-flow ODE path from z_1 at logsnr_1 (float64).

  In EDM's variables x~ = z / alpha, sigma~ = exp(-logsnr / 2) the marginal of x~ is
  N(mu, s^2 + sigma~^2) and the ODE dx~/dsigma~ = (x~ - x_hat) / sigma~ with
  x_hat = mu + s^2 (x~ - mu) / (s^2 + sigma~^2) reads d(x~ - mu)/dsigma~ =
  sigma~ (x~ - mu) / (s^2 + sigma~^2), so x~ - mu = u sqrt(s^2 + sigma~^2) with u fixed.
  At sigma~ -> 0 this is x_0 = mu + s (z_1 - alpha_1 mu) / sqrt(alpha_1^2 s^2 + sigma_1^2).
  """
  sig_1, sig_e = math.exp(-0.5 * logsnr_1), math.exp(-0.5 * logsnr_e)
  u = (np.asarray(z_1, np.float64) * math.sqrt(1.0 + sig_1**2) - mu) / math.sqrt(s**2 + sig_1**2)
  return mu + s**2 * u / math.sqrt(s**2 + sig_e**2)


def test_exact_solution_matches_numerical_ode():
  # RK4 in log sigma~ on dx~/dlog sigma~ = x~ - x_hat(x~), 4000 steps, float64.
  z_1 = np.linspace(-2.0, 2.0, 9)
  logsnr_1, logsnr_e = -5.0, 9.0
  x = z_1 * math.sqrt(1.0 + math.exp(-logsnr_1))      # x~ = z / alpha
  f = lambda x, log_sig: (x - MU) * np.exp(2 * log_sig) / (S**2 + np.exp(2 * log_sig))
  grid = np.linspace(-0.5 * logsnr_1, -0.5 * logsnr_e, 4001)
  for a, b in zip(grid[:-1], grid[1:]):
    h = b - a
    k1 = f(x, a)
    k2 = f(x + h / 2 * k1, a + h / 2)
    k3 = f(x + h / 2 * k2, a + h / 2)
    k4 = f(x + h * k3, b)
    x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
  sig_e2 = math.exp(-logsnr_e)
  np.testing.assert_allclose(MU + S**2 * (x - MU) / (S**2 + sig_e2),
                             exact_x_hat(z_1, logsnr_1, logsnr_e), rtol=1e-9, atol=1e-9)
  x_0 = MU + S * (z_1 - math.sqrt(1 / (1 + math.exp(5.0))) * MU) / math.sqrt(
      S**2 / (1 + math.exp(5.0)) + 1 / (1 + math.exp(-5.0)))
  np.testing.assert_allclose(exact_x_hat(z_1, logsnr_1, 60.0), x_0, rtol=1e-9, atol=1e-9)


# --- order of convergence of the deterministic solvers --------------------------------------


def _last_logsnr(sampler, schedule, n, options):
  """The logsnr of a solver's last evaluation, whose x-hat it returns."""
  if sampler == "heun":
    return float(schedule(jnp.float32(0.0)))
  if options.get("grid") == "logsnr":
    lo, hi = float(schedule(jnp.float32(1.0))), float(schedule(jnp.float32(0.0)))
    return lo + (1.0 - 1.0 / n) * (hi - lo)
  return float(schedule(jnp.float32(1.0 / n)))


# (sampler, schedule, options, parameterization, levels N, ratio band): Heun spends 2N - 1.
ORDER_CASES = [
    ("ddim", vdm_linear, {}, "eps", (16, 32, 64), (1.7, 2.3)),
    ("dpmpp_2m", vdm_linear, {}, "x", (16, 32, 64), (3.3, 5.0)),
    ("dpmpp_2m", cosine_10, {"grid": "logsnr"}, "v", (64, 128), (3.3, 5.0)),
    ("heun", vdm_linear, {}, "v", (16, 32, 64), (3.3, 5.0)),
]


@pytest.mark.parametrize("sampler,schedule,options,param,levels,band", ORDER_CASES,
                         ids=["ddim", "dpmpp_2m", "dpmpp_2m_logsnr_grid", "heun"])
def test_error_shrinks_at_the_solver_order(sampler, schedule, options, param, levels, band):
  z_1 = jax.random.normal(jax.random.key(0), (8, 4))
  logsnr_1 = float(schedule(jnp.float32(1.0)))
  errors = []
  for n in levels:
    steps = 2 * n - 1 if sampler == "heun" else n
    x = samplers.sample(gaussian_denoiser(parameterization=param), schedule, z_1.shape,
                        jax.random.key(1), num_steps=steps, sampler=sampler, z_init=z_1,
                        solver_options=options)
    want = exact_x_hat(z_1, logsnr_1, _last_logsnr(sampler, schedule, n, options))
    errors.append(np.max(np.abs(np.asarray(x, np.float64) - want)))
  ratios = np.array(errors[:-1]) / np.array(errors[1:])
  assert np.all((ratios > band[0]) & (ratios < band[1])), (errors, ratios)


def test_dpmpp_2m_first_step_is_ddim():
  den, z = gaussian_denoiser(), jax.random.normal(jax.random.key(2), (4, 3))
  run = lambda sampler: samplers.sample(den, vdm_linear, z.shape, jax.random.key(0),
                                        num_steps=2, sampler=sampler, z_init=z)
  np.testing.assert_allclose(run("dpmpp_2m"), run("ddim"), rtol=1e-5, atol=1e-6)


# --- stochastic solvers: moments of the toy -------------------------------------------------


def _moments(sampler, num_steps, options, shape=(64, 256), schedule=linear_6, seed=0):
  """Sample mean and std of the toy drawn from its exact marginal at t = 1."""
  alpha_1, sigma_1 = process.alpha_sigma(schedule(jnp.float32(1.0)))
  z_1 = alpha_1 * MU + jnp.sqrt(alpha_1**2 * S**2 + sigma_1**2) * jax.random.normal(
      jax.random.key(100 + seed), shape)
  fn = jax.jit(functools.partial(samplers.sample, gaussian_denoiser(), schedule, shape,
                                 num_steps=num_steps, sampler=sampler, solver_options=options))
  x = np.asarray(fn(jax.random.key(seed), z_init=z_1), np.float64)
  return x.mean(), x.std(), x.size


def _assert_moments(mean, std, n, bias=0.0):
  """Within 4 standard errors of N(MU, S^2) (mean: S / sqrt(n), std: S / sqrt(2 n)), plus
  `bias`, a relative allowance for the sampler's discretization error where stated."""
  assert abs(mean - MU) < 4 * S / math.sqrt(n), mean
  assert abs(std / S - 1.0) < 4 / math.sqrt(2 * n) + bias, std


def test_heun_churn_zero_is_deterministic_and_churn_keeps_the_distribution():
  z = jax.random.normal(jax.random.key(3), (4, 3))

  def runner(**options):
    return jax.jit(lambda key: samplers.sample(gaussian_denoiser(), linear_6, z.shape, key,
                                               num_steps=9, sampler="heun", z_init=z,
                                               solver_options=options))

  plain, churned = runner(), runner(churn=10.0)
  np.testing.assert_array_equal(plain(jax.random.key(0)), plain(jax.random.key(1)))
  assert np.max(np.abs(churned(jax.random.key(0)) - churned(jax.random.key(1)))) > 1e-2
  assert np.max(np.abs(churned(jax.random.key(0)) - plain(jax.random.key(0)))) > 1e-2
  # S_tmax below every level: no churn, the deterministic sampler's numbers.
  np.testing.assert_allclose(runner(churn=10.0, s_tmax=1e-6)(jax.random.key(0)),
                             plain(jax.random.key(0)), rtol=1e-6, atol=1e-6)
  # 64 levels (127 evaluations) with churn 10: the toy's moments (the churn bias is 1.7% of
  # the std at 32 levels, 0.0% at 64, measured over 4 x 32k samples).
  _assert_moments(*_moments("heun", 127, {"churn": 10.0}))


def test_pc_without_corrector_is_ancestral():
  den, shape = gaussian_denoiser(), (4, 3)
  pc = samplers.sample(den, linear_6, shape, jax.random.key(4), num_steps=7, sampler="pc",
                       solver_options={"corrector_steps": 0})
  ancestral = samplers.sample(den, linear_6, shape, jax.random.key(4), num_steps=7,
                              sampler="ancestral")
  np.testing.assert_array_equal(pc, ancestral)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_langevin_corrector_stationary_variance(alpha):
  # z <- z + eps g + sqrt(2 eps) n on N(m, v) with g = -(z - m) / v: in many dimensions
  # ||n||^2 / ||g||^2 ~ v^2 / Var z, so eps = 2 alpha r^2 v^2 / Var z, and the chain's
  # stationary variance u = 2 eps / (1 - (1 - eps / v)^2) = v / (1 - eps / (2 v)) with
  # eps = 2 alpha r^2 v^2 / u solves to u = v (1 + alpha r^2).
  m, v, snr, shape = 0.3, 0.25, 0.5, (64, 1024)
  z = m + math.sqrt(v) * jax.random.normal(jax.random.key(0), shape)

  def chain(z, key):
    def body(k, carry):
      z, total = carry
      noise = jax.random.normal(jax.random.fold_in(key, k), shape)
      z = solvers.langevin_step(z, -(z - m) / v, noise, snr, jnp.full((shape[0],), alpha))
      return z, total + jnp.where(k >= 30, jnp.var(z), 0.0)
    return jax.lax.fori_loop(0, 60, body, (z, 0.0))

  z, total = jax.jit(chain)(z, jax.random.key(1))
  want = v * (1.0 + alpha * snr**2)
  assert abs(float(total) / 30 / want - 1.0) < 0.01, (float(total) / 30, want)
  assert abs(float(jnp.mean(z)) - m) < 4 * math.sqrt(want / z.size)


def test_pc_matches_the_gaussian_moments_and_beats_ancestral():
  # 50 levels, one corrector step each (99 evaluations), snr 0.16 (Song et al.'s VP value).
  # Allowance 1% of the std: PC's bias on this toy measured +0.3% here (+1.5% at 100 levels:
  # a Langevin chain at a fixed snr is biased), while ancestral sampling with the same
  # evaluations is 3.4% low.
  mean, std, n = _moments("pc", 99, {"corrector_steps": 1, "snr": 0.16})
  _assert_moments(mean, std, n, bias=0.01)
  _, std_ancestral, _ = _moments("ancestral", 99, None)
  assert abs(std / S - 1) < abs(std_ancestral / S - 1) - 0.01, (std, std_ancestral)


# --- self-conditioning and the evaluation count ---------------------------------------------


def counting_denoiser():
  """x-hat = cond["x_self"] + 1: after k evaluations x-hat is k if the sampler passed zeros
  first and then always the latest x-hat. Also checks that the rest of cond is kept."""

  def denoise(z, logsnr, cond):
    assert set(cond) == {"label", self_conditioning.X_SELF}, cond.keys()
    return process.from_x(z, cond[self_conditioning.X_SELF] + 1.0, logsnr)

  return denoise


@pytest.mark.parametrize("sampler,num_steps,options", [
    ("ddim", 5, {}), ("heun", 8, {"churn": 5.0}), ("dpmpp_2m", 6, {}),
    ("pc", 9, {"corrector_steps": 2})])
def test_self_conditioning_passes_the_latest_x_hat_and_nfe_is_honest(sampler, num_steps,
                                                                     options):
  cond = {"label": jnp.zeros((2,), jnp.int32)}
  x = samplers.sample(counting_denoiser(), linear_6, (2, 3), jax.random.key(0),
                      num_steps=num_steps, sampler=sampler, cond=cond, self_condition=True,
                      solver_options=options)
  count = samplers.nfe(sampler, num_steps, options)
  assert count <= num_steps
  np.testing.assert_allclose(x, np.full((2, 3), float(count)), rtol=1e-6)


def test_self_conditioning_matches_a_hand_written_ddim_loop():
  # A nonlinear use of x_self, DDIM eq. 12 by hand in numpy (float64), x_self = the previous
  # x-hat, zeros at the first evaluation.
  schedule, n, w = linear_6, 6, 0.4
  z_1 = np.asarray(jax.random.normal(jax.random.key(5), (3, 4)), np.float64)

  def x_hat(z, logsnr, x_self):
    alpha, sigma = math.sqrt(1 / (1 + math.exp(-logsnr))), math.sqrt(1 / (1 + math.exp(logsnr)))
    base = MU + alpha * S**2 * (z - alpha * MU) / (alpha**2 * S**2 + sigma**2)
    return base + w * np.tanh(3.0 * x_self), alpha, sigma

  z, x_self = z_1, np.zeros_like(z_1)
  for i in range(n, 1, -1):
    x, alpha, sigma = x_hat(z, float(schedule(i / n)), x_self)
    eps = (z - alpha * x) / sigma
    logsnr_s = float(schedule((i - 1) / n))
    z = math.sqrt(1 / (1 + math.exp(-logsnr_s))) * x + math.sqrt(1 / (1 + math.exp(logsnr_s))) * eps
    x_self = x
  want = x_hat(z, float(schedule(1 / n)), x_self)[0]

  def denoise(z, logsnr, cond):
    pred = gaussian_denoiser()(z, logsnr, None)
    return process.from_x(z, pred.x + w * jnp.tanh(3.0 * cond["x_self"]), logsnr)

  def plain(z, logsnr, cond):    # self_condition=False: cond reaches the denoiser untouched
    assert cond is None
    return gaussian_denoiser()(z, logsnr, cond)

  got = samplers.sample(denoise, schedule, z_1.shape, jax.random.key(0), num_steps=n,
                        z_init=jnp.asarray(z_1, jnp.float32), self_condition=True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  without = samplers.sample(plain, schedule, z_1.shape, jax.random.key(0), num_steps=n,
                            z_init=jnp.asarray(z_1, jnp.float32))
  assert np.max(np.abs(np.asarray(without) - want)) > 1e-2   # x_self does matter here


# --- jit and errors -------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m", "pc"])
def test_one_loop_per_sampler(sampler):
  # The whole run traces to one program with a single loop (fori_loop with static bounds
  # becomes a scan).
  fn = functools.partial(samplers.sample, gaussian_denoiser(), cosine_10, (3, 2), num_steps=9,
                         sampler=sampler, solver_options={"churn": 2.0})
  names = [e.primitive.name for e in jax.make_jaxpr(fn)(jax.random.key(2)).eqns]
  assert names.count("scan") + names.count("while") == 1, names


def test_clear_errors():
  den = gaussian_denoiser()
  run = lambda **kw: samplers.sample(den, linear_6, (2, 2), jax.random.key(0),
                                     **{"num_steps": 3, **kw})
  with pytest.raises(ValueError, match="unknown sampler 'euler'.*heun"):
    run(sampler="euler")
  with pytest.raises(ValueError, match=r"unknown solver option\(s\) \['chrun'\].*churn"):
    run(sampler="heun", solver_options={"chrun": 1.0})
  with pytest.raises(ValueError, match="churn must be >= 0"):
    run(sampler="heun", solver_options={"churn": -1.0})
  with pytest.raises(ValueError, match="corrector_steps"):
    run(sampler="pc", solver_options={"corrector_steps": 1.5})
  with pytest.raises(ValueError, match="grid must be one of"):
    run(sampler="dpmpp_2m", solver_options={"grid": "karras"})
  with pytest.raises(ValueError, match="unknown sampler"):
    samplers.nfe("euler", 4)
  with pytest.raises(ValueError, match="not a one-step rule"):
    samplers.step_to("heun", 0.0, None, None, 2, None, None)
  with pytest.raises(TypeError, match="dict"):
    run(self_condition=True, cond=jnp.zeros((2,)))
