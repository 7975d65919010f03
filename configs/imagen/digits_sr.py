r"""Imagen super-resolution stage on the captioned digits: 4x4 -> 8x8, text-conditioned,
with noise conditioning augmentation of the 4x4 input.

  python -m launch.train --config configs/imagen/digits_sr.py --workdir runs/imagen_sr
  python -m launch.train --config configs/imagen/digits_sr.py:runlocal --workdir /tmp/smoke
"""

from configs.imagen.common import digits_stage


def get_config(arg=None):
  return digits_stage(resolution=8, lowres_size=4, unet_preset="tiny_sr",
                      guidance_w=0.0, arg=arg)
