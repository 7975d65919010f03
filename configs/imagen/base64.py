r"""Imagen's base model: text -> 64x64, Efficient U-Net preset base64 (Saharia et al. 2022).

  python -m launch.train --config configs/imagen/base64.py --workdir gs://b/imagen_base64 \
      --config.data.text_cache=gs://b/coco_t5xxl
  python -m launch.train --config configs/imagen/base64.py:runlocal --workdir /tmp/smoke
"""

from configs.imagen.common import paper_stage


def get_config(arg=None):
  return paper_stage(resolution=64, lowres_size=0, unet_preset="base64", arg=arg)
