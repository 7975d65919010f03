"""Guidance at sampling time: classifier-free guidance (Ho & Salimans 2021), restricted to an
interval of noise levels if wanted (Kynkaanniemi et al. 2024), and autoguidance by a weaker
model of the same kind (Karras et al. 2024).

Convention: guided = (1 + w) * main - w * other, so w = 0 is the plain model.
  - Classifier-free: main = the conditional prediction, other = the unconditional one (the
    conditioning removed by `drop`). Imagen writes the same thing with weight w' = 1 + w.
    Only what `drop` removes is dropped: a super-resolution stage keeps its low-resolution
    input in both branches.
  - Autoguidance: main = the model, other = the guide, a smaller or less-trained model of
    the same family given the same conditioning (so it also works for unconditional models).
    Karras et al.'s eq. 2 is D_w = w_paper D_main + (1 - w_paper) D_guide
    = D_guide + w_paper (D_main - D_guide), i.e. ours with w_paper = 1 + w.
Guidance is applied to eps-hat and x-hat alike: given z_t both are affine in each other, so
guiding one guides the other, and v-hat follows.

Guidance interval (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval
improves sample and distribution quality"): guide only where logsnr lies in [lo, hi] and use
the plain main prediction (w = 0) elsewhere; high noise levels are where guidance collapses
diversity, low ones where it does nothing useful. The choice is per example, by `jnp.where`
on the logsnr argument, so it jits and mixes noise levels within a batch; both branches are
always evaluated (nothing is skipped), and outside the interval the main branch is selected
exactly. The paper gives intervals in EDM's sigma, the noise standard deviation in units of
the data: for VP, z_t / alpha = x + (sigma / alpha) eps, so

  sigma_EDM = sigma / alpha = exp(-logsnr / 2),   logsnr = -2 log sigma_EDM,

and sigma_EDM in (sigma_lo, sigma_hi] is logsnr in [-2 log sigma_hi, -2 log sigma_lo)
(`logsnr_interval_from_sigma`). Their ImageNet-512 EDM2 interval sigma in (0.28, 2.9] is
logsnr in [-2.13, 2.55]. EDM2 works on latents scaled to sigma_data = 0.5; on data of another
scale the interval moves by 2 log(sigma_data' / 0.5) in logsnr.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp

from vdm import process

# Kynkaanniemi et al. 2024, ImageNet-512 (EDM2): guidance on for sigma in (0.28, 2.9].
EDM2_IMAGENET512_SIGMA = (0.28, 2.9)


def drop_text(cond: dict, keep: jax.Array) -> dict:
  """Removes text conditioning where keep is False: the mask becomes all-zero (the
  networks treat an all-masked row as "no text") and the embedding zero."""
  out = dict(cond)
  k = keep.reshape((-1,) + (1,) * (cond["text_emb"].ndim - 1))
  out["text_emb"] = jnp.where(k, cond["text_emb"], 0.0)
  out["text_mask"] = jnp.where(keep[:, None], cond["text_mask"], 0).astype(cond["text_mask"].dtype)
  return out


def drop_label(cond: dict, keep: jax.Array, null_label: int = -1) -> dict:
  """Replaces the class label by the null class where keep is False."""
  out = dict(cond)
  out["label"] = jnp.where(keep, cond["label"], null_label).astype(cond["label"].dtype)
  return out


def drop_for_training(cond: dict, rng, p_uncond: float,
                      drop: Callable[[dict, jax.Array], dict]) -> dict:
  """Drops conditioning for a random fraction p_uncond of the batch (10% in Imagen)."""
  batch = jax.tree.leaves(cond)[0].shape[0]
  keep = jax.random.uniform(rng, (batch,)) >= p_uncond
  return drop(cond, keep)


# --- the guidance interval ------------------------------------------------------------------


def logsnr_interval_from_sigma(sigma_lo: float, sigma_hi: float) -> tuple[float, float]:
  """The logsnr interval [lo, hi] of EDM's sigma interval (sigma_lo, sigma_hi]:
  logsnr = -2 log sigma_EDM (module docstring), so the ends swap."""
  if not 0.0 < sigma_lo < sigma_hi:
    raise ValueError(f"a sigma interval needs 0 < sigma_lo < sigma_hi, got ({sigma_lo}, "
                     f"{sigma_hi}]")
  return (-2.0 * math.log(sigma_hi), -2.0 * math.log(sigma_lo))


def check_interval(interval):
  """None for "guide everywhere" (None or an empty tuple), else the pair (lo, hi) in logsnr.
  Concrete ends are checked (lo <= hi); traced ones (a jitted sweep) pass as they are."""
  if interval is None or len(interval) == 0:
    return None
  if len(interval) != 2:
    raise ValueError(f"a guidance interval is (lo, hi) in logsnr, got {tuple(interval)}; "
                     "pass () to guide at every noise level")
  lo, hi = interval
  try:
    lo_f, hi_f = float(lo), float(hi)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, TypeError):
    return (lo, hi)
  if not lo_f <= hi_f:
    raise ValueError(f"guidance interval ({lo_f}, {hi_f}) has lo > hi: it is (lo, hi) in "
                     "logsnr, lo the noisier end (EDM's sigma_hi maps to lo = -2 log sigma_hi)")
  return (lo_f, hi_f)


def in_interval(logsnr, interval) -> jax.Array:
  """[B] bool: whether each example's logsnr lies in [lo, hi] (True everywhere for None)."""
  interval = check_interval(interval)
  logsnr = jnp.asarray(logsnr)
  if interval is None:
    return jnp.ones(logsnr.shape, bool)
  lo, hi = interval
  return (logsnr >= lo) & (logsnr <= hi)


