r"""Imagen base stage on the captioned digits: text -> 4x4 (the embedded default cascade).

  python -m launch.train --config configs/imagen/digits_base.py --workdir runs/imagen_base
  python -m launch.train --config configs/imagen/digits_base.py:runlocal --workdir /tmp/smoke

Text comes from the OFFLINE DEFAULT encoder (a random tiny T5 and a sentencepiece model
trained on the digit captions); the captions are encoded once into WORKDIR/text_cache.
"""

from configs.imagen.common import digits_stage


def get_config(arg=None):
  return digits_stage(resolution=4, lowres_size=0, unet_preset="tiny_base",
                      guidance_w=1.0, arg=arg)
