"""An Imagen stage's data path: area downsampling and the SR stage's low-resolution input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.imagen import digits_sr
from imagen import experiment


def test_downsample_is_the_block_mean():
  x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  want = x.reshape(2, 4, 2, 4, 2, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(experiment.downsample(jnp.asarray(x), 4), want, rtol=1e-6)
  np.testing.assert_allclose(experiment.downsample(jnp.asarray(x), 1)[:, 0, 0], x.mean((1, 2)),
                             rtol=1e-5)


def test_sr_stage_input_at_augmentation_level_zero_is_the_upsampled_lowres():
  cfg = digits_sr.get_config("runlocal").model
  model = experiment.build_model(cfg, 17, (8, 8, 1), nnx.Rngs(0))
  images = np.random.default_rng(1).integers(0, 17, size=(3, 8, 8, 1))
  batch = {"image": jnp.asarray(images), "text_emb": jnp.zeros((3, 4, 32)),
           "text_mask": jnp.ones((3, 4), jnp.int32)}
  cond = experiment.stage_cond(model, batch, jax.random.key(0), cfg, train=False)
  x = 2 * (images + 0.5) / 17 - 1
  low = x.reshape(3, 4, 2, 4, 2, 1).mean(axis=(2, 4))
  up = np.asarray(jax.image.resize(jnp.asarray(low), (3, 8, 8, 1), "bilinear"))
  assert cfg.sample_aug_level == 0.0
  np.testing.assert_allclose(cond["lowres"], up, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(cond["aug_logsnr"], model.schedule(jnp.zeros(3)), rtol=1e-6)
  # In training the level is random and the input is noised.
  train_cond = experiment.stage_cond(model, batch, jax.random.key(0), cfg, train=True)
  assert float(jnp.abs(train_cond["lowres"] - up).max()) > 1e-3


def test_training_crops_of_the_sr_stage_match_crops_of_its_lowres_input():
  """Imagen's 256 -> 1024 stage trains on crops: the low-res crop must be the downsampled
  high-res crop, i.e. corners on the upsampling factor's grid."""
  factor, size, crop_size = 4, 32, 8
  x = jnp.asarray(np.random.default_rng(2).normal(size=(6, size, size, 3)), jnp.float32)
  corners = experiment.random_crops(jax.random.key(0), 6, size, crop_size, factor)
  corners_np = np.asarray(corners)
  assert corners_np.min() >= 0 and corners_np.max() <= size - crop_size
  assert np.all(corners_np % factor == 0) and len(np.unique(corners_np)) > 1
  hi = experiment.crop(x, corners, crop_size)
  for b in range(6):
    y0, x0 = corners_np[:, b]
    np.testing.assert_array_equal(hi[b], np.asarray(x)[b, y0:y0 + crop_size, x0:x0 + crop_size])
  low = experiment.crop(experiment.downsample(x, size // factor), corners // factor,
                        crop_size // factor)
  np.testing.assert_allclose(experiment.downsample(hi, crop_size // factor), low, rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match="multiple of the upsampling factor"):
    experiment.random_crops(jax.random.key(0), 6, size, 6, factor)


def test_crop_stage_builds_its_net_at_the_crop_size_and_samples_whole_images():
  from configs.imagen import sr1024
  cfg = sr1024.get_config("runlocal").model
  assert cfg.crop_size == 4 and cfg.resolution == 8 and cfg.lowres_size == 4
  model = experiment.build_model(cfg, 17, (8, 8, 1), nnx.Rngs(0))
  assert model.image_shape == (8, 8, 1)
  images = np.random.default_rng(1).integers(0, 17, size=(2, 8, 8, 1))
  batch = {"image": jnp.asarray(images), "text_emb": jnp.zeros((2, 4, 32)),
           "text_mask": jnp.ones((2, 4), jnp.int32)}
  cond = experiment.stage_cond(model, batch, jax.random.key(0), cfg, train=False)
  out = experiment.sample(model, jax.random.key(1), cond, 2, num_steps=2)
  assert out.shape == (2, 8, 8, 1)
  # The paper config: 256 crops of 1024 images from a 256 input, no self-attention.
  paper = sr1024.get_config().model
  assert (paper.crop_size, paper.resolution, paper.lowres_size) == (256, 1024, 256)
