"""Noise conditioning augmentation for super-resolution stages (Imagen sec. 2.5; Ho et al.
2022, "Cascaded diffusion models").

The low-resolution conditioning image is itself diffused to an augmentation level t_aug and
the network is told that level (as `aug_logsnr`). In training t_aug is drawn at random, so the
stage learns to correct the artefacts of the stage before it; at sampling the level is a user
choice (often swept). t_aug = 0 means no augmentation at all: the image passes through
unchanged, whatever the schedule's logsnr at t = 0.
"""

import jax
import jax.numpy as jnp

from vdm import process


def augment(x_lowres, t_aug, rng, logsnr_fn):
  """Returns (z_lowres, aug_logsnr): x_lowres diffused to level t_aug ([B] in [0, 1])."""
  t_aug = jnp.broadcast_to(jnp.asarray(t_aug, jnp.float32), (x_lowres.shape[0],))
  aug_logsnr = logsnr_fn(t_aug)
  noised = process.diffuse(x_lowres, aug_logsnr, jax.random.normal(rng, x_lowres.shape))
  none = (t_aug == 0.0).reshape((-1,) + (1,) * (x_lowres.ndim - 1))
  return jnp.where(none, x_lowres, noised), aug_logsnr


def sample_levels(rng, batch: int, max_level: float = 1.0):
  """Training levels t_aug ~ U[0, max_level)."""
  return jax.random.uniform(rng, (batch,), maxval=max_level)


def upsample(x, factor: int, method: str = "bilinear"):
  """Resizes an NHWC batch by an integer factor (the lowres input of an SR stage)."""
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, h * factor, w * factor, c), method=method)
