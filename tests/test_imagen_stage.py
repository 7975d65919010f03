"""An Imagen stage's data path: area downsampling and the SR stage's low-resolution input."""

import jax
import jax.numpy as jnp
import numpy as np
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
