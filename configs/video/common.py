"""Pieces shared by the video stage configs (Ho et al. 2022, "Video Diffusion Models"; Imagen
Video, Ho et al. 2022b, for the super-resolution stages)."""

import ml_collections

from configs.imagen import common as imagen_common

# Imagen stage keys that a video stage reads differently (its crop_size is (H, W), below).
_IMAGE_ONLY_KEYS = ("crop_size",)


def stage_config(*, num_frames: int, resolution, unet_preset: str, text_dim: int,
                 lowres_size: int = 0, lowres_frames: int = 0) -> ml_collections.ConfigDict:
  """A video stage: Imagen's stage keys (text, schedule, v, weighting, guidance, noise
  augmentation) with a Video U-Net (imagen.unet_presets.video_unet_config) over clips of
  num_frames frames of resolution x resolution, or of (H, W) = resolution.

  lowres_size / lowres_frames: the previous stage's frame height (spatial super-resolution)
  and frame count (temporal super-resolution); 0 and 0 make a base stage."""
  height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
  c = imagen_common.stage_config(resolution=height, lowres_size=lowres_size,
                                 unet_preset=unet_preset, text_dim=text_dim)
  c.family = "video"
  # video_options: keyword options of the video source (launch/data/pipeline.get_source):
  # frame_stride, videos_per_digit, num_frames / frame_size for video files, ...
  c.data.update(dict(name="moving_digits:8x16x16", video_options=ml_collections.ConfigDict()))
  model = {k: v for k, v in c.model.to_dict().items() if k not in _IMAGE_ONLY_KEYS}
  model.update(
      num_frames=num_frames,          # the stage's clip length (data clips: every k-th frame)
      frame_size=(height, width) if height != width else (),   # (): square at resolution
      lowres_frames=lowres_frames,    # TSR: the previous stage's frame count (0: none)
      tsr_fill="repeat",              # TSR: frames between known ones: repeat | blank
      fps_cond=False,                 # condition on the frame rate (cond["fps"] = fps)
      fps=0.0,                        # the clips' frame rate, when fps_cond
      frame_index_cond=False,         # embed each frame's index in its clip (imagen/video_unet)
      coord_cond=False,               # pixel (row, col) as two input channels (CoordConv)
      joint_image_fraction=0.0,       # Ho et al. sec. 3.2: share of examples made images
      # (H, W) of random training crops, the same window in every frame (SR stages without
      # spatial attention; Imagen Video's ssr3); sampling is on whole frames. (): no crops.
      crop_size=(),
  )
  c.model = ml_collections.ConfigDict(model)
  return c
