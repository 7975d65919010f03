"""Noise schedules: maps from t in [0, 1] (data -> noise) to a strictly decreasing logsnr.

Every schedule is a Flax NNX module called as `schedule(t) -> logsnr` (same shape as t). Fixed
schedules have no parameters; learned ones keep theirs in `ScheduleParam` variables, a
subclass of `nnx.Param`, so the trainer can give them their own objective (the variance-
minimizing update of VDM appendix I.2, see `vdm.losses`) by filtering on the type.

VDM writes schedules as gamma(t) = -logsnr(t); the learned schedules below follow the VDM code
in gamma internally and convert once, at their return.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx


class ScheduleParam(nnx.Param):
  """A parameter of a learned noise schedule (optimized on the loss variance, not the loss)."""


def logsnr_and_rate(schedule, t):
  """Returns logsnr(t) and d logsnr / dt, the latter by forward-mode autodiff (`jax.jvp`).

  The continuous-time VLB weights the denoising error by -d logsnr/dt (VDM eq. 17).
  """
  t = jnp.asarray(t, jnp.float32)
  return jax.jvp(schedule, (t,), (jnp.ones_like(t),))


# --- fixed schedules -------------------------------------------------------------------------


class LinearGamma(nnx.Module):
  """VDM's fixed schedule: gamma(t) = gamma_min + (gamma_max - gamma_min) t."""

  def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0):
    if not gamma_min < gamma_max:
      raise ValueError(f"need gamma_min < gamma_max, got {gamma_min}, {gamma_max}")
    self.gamma_min, self.gamma_max = gamma_min, gamma_max

  def __call__(self, t):
    return -(self.gamma_min + (self.gamma_max - self.gamma_min) * t)


def _cosine_angle_range(logsnr_min, logsnr_max):
  """Angles u in (0, pi/2) with -2 log tan(u) = logsnr_max and logsnr_min respectively."""
  return math.atan(math.exp(-0.5 * logsnr_max)), math.atan(math.exp(-0.5 * logsnr_min))


class CosineLogSNR(nnx.Module):
  """Cosine schedule in logsnr (alpha = cos(pi t / 2)), i.e. logsnr = -2 log tan(pi t / 2).

  Clipped as in progressive distillation (Salimans & Ho 2022): t is mapped linearly onto the
  angles whose logsnr are logsnr_max and logsnr_min, so the schedule is strictly decreasing
  with logsnr(0) = logsnr_max and logsnr(1) = logsnr_min. `shift` adds a constant (simple
  diffusion, Hoogeboom et al. 2023, eq. 4); it may be a function of t (interpolated shift).
  """

  def __init__(self, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
    if not logsnr_min < logsnr_max:
      raise ValueError(f"need logsnr_min < logsnr_max, got {logsnr_min}, {logsnr_max}")
    self.logsnr_min, self.logsnr_max = logsnr_min, logsnr_max

  def shift(self, t):
    return jnp.zeros_like(t)

  def __call__(self, t):
    u_min, u_max = _cosine_angle_range(self.logsnr_min, self.logsnr_max)
    # -2 log tan(u) = 2 log tan(pi/2 - u): near the noise end use the complementary angle
    # w = pi/2 - u, which float32 resolves where u itself (close to pi/2) would not. w is
    # built from its own small endpoint (exact in float64) and 1 - t (exact in float32 for
    # t >= 1/2), never as a difference of two numbers near pi/2.
    span = u_max - u_min
    u = u_min + t * span
    w = math.atan(math.exp(0.5 * self.logsnr_min)) + (1.0 - t) * span   # pi/2 - u_max + ...
    logsnr = jnp.where(u < math.pi / 4, -2.0 * jnp.log(jnp.tan(u)), 2.0 * jnp.log(jnp.tan(w)))
    return logsnr + self.shift(t)


class ShiftedCosine(CosineLogSNR):
  """Simple diffusion's shifted cosine: logsnr_cosine(t) + 2 log(base / resolution).

  At a higher resolution than `base` the whole schedule moves towards more noise, keeping the
  per-pixel signal of neighbourhoods comparable (Hoogeboom et al. 2023, sec. 3.1). Endpoints
  are those of the cosine schedule plus the shift.
  """

  def __init__(self, resolution: int, base: int = 64, logsnr_min: float = -20.0,
               logsnr_max: float = 20.0):
    super().__init__(logsnr_min, logsnr_max)
    self.offset = 2.0 * math.log(base / resolution)

  def shift(self, t):
    return jnp.full_like(t, self.offset)


class InterpolatedShiftedCosine(CosineLogSNR):
  """Shift interpolated in t: the data end uses the shift of `resolution_at_data`, the noise
  end the shift of `resolution` (simple diffusion, sec. 3.1: fine detail is generated with
  the schedule of a lower resolution, global structure with that of the full one).

  The shift is linear in t and, for resolution >= resolution_at_data, non-increasing, so the
  schedule stays strictly decreasing.
  """

  def __init__(self, resolution: int, resolution_at_data: int = 32, base: int = 64,
               logsnr_min: float = -20.0, logsnr_max: float = 20.0):
    super().__init__(logsnr_min, logsnr_max)
    if resolution < resolution_at_data:
      raise ValueError(f"resolution {resolution} must be >= resolution_at_data "
                       f"{resolution_at_data} for a decreasing schedule")
    self.offset_data = 2.0 * math.log(base / resolution_at_data)
    self.offset_noise = 2.0 * math.log(base / resolution)

  def shift(self, t):
    return (1.0 - t) * self.offset_data + t * self.offset_noise


# --- learned schedules (VDM sec. 3.3 and appendix H) -------------------------------------------


def _pin(gamma_fn, t, gamma_min, gamma_max):
  """Rescales a monotone gamma so gamma(0) = gamma_min, gamma(1) = gamma_max; shape stays learned.

  The reference code leaves the endpoints free; pinning them makes the VLB's diffusion term
  invariant to the learned parameters (VDM eq. 18), so only the estimator variance moves.
  """
  g0, g1, gt = gamma_fn(jnp.zeros_like(t)), gamma_fn(jnp.ones_like(t)), gamma_fn(t)
  return gamma_min + (gamma_max - gamma_min) * (gt - g0) / (g1 - g0)


class LearnedScalar(nnx.Module):
  """VDM's learned linear schedule gamma(t) = b + |w| t (w, b init to the config endpoints).

  With pin_endpoints=True the schedule is the fixed linear one (a line through two pinned
  points has no free shape); it is accepted so that configs can switch schedules freely.
  """

  def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0,
               pin_endpoints: bool = False):
    self.gamma_min, self.gamma_max, self.pin_endpoints = gamma_min, gamma_max, pin_endpoints
    self.w = ScheduleParam(jnp.array(gamma_max - gamma_min, jnp.float32))
    self.b = ScheduleParam(jnp.array(gamma_min, jnp.float32))

  def gamma(self, t):
    return self.b.value + jnp.abs(self.w.value) * t

  def __call__(self, t):
    if self.pin_endpoints:
      return -_pin(self.gamma, t, self.gamma_min, self.gamma_max)
    return -self.gamma(t)


