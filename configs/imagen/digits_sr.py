r"""Imagen super-resolution stage on the captioned digits: 4x4 -> 8x8, text-conditioned,
with noise conditioning augmentation of the 4x4 input.

  python -m launch.train --config configs/imagen/digits_sr.py --workdir runs/imagen_sr
  python -m launch.train --config configs/imagen/digits_sr.py:runlocal --workdir /tmp/smoke
"""

from configs.imagen.common import stage_config


def get_config(arg=None):
  c = stage_config(resolution=8, lowres_size=4, unet_preset="tiny_sr", text_dim=32)
  c.model.unet_overrides.update(dict(ch=32))
  c.optim.update(dict(lr=1e-3, warmup_steps=100, decay="cosine", ema_decay=0.995,
                      weight_decay=0.0))
  c.train.update(dict(batch_size=64, num_steps=2000, log_every=100, eval_every=0,
                      sample_every=1000, checkpoint_every=500))
  c.eval.update(dict(num_samples=100, sample_steps=64, guidance_w=0.0))
  if arg == "runlocal":
    c.model.unet_overrides.update(dict(ch=8))
    c.train.update(dict(batch_size=16, num_steps=4, log_every=2, sample_every=4,
                        checkpoint_every=2))
    c.eval.update(dict(num_samples=8, sample_steps=4))
  return c
