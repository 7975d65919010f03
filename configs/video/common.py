"""Pieces shared by the video stage configs (Ho et al. 2022, "Video Diffusion Models")."""

import ml_collections

from configs.imagen import common as imagen_common

# Imagen stage keys that a text-to-video base stage does not read.
_IMAGE_ONLY_KEYS = ("lowres_size", "crop_size", "max_aug_level", "sample_aug_level")


def stage_config(*, num_frames: int, resolution: int, unet_preset: str,
                 text_dim: int) -> ml_collections.ConfigDict:
  """A text-to-video stage: Imagen's stage keys (text, schedule, v, weighting, guidance) with
  a Video U-Net (imagen.unet_presets.video_unet_config) over clips of num_frames frames."""
  c = imagen_common.stage_config(resolution=resolution, lowres_size=0,
                                 unet_preset=unet_preset, text_dim=text_dim)
  c.family = "video"
  # video_options: keyword options of the video source (launch/data/pipeline.get_source):
  # frame_stride, videos_per_digit, num_frames / frame_size for video files, ...
  c.data.update(dict(name="moving_digits:8x16x16", video_options=ml_collections.ConfigDict()))
  model = {k: v for k, v in c.model.to_dict().items() if k not in _IMAGE_ONLY_KEYS}
  model.update(
      num_frames=num_frames,          # the stage's clip length (data clips: every k-th frame)
      fps_cond=False,                 # condition on the frame rate (cond["fps"] = fps)
      fps=0.0,                        # the clips' frame rate, when fps_cond
      joint_image_fraction=0.0,       # Ho et al. sec. 3.2: share of examples made images
  )
  c.model = ml_collections.ConfigDict(model)
  return c
