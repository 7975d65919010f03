"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", EDM2 sec. 3 and appendix C): track a few power-function EMAs while
training, store snapshots of them, and afterwards reconstruct the EMA of any other length.

Power-function EMA (EDM2 eq. 2): after the t-th update (t = 1, 2, ...)

    theta_hat(t) = beta(t) theta_hat(t - 1) + (1 - beta(t)) theta(t),
    beta(t) = (1 - 1/t)^(exponent + 1).

Unrolled, the weight of theta(tau) in theta_hat(t) is (tau^(e+1) - (tau-1)^(e+1)) / t^(e+1),
the mass on [tau - 1, tau] of the continuous profile p(s) = (e + 1) s^e / t^(e+1) on [0, t].
So the discrete EMA is the continuous one applied to the piecewise-constant trajectory, and
the continuous inner products below are exact for it. The profile's width relative to t is
its relative standard deviation (EDM2 eq. 3):

    std = sqrt((e + 1) / ((e + 2)^2 (e + 3))),

largest (0.3003) at e = (sqrt(5) - 3) / 2; EDM2 uses std 0.05 and 0.10 (e = 16.97, 6.94).

Naming: EDM2 calls the exponent gamma, but in this codebase gamma is VDM's -logsnr
(shared/DESIGN.md), so it is `exponent` here.

Reconstruction (EDM2 appendix C.3, Algorithm 3): the EMA of exponent e at time T is sought
as sum_i x_i theta_hat_i over the stored snapshots (each a profile p_{t_i, e_i}); x solves
the least-squares problem min || p_{T,e} - sum_i x_i p_{t_i, e_i} ||_2, i.e. the normal
equations A x = b with A_ij = <p_i, p_j> and b_i = <p_i, p_{T,e}>, in closed form below.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# The exponent of the widest power-function profile, and that profile's std: no
# power-function EMA is longer than this (relative to the training time).
EXPONENT_OF_MAX_STD = (np.sqrt(5.0) - 3.0) / 2.0


def std_of_exponent(exponent):
  """Relative standard deviation of the profile (e + 1) s^e on [0, 1] (EDM2 eq. 3)."""
  e = np.asarray(exponent, np.float64)
  if np.any(e <= -1.0):
    raise ValueError(f"a power-function EMA needs exponent > -1, got {exponent}")
  return np.sqrt((e + 1.0) / ((e + 2.0) ** 2 * (e + 3.0)))


MAX_STD = float(std_of_exponent(EXPONENT_OF_MAX_STD))   # 0.30028


def exponent_of_std(std):
  """The exponent whose profile has relative std `std` (inverse of `std_of_exponent`).

  std^-2 = (e + 2)^2 (e + 3) / (e + 1) is the cubic e^3 + 7 e^2 + (16 - s) e + (12 - s) = 0
  with s = std^-2 (EDM2's std_to_exp); of its real roots the largest is the one on the
  branch e >= EXPONENT_OF_MAX_STD (std falls as e grows), the branch EDM2 uses.
  """
  std = np.asarray(std, np.float64)
  bad = (std <= 0) | (std > MAX_STD) | ~np.isfinite(std)
  if np.any(bad):
    raise ValueError(f"post-hoc EMA std {std[bad] if std.ndim else std} is outside (0, "
                     f"{MAX_STD:.4f}]: power-function EMAs have relative std at most "
                     f"{MAX_STD:.4f} (EDM2 eq. 3); pick a std in that range, e.g. 0.05 or 0.10.")
  def one(s):
    roots = np.roots([1.0, 7.0, 16.0 - s ** -2, 12.0 - s ** -2])
    return roots[np.abs(roots.imag) <= 1e-4 * (1.0 + np.abs(roots.real))].real.max()
  return np.vectorize(one, otypes=[np.float64])(std)


# --- the profiles during training ---------------------------------------------------------


def beta(t, exponent):
  """beta(t) = (1 - 1/t)^(exponent + 1) (EDM2 eq. 2), for update t = 1, 2, ...; 0 at t = 1.

  Computed as exp((e + 1) log1p(-1/t)): in float32, 1 - 1/t loses the digits that matter
  once t is large."""
  t = jnp.asarray(t, jnp.float32)
  return jnp.exp((exponent + 1.0) * jnp.log1p(-1.0 / t))


def update_profile(profile, params, t, exponent):
  """One power-function EMA step: beta(t) profile + (1 - beta(t)) params, leaf by leaf."""
  b = beta(t, exponent)
  return jax.tree.map(lambda p, x: (b * p + (1.0 - b) * x).astype(p.dtype), profile, params)


class PowerEmaState(NamedTuple):
  """`count` updates applied so far (the t of the last update); one profile per std."""
  count: jax.Array
  profiles: tuple


