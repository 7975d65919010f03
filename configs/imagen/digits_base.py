r"""Imagen base stage on the captioned digits: text -> 4x4 (the embedded default cascade).

  python -m launch.train --config configs/imagen/digits_base.py --workdir runs/imagen_base
  python -m launch.train --config configs/imagen/digits_base.py:runlocal --workdir /tmp/smoke

Text comes from the OFFLINE DEFAULT encoder (a random tiny T5 and a sentencepiece model
trained on the digit captions); the captions are encoded once into WORKDIR/text_cache.
"""

from configs.imagen.common import stage_config


def get_config(arg=None):
  c = stage_config(resolution=4, lowres_size=0, unet_preset="tiny_base", text_dim=32)
  c.model.unet_overrides.update(dict(ch=32))
  c.optim.update(dict(lr=1e-3, warmup_steps=100, decay="cosine", ema_decay=0.995,
                      weight_decay=0.0))
  c.train.update(dict(batch_size=64, num_steps=2000, log_every=100, eval_every=0,
                      sample_every=1000, checkpoint_every=500))
  c.eval.update(dict(num_samples=100, sample_steps=64, guidance_w=1.0))
  if arg == "runlocal":
    c.model.unet_overrides.update(dict(ch=8))
    c.train.update(dict(batch_size=16, num_steps=4, log_every=2, sample_every=4,
                        checkpoint_every=2))
    c.eval.update(dict(num_samples=8, sample_steps=4))
  return c