# --- guided denoisers -----------------------------------------------------------------------


def _is_zero(w) -> bool:
  """A Python number 0: the guided model is the main one, and nothing else need run."""
  return isinstance(w, (int, float)) and w == 0


def _extrapolate(main: process.Prediction, other: process.Prediction, w, logsnr):
  """(1 + w) main - w other on x-hat and eps-hat, v-hat recomputed from both; w scalar or [B]."""
  x = main.x
  ww = jnp.broadcast_to(jnp.asarray(w, x.dtype), (x.shape[0],)).reshape(
      (-1,) + (1,) * (x.ndim - 1))
  combine = lambda a, b: (1.0 + ww) * a - ww * b
  gx, geps = combine(main.x, other.x), combine(main.eps, other.eps)
  return process.Prediction(x=gx, eps=geps, v=process.v_from_x_eps(gx, geps, logsnr))


def _inside_only(interval, logsnr, guided_pred, main):
  """The guided prediction where logsnr is in the interval, the main one (exactly) elsewhere."""
  if interval is None:
    return guided_pred
  on = process.per_example(in_interval(logsnr, interval), main.x)
  return process.Prediction(*(jnp.where(on, g, m) for g, m in zip(guided_pred, main)))


def guided(denoise_fn: Callable, w, drop: Callable[[dict, jax.Array], dict],
           interval=None) -> Callable:
  """Wraps denoise_fn(z, logsnr, cond) -> Prediction into its classifier-free guided version
  with weight w (a scalar or [B] array), guiding only where logsnr lies in `interval`
  ((lo, hi); None or () for everywhere). Both branches run as one batch of 2B. A w that is
  the Python number 0 (the SR stages' default) is the plain conditional model: one pass, no
  2B batch."""
  interval = check_interval(interval)
  if _is_zero(w):
    return denoise_fn

  def guided_fn(z, logsnr, cond):
    batch = z.shape[0]
    keep = jnp.concatenate([jnp.ones((batch,), bool), jnp.zeros((batch,), bool)])
    both = jax.tree.map(lambda a: jnp.concatenate([a, a]), cond)
    pred = denoise_fn(jnp.concatenate([z, z]), jnp.concatenate([logsnr, logsnr]),
                      drop(both, keep))
    conditional = process.Prediction(*(a[:batch] for a in pred))
    unconditional = process.Prediction(*(a[batch:] for a in pred))
    out = _extrapolate(conditional, unconditional, w, logsnr)
    return _inside_only(interval, logsnr, out, conditional)

  return guided_fn


def autoguided(denoise_fn: Callable, guide_fn: Callable, w, interval=None) -> Callable:
  """Autoguidance (Karras et al. 2024, eq. 2 with w_paper = 1 + w): (1 + w) D_main - w D_guide,
  guide_fn a weaker model of the same kind called with the same (z, logsnr, cond); only where
  logsnr lies in `interval` (None or (): everywhere). Two passes (different weights), so no
  shared batch. w = Python 0 is the main model alone (the guide never runs)."""
  interval = check_interval(interval)
  if _is_zero(w):
    return denoise_fn

  def autoguided_fn(z, logsnr, cond):
    main = denoise_fn(z, logsnr, cond)
    guide = guide_fn(z, logsnr, cond)
    if guide.x.shape != main.x.shape:
      raise ValueError(f"the guide predicts x-hat of shape {guide.x.shape} but the model "
                       f"{main.x.shape}: autoguidance needs a guide of the same family and "
                       "data shape (a smaller or earlier run of the same config)")
    out = _extrapolate(main, guide, w, logsnr)
    return _inside_only(interval, logsnr, out, main)

  return autoguided_fn


def guided_denoiser(denoise_fn: Callable, w, *, drop=None, interval=None,
                    guide_fn: Callable | None = None) -> Callable:
  """The denoiser a sampler runs at guidance weight w: autoguided by guide_fn when one is
  given, else classifier-free guided by dropping what `drop` removes (drop None: nothing to
  drop, so the model itself); in both cases only inside `interval`."""
  if guide_fn is not None:
    return autoguided(denoise_fn, guide_fn, w, interval)
  if drop is None:
    return denoise_fn
  return guided(denoise_fn, w, drop, interval)
