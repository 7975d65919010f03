r"""Imagen's second super-resolution stage: 256x256 -> 1024x1024, preset sr1024 (no
self-attention, text cross-attention kept), trained on random 256x256 crops of the 1024
images with the matching 64x64 crops of the 256 input; it samples whole 1024 images, the
network being convolutional apart from attention to the text (Saharia et al. 2022, app. F).

  python -m launch.train --config configs/imagen/sr1024.py --workdir gs://b/imagen_sr1024 \
      --config.data.text_cache=gs://b/coco_t5xxl
  python -m launch.train --config configs/imagen/sr1024.py:runlocal --workdir /tmp/smoke
"""

from configs.imagen.common import paper_stage


def get_config(arg=None):
  return paper_stage(resolution=1024, lowres_size=256, unet_preset="sr1024", crop_size=256,
                     arg=arg)
