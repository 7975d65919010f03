"""Forward process, conversions and schedules against closed forms computed here in float64."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from vdm import process, schedules

LOGSNRS = np.array([-20.0, -8.0, -1.0, 0.0, 1.5, 8.0, 20.0])


def _alpha_sigma64(logsnr):
  return np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))


def test_alpha_sigma_match_definition_and_are_finite():
  alpha, sigma = process.alpha_sigma(jnp.asarray(LOGSNRS))
  a64, s64 = _alpha_sigma64(LOGSNRS)
  np.testing.assert_allclose(alpha, a64, rtol=1e-6)
  np.testing.assert_allclose(sigma, s64, rtol=1e-6)
  np.testing.assert_allclose(np.log(alpha**2 / sigma**2), LOGSNRS, atol=1e-4)


@pytest.mark.parametrize("logsnr", LOGSNRS.tolist())
def test_all_six_conversions_round_trip(logsnr):
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 4, 4, 1)).astype(np.float32)
  eps = rng.normal(size=x.shape).astype(np.float32)
  lam = jnp.full((2,), logsnr)
  a, s = _alpha_sigma64(logsnr)
  z = process.diffuse(x, lam, eps)
  np.testing.assert_allclose(z, a * x + s * eps, rtol=1e-5, atol=1e-6)
  v64 = a * eps.astype(np.float64) - s * x
  # Stable directions (no division by a small alpha or sigma) are exact to float precision.
  np.testing.assert_allclose(process.v_from_x_eps(x, eps, lam), v64, atol=1e-5)
  np.testing.assert_allclose(process.x_from_v(z, v64, lam), x, atol=1e-5)
  np.testing.assert_allclose(process.eps_from_v(z, v64, lam), eps, atol=1e-5)
  # Dividing directions lose at most the conditioning of the division (1/alpha or 1/sigma).
  tol_x, tol_eps = 1e-5 / a + 1e-5, 1e-6 / s + 1e-5
  np.testing.assert_allclose(process.x_from_eps(z, eps, lam), x, atol=tol_x)
  np.testing.assert_allclose(process.eps_from_x(z, x, lam), eps, atol=tol_eps)
  np.testing.assert_allclose(process.v_from_x(z, x, lam), v64, atol=tol_eps)
  np.testing.assert_allclose(process.v_from_eps(z, eps, lam), v64, atol=tol_x)
  for param, out in (("eps", eps), ("x", x), ("v", v64)):
    pred = process.predict(z, lam, jnp.asarray(out, jnp.float32), param)
    assert np.all(np.isfinite(pred.x)) and np.all(np.isfinite(pred.eps))
  with pytest.raises(ValueError, match="parameterization"):
    process.predict(z, lam, x, "score")


def _all_schedules():
  return {
      "linear": schedules.LinearGamma(-13.3, 5.0),
      "cosine": schedules.CosineLogSNR(-20.0, 20.0),
      "shifted": schedules.ShiftedCosine(resolution=256, base=64),
      "interpolated": schedules.InterpolatedShiftedCosine(resolution=256, resolution_at_data=32),
      "learned_scalar": schedules.LearnedScalar(-13.3, 5.0),
      "learned_net": schedules.LearnedMonotoneNet(-13.3, 5.0, n_features=16, rngs=nnx.Rngs(1)),
      "learned_net_pinned": schedules.LearnedMonotoneNet(-10.0, 7.0, n_features=16,
                                                         pin_endpoints=True, rngs=nnx.Rngs(2)),
  }


def test_schedules_strictly_decreasing_with_correct_derivative():
  t = jnp.linspace(0.0, 1.0, 1001)
  for name, sched in _all_schedules().items():
    lam, rate = schedules.logsnr_and_rate(sched, t)
    assert np.all(np.diff(np.asarray(lam)) < 0), name
    # Central finite differences of the schedule itself, in the interior.
    h = 1e-3
    tm = t[10:-10]
    fd = (sched(tm + h) - sched(tm - h)) / (2 * h)
    np.testing.assert_allclose(rate[10:-10], fd, rtol=2e-2, atol=2e-2, err_msg=name)


def test_schedule_endpoints():
  s = _all_schedules()
  np.testing.assert_allclose(s["linear"](jnp.array([0.0, 1.0])), [13.3, -5.0], rtol=1e-6)
  np.testing.assert_allclose(s["cosine"](jnp.array([0.0, 1.0])), [20.0, -20.0], atol=1e-3)
  # Cosine interior equals -2 log tan(pi t / 2) up to the tiny clipping remap.
  np.testing.assert_allclose(s["cosine"](jnp.array([0.5])), [0.0], atol=1e-4)
  shift = 2 * math.log(64 / 256)
  np.testing.assert_allclose(s["shifted"](jnp.array([0.0, 0.5, 1.0])),
                             [20 + shift, shift, -20 + shift], atol=1e-3)
  np.testing.assert_allclose(s["interpolated"](jnp.array([0.0, 1.0])),
                             [20 + 2 * math.log(2), -20 + shift], atol=1e-3)
  np.testing.assert_allclose(s["learned_scalar"](jnp.array([0.0, 1.0])), [13.3, -5.0], rtol=1e-6)
  np.testing.assert_allclose(s["learned_net_pinned"](jnp.array([0.0, 1.0])), [10.0, -7.0],
                             rtol=1e-5)


def test_pinned_learned_schedule_keeps_endpoints_after_parameter_change():
  sched = schedules.LearnedMonotoneNet(-13.3, 5.0, n_features=8, pin_endpoints=True,
                                       rngs=nnx.Rngs(0))
  before = sched(jnp.array([0.3]))
  graphdef, state = nnx.split(sched)
  state = jax.tree.map(lambda p: p + 0.7, state)
  moved = nnx.merge(graphdef, state)
  np.testing.assert_allclose(moved(jnp.array([0.0, 1.0])), [13.3, -5.0], rtol=1e-5)
  assert abs(float(moved(jnp.array([0.3]))[0] - before[0])) > 1e-3  # the shape did change
  assert all(isinstance(v, schedules.ScheduleParam)
             for _, v in nnx.to_flat_state(nnx.state(sched, nnx.Param)))


def test_unknown_schedule_is_a_clear_error():
  with pytest.raises(ValueError, match="choose one of"):
    schedules.from_config(ml_collections.ConfigDict(
        dict(name="quadratic", logsnr_min=-5.0, logsnr_max=5.0)))