class _MonotoneDense(nnx.Module):
  """Dense layer with non-negative (absolute-valued) weights, so it is monotone in its input."""

  def __init__(self, n_in, n_out, *, kernel_init, bias_init=None, rngs):
    self.kernel = ScheduleParam(kernel_init(rngs.params(), (n_in, n_out)))
    self.bias = None if bias_init is None else ScheduleParam(bias_init(rngs.params(), (n_out,)))

  def __call__(self, x):
    y = x @ jnp.abs(self.kernel.value)
    return y if self.bias is None else y + self.bias.value


class LearnedMonotoneNet(nnx.Module):
  """VDM's monotone network schedule (appendix H):

    gamma(t) = l1(t) + l3(phi(l2(l1(t)))) / n_features,  phi = 2 (sigmoid - 1/2),

  where all weights are positive, so gamma is increasing in t. l1 starts as the linear
  schedule between the config endpoints and l2, l3 start small (std 0.01, zero bias, as in
  google-research/vdm), so training begins from VDM's fixed linear schedule. The
  inner branch sees t rescaled to [-1, 1], as in the reference code.
  """

  def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0, n_features: int = 1024,
               pin_endpoints: bool = False, *, rngs: nnx.Rngs):
    self.gamma_min, self.gamma_max, self.pin_endpoints = gamma_min, gamma_max, pin_endpoints
    self.n_features = n_features
    const = lambda v: (lambda key, shape: jnp.full(shape, v, jnp.float32))
    self.l1 = _MonotoneDense(1, 1, kernel_init=const(gamma_max - gamma_min),
                             bias_init=const(gamma_min), rngs=rngs)
    # As the reference code: inner kernels ~ N(0, 0.01^2), zero bias, so the nonlinear branch
    # starts near zero and gamma starts as the linear schedule (within ~1e-4 of its ends).
    normal = nnx.initializers.normal(0.01)
    zeros = lambda key, shape: jnp.zeros(shape, jnp.float32)
    self.l2 = _MonotoneDense(1, n_features, kernel_init=normal, bias_init=zeros, rngs=rngs)
    self.l3 = _MonotoneDense(n_features, 1, kernel_init=normal, rngs=rngs)

  def gamma(self, t):
    t = jnp.asarray(t, jnp.float32)
    col = t.reshape(-1, 1)
    inner = 2.0 * (jax.nn.sigmoid(self.l2(2.0 * (col - 0.5))) - 0.5)
    return (self.l1(col) + self.l3(inner) / self.n_features).reshape(t.shape)

  def __call__(self, t):
    if self.pin_endpoints:
      return -_pin(self.gamma, t, self.gamma_min, self.gamma_max)
    return -self.gamma(t)


SCHEDULES = ("linear", "cosine", "shifted_cosine", "interpolated_cosine", "learned_scalar",
             "learned_net")


def from_config(cfg, rngs: nnx.Rngs | None = None) -> nnx.Module:
  """The one schedule factory: `cfg` is config.model.schedule (name, logsnr_min, logsnr_max
  and the kind's own keys). Endpoints are always given in logsnr; VDM's gamma-parameterized
  schedules get gamma_min = -logsnr_max, gamma_max = -logsnr_min."""
  lo, hi = cfg.logsnr_min, cfg.logsnr_max
  gammas = {"gamma_min": -hi, "gamma_max": -lo}
  name = cfg.name
  if name == "linear":
    return LinearGamma(**gammas)
  if name == "learned_scalar":
    return LearnedScalar(**gammas, pin_endpoints=cfg.pin_endpoints)
  if name == "learned_net":
    return LearnedMonotoneNet(**gammas, n_features=cfg.n_features,
                              pin_endpoints=cfg.pin_endpoints, rngs=rngs or nnx.Rngs(0))
  if name == "cosine":
    return CosineLogSNR(lo, hi)
  if name == "shifted_cosine":
    return ShiftedCosine(cfg.resolution, cfg.base, lo, hi)
  if name == "interpolated_cosine":
    return InterpolatedShiftedCosine(cfg.resolution, cfg.resolution_at_data, cfg.base, lo, hi)
  raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
