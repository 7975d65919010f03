r"""VDM on downsampled ImageNet 64x64 (Kingma et al. 2021, appendix B).

  python -m launch.train --config configs/vdm/imagenet64.py --workdir gs://BUCKET/vdm_in64
  python -m launch.train --config configs/vdm/imagenet64.py:runlocal --workdir /tmp/smoke

Needs downsampled_imagenet/64x64 as ArrayRecord under $TFDS_DATA_DIR (see README).
"""

from configs.vdm.common import imagenet_config


def get_config(arg=None):
  return imagenet_config(64, arg)
