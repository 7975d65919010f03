"""Dynamic thresholding, classifier-free guidance and noise augmentation against their formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen import noise_augmentation
from vdm import guidance
from vdm import process, samplers, schedules


def test_dynamic_threshold_formula_and_edge_cases():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 4, 4, 1)).astype(np.float32) * np.array([0.3, 2.0, 5.0])[:, None, None, None]
  out = np.asarray(samplers.dynamic_threshold(90.0)(jnp.asarray(x)))
  for i in range(3):
    s = max(np.percentile(np.abs(x[i]), 90.0), 1.0)
    np.testing.assert_allclose(out[i], np.clip(x[i], -s, s) / s, rtol=1e-5, atol=1e-6)
  # p-th percentile below 1: x-hat is left exactly as it is (s = max(p, 1) = 1, all |x| < 1).
  small = jnp.asarray(rng.uniform(-0.9, 0.9, (2, 3, 3, 1)), jnp.float32)
  np.testing.assert_array_equal(samplers.dynamic_threshold()(small), small)
  # The result always lies in [-1, 1].
  assert np.abs(out).max() <= 1.0 + 1e-6
  with pytest.raises(ValueError, match="percentile"):
    samplers.dynamic_threshold(0.0)


def test_dynamic_threshold_plugs_into_the_sampler_hook():
  """A denoiser that always predicts x = 3 * target: thresholding maps x-hat back to the target
  sign pattern at magnitude 1 and the sampler lands there."""
  target = jnp.asarray(np.sign(np.random.default_rng(1).normal(size=(2, 4, 4, 1))), jnp.float32)

  def denoise(z, logsnr, cond):
    return process.from_x(z, 3.0 * target, logsnr)

  x = samplers.sample(denoise, schedules.CosineLogSNR(), target.shape, jax.random.key(0),
                      num_steps=5, clip_x=samplers.dynamic_threshold(99.5))
  np.testing.assert_allclose(x, target, atol=1e-5)


def _linear_denoiser():
  """eps-hat = a(cond) * z: conditional and unconditional differ through a text embedding."""
  def denoise(z, logsnr, cond):
    a = 1.0 + jnp.sum(cond["text_emb"], axis=(1, 2)).reshape(-1, 1, 1, 1)
    return process.predict(z, logsnr, a * z, "eps")
  return denoise


def test_guidance_formula_and_w_zero():
  rng = np.random.default_rng(2)
  z = jnp.asarray(rng.normal(size=(2, 4, 4, 1)), jnp.float32)
  lam = jnp.array([0.5, -1.0])
  cond = {"text_emb": jnp.full((2, 3, 2), 0.25), "text_mask": jnp.ones((2, 3), jnp.int32)}
  denoise = _linear_denoiser()
  cond_pred = denoise(z, lam, cond)
  uncond_pred = denoise(z, lam, guidance.drop_text(cond, jnp.zeros(2, bool)))
  for w in (0.0, 1.5, jnp.array([0.0, 4.0])):
    g = guidance.guided(denoise, w, guidance.drop_text)(z, lam, cond)
    ww = np.broadcast_to(np.asarray(w), (2,)).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(g.eps, (1 + ww) * cond_pred.eps - ww * uncond_pred.eps, rtol=1e-5)
    np.testing.assert_allclose(g.x, (1 + ww) * cond_pred.x - ww * uncond_pred.x, rtol=1e-4,
                               atol=1e-5)
    # The guided x and eps stay consistent with z: z = alpha x + sigma eps.
    a, s = process.alpha_sigma(lam.reshape(-1, 1, 1, 1))
    np.testing.assert_allclose(a * g.x + s * g.eps, z, rtol=1e-4, atol=1e-5)
  g0 = guidance.guided(denoise, 0.0, guidance.drop_text)(z, lam, cond)
  np.testing.assert_allclose(g0.eps, cond_pred.eps, rtol=1e-6)


def test_conditioning_dropout_rate_and_label_drop():
  cond = {"text_emb": jnp.ones((4000, 2, 3)), "text_mask": jnp.ones((4000, 2), jnp.int32)}
  dropped = guidance.drop_for_training(cond, jax.random.key(0), 0.1, guidance.drop_text)
  rows = np.asarray(dropped["text_mask"].sum(-1) == 0)
  assert abs(rows.mean() - 0.1) < 0.02
  np.testing.assert_array_equal(np.asarray(dropped["text_emb"].sum((1, 2)) == 0), rows)
  labels = guidance.drop_label({"label": jnp.arange(4)}, jnp.array([True, False, True, False]))
  np.testing.assert_array_equal(labels["label"], [0, -1, 2, -1])


def test_noise_augmentation_levels():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.uniform(-1, 1, (3, 4, 4, 1)), jnp.float32)
  sched = schedules.CosineLogSNR()
  z, lam = noise_augmentation.augment(x, jnp.array([0.0, 0.5, 1.0]), jax.random.key(0), sched)
  np.testing.assert_array_equal(z[0], x[0])                   # level 0: exactly the input
  eps = jax.random.normal(jax.random.key(0), x.shape)
  a, s = process.alpha_sigma(sched(jnp.array([0.5, 1.0])).reshape(-1, 1, 1, 1))
  np.testing.assert_allclose(z[1:], a * x[1:] + s * eps[1:], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lam, sched(jnp.array([0.0, 0.5, 1.0])))
  levels = noise_augmentation.sample_levels(jax.random.key(1), 1000, 0.3)
  assert float(levels.min()) >= 0 and float(levels.max()) < 0.3
  up = noise_augmentation.upsample(jnp.ones((1, 2, 2, 1)), 4)
  assert up.shape == (1, 8, 8, 1)
