"""Classifier-free guidance (Ho & Salimans 2021): drop conditioning in training, extrapolate
away from the unconditional prediction at sampling.

Convention: guided = (1 + w) * conditional - w * unconditional, so w = 0 is the plain
conditional model (Imagen writes the same thing with weight w' = 1 + w). Guidance is applied
to eps-hat and x-hat alike: given z_t both are affine in each other, so guiding one guides the
other, and v-hat follows. Only the conditioning that `drop` removes is dropped: a
super-resolution stage keeps its low-resolution input in both branches.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from vdm import process


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


def guided(denoise_fn: Callable, w, drop: Callable[[dict, jax.Array], dict]) -> Callable:
  """Wraps denoise_fn(z, logsnr, cond) -> Prediction into its guided version with weight w
  (a scalar or [B] array). Both branches run as one batch of 2B. A w that is the Python
  number 0 (the SR stages' default) is the plain conditional model: one pass, no 2B batch."""
  if isinstance(w, (int, float)) and w == 0:
    return denoise_fn

  def guided_fn(z, logsnr, cond):
    batch = z.shape[0]
    keep = jnp.concatenate([jnp.ones((batch,), bool), jnp.zeros((batch,), bool)])
    both = jax.tree.map(lambda a: jnp.concatenate([a, a]), cond)
    pred = denoise_fn(jnp.concatenate([z, z]), jnp.concatenate([logsnr, logsnr]),
                      drop(both, keep))
    ww = jnp.broadcast_to(jnp.asarray(w, z.dtype), (batch,)).reshape(
        (-1,) + (1,) * (z.ndim - 1))
    combine = lambda a: (1.0 + ww) * a[:batch] - ww * a[batch:]
    x, eps = combine(pred.x), combine(pred.eps)
    return process.Prediction(x=x, eps=eps, v=process.v_from_x_eps(x, eps, logsnr))

  return guided_fn
