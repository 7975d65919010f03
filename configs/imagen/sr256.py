r"""Imagen's first super-resolution stage: 64x64 -> 256x256, preset sr256, with noise
conditioning augmentation of the 64x64 input (Saharia et al. 2022, sec. 2.4-2.5).

  python -m launch.train --config configs/imagen/sr256.py --workdir gs://b/imagen_sr256 \
      --config.data.text_cache=gs://b/coco_t5xxl
  python -m launch.train --config configs/imagen/sr256.py:runlocal --workdir /tmp/smoke
"""

from configs.imagen.common import paper_stage


def get_config(arg=None):
  return paper_stage(resolution=256, lowres_size=64, unet_preset="sr256", arg=arg)
