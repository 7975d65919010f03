r"""VDM on downsampled ImageNet 32x32 (Kingma et al. 2021, appendix B).

  python -m launch.train --config configs/vdm/imagenet32.py --workdir gs://BUCKET/vdm_in32
  python -m launch.train --config configs/vdm/imagenet32.py:runlocal --workdir /tmp/smoke

Needs downsampled_imagenet/32x32 as ArrayRecord under $TFDS_DATA_DIR (see README).
"""

from configs.vdm.common import imagenet_config


def get_config(arg=None):
  return imagenet_config(32, arg)