def power_ema(stds) -> optax.GradientTransformation:
  """An optax transformation that leaves the updates alone and tracks a power-function EMA
  of the parameters *after* each update for every std in `stds`.

  Chained last, it sees the final updates and the current params, so params + updates are
  the new parameters. Its state is a PowerEmaState, which sits in the optimizer state: it is
  sharded like the params, checkpointed and restored with them, and skipped together with
  the update when the train step drops a non-finite one.
  """
  exponents = tuple(float(e) for e in exponent_of_std(np.asarray(stds, np.float64)))

  def init(params):
    return PowerEmaState(jnp.zeros([], jnp.int32),
                         tuple(jax.tree.map(jnp.copy, params) for _ in exponents))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("power_ema needs the params: call tx.update(grads, state, params)")
    new_params = optax.apply_updates(params, updates)
    t = state.count + 1
    return updates, PowerEmaState(t, tuple(update_profile(p, new_params, t, e)
                                           for p, e in zip(state.profiles, exponents)))

  return optax.GradientTransformation(init, update)


def find_state(opt_state) -> PowerEmaState | None:
  """The PowerEmaState inside an optimizer state (e.g. a chain's), or None."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PowerEmaState))
           if isinstance(s, PowerEmaState)]
  if len(found) > 1:
    raise ValueError(f"{len(found)} power_ema states in one optimizer state; expected one")
  return found[0] if found else None


# --- reconstruction (EDM2 appendix C.3) ---------------------------------------------------


def inner_product(t_a, e_a, t_b, e_b):
  """<p_a, p_b> = integral over s of p_{t_a,e_a}(s) p_{t_b,e_b}(s), with p_{t,e}(s) =
  (e + 1) s^e / t^(e+1) on [0, t] (EDM2 appendix C.3, `p_dot_p`); broadcasts.

  The integral runs to min(t_a, t_b) = m and equals (e_a+1)(e_b+1) m^(e_a+e_b+1) /
  ((e_a+e_b+1) t_a^(e_a+1) t_b^(e_b+1)), written with the ratio m / max so that large
  exponents do not overflow."""
  t_a, e_a, t_b, e_b = (np.asarray(v, np.float64) for v in (t_a, e_a, t_b, e_b))
  ratio = np.minimum(t_a, t_b) / np.maximum(t_a, t_b)
  power = np.where(t_a < t_b, e_b, e_a)     # the exponent of the longer profile
  return ((e_a + 1.0) * (e_b + 1.0) * ratio ** power
          / ((e_a + e_b + 1.0) * np.maximum(t_a, t_b)))


def solve_coefficients(snapshot_t, snapshot_exponent, target_t, target_exponent):
  """Least-squares weights of the snapshots for each target profile (EDM2 Algorithm 3).

  Args:
    snapshot_t, snapshot_exponent: [N] the time (updates applied) and exponent of every
      stored profile (each snapshot step contributes one entry per std it holds).
    target_t, target_exponent: [K] the profiles wanted (usually T = the last snapshot time).

  Returns:
    (x [N, K]: the EMA of target k is sum_i x[i, k] theta_hat_i,
     error [K]: || p_target - sum_i x_i p_i || / || p_target ||, the relative L2 error of
     the reconstructed profile, 0 when a target is one of the snapshots).
  """
  t, e = np.asarray(snapshot_t, np.float64), np.asarray(snapshot_exponent, np.float64)
  tt, te = (np.atleast_1d(np.asarray(v, np.float64)) for v in (target_t, target_exponent))
  a = inner_product(t[:, None], e[:, None], t[None, :], e[None, :])
  b = inner_product(t[:, None], e[:, None], tt[None, :], te[None, :])
  x = np.linalg.lstsq(a, b, rcond=None)[0]   # = solve(a, b) when a is well conditioned
  target_norm2 = inner_product(tt, te, tt, te)
  residual2 = target_norm2 - 2.0 * np.sum(x * b, 0) + np.einsum("ik,ij,jk->k", x, a, x)
  return x, np.sqrt(np.maximum(residual2, 0.0) / target_norm2)


def reconstructible_range(snapshot_t, snapshot_exponent, target_t, max_error: float = 0.05,
                          grid: int = 400) -> tuple[float, float] | None:
  """(lowest, highest) std on a log grid up to MAX_STD whose profile at `target_t` the
  snapshots reconstruct with relative error <= max_error, or None if none is."""
  stds = np.geomspace(1e-3, MAX_STD, grid)
  _, err = solve_coefficients(snapshot_t, snapshot_exponent, np.full(grid, target_t),
                              exponent_of_std(stds))
  ok = stds[err <= max_error]
  return (float(ok.min()), float(ok.max())) if ok.size else None


def accumulate(total, profile, coefficient):
  """total + coefficient * profile, leaf by leaf (the streaming sum of a reconstruction)."""
  return jax.tree.map(lambda s, p: s + jnp.asarray(coefficient, s.dtype) * p.astype(s.dtype),
                      total, profile)
