"""The Efficient U-Net presets: the paper's stage networks (base64, sr256, sr1024) and tiny
CPU variants, as constructor kwargs of `imagen.efficient_unet.EfficientUNet`; and the video
U-Net presets (`video_unet_config`, Ho et al. 2022's 16x64x64 text-to-video models) for
`imagen.video_unet.VideoUNet`."""

import math

import jax
from flax import nnx

from imagen.efficient_unet import EfficientUNet
from imagen.video_unet import VideoUNet

# Paper presets. base64: the 2B-parameter 64x64 base model (Imagen section 2.4 / appendix),
# a standard U-Net of width 512, multipliers (1, 2, 3, 4), 3 ResBlocks per level and
# attention with text cross-attention at 32, 16 and 8; these values are the reading of the
# appendix by lucidrains/imagen-pytorch (`BaseUnet64`: dim 512, dim_mults (1, 2, 3, 4),
# num_resnet_blocks 3, layer_attns and layer_cross_attns (False, True, True, True)) and
# NeMo's Imagen docs (2b_res_64: hidden size 512, 2.1B), here built in the Efficient
# U-Net layout. sr256 / sr1024: figures A.30 / A.31 (width 128, multipliers (1, 2, 4, 8),
# ResBlocks (2, 4, 8, 8), text cross-attention at the lowest level; the 256->1024 model has
# no self-attention and is trained on 256x256 crops, hence image_size 256). text_dim 4096
# is T5-XXL's width.
# param_count: base64 1.310B (paper 2B), sr256 467.9M (paper 600M), sr1024 459.5M (paper
# 400M). base64 in the ADM layout (vdm UNet: a skip per ResBlock, num_res_blocks + 1 up
# blocks, a middle block, attention after every block) has 1.96B before any text layer;
# the Efficient layout is leaner at the same widths. The paper's 600M / 400M split between
# the two SR models is not explained by the one self-attention layer pair that separates
# them here (8.4M); the paper does not give enough detail to pin the rest down.
_PRESETS = {
    "base64": dict(channels=3, image_size=64, ch=512, ch_mult=(1, 2, 3, 4), num_res_blocks=3,
                   attn_resolutions=(32, 16, 8), cross_attn_resolutions=(32, 16, 8),
                   num_heads=8, text_dim=4096),
    "sr256": dict(channels=3, image_size=256, ch=128, ch_mult=(1, 2, 4, 8),
                  num_res_blocks=(2, 4, 8, 8), attn_resolutions=(32,),
                  cross_attn_resolutions=(32,), num_heads=8, text_dim=4096, lowres_cond=True),
    "sr1024": dict(channels=3, image_size=256, ch=128, ch_mult=(1, 2, 4, 8),
                   num_res_blocks=(2, 4, 8, 8), attn_resolutions=(),
                   cross_attn_resolutions=(32,), num_heads=8, text_dim=4096, lowres_cond=True),
    # CPU-sized variants for tests and the digits demos.
    "tiny_base": dict(channels=3, image_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=(1, 1),
                      attn_resolutions=(4,), cross_attn_resolutions=(4,), num_heads=2,
                      text_dim=8),
    "tiny_sr": dict(channels=3, image_size=16, ch=16, ch_mult=(1, 2), num_res_blocks=(1, 2),
                    attn_resolutions=(), cross_attn_resolutions=(8,), num_heads=2, text_dim=8,
                    lowres_cond=True),
}


def efficient_unet_config(name: str) -> dict:
  """Constructor kwargs (without rngs) of a preset: base64, sr256, sr1024, tiny_*."""
  if name not in _PRESETS:
    raise ValueError(f"unknown Efficient U-Net preset {name!r}; choose from {sorted(_PRESETS)}")
  return dict(_PRESETS[name])


def param_count(name: str, **overrides) -> int:
  """Parameters of a preset (kwargs override it, e.g. channels=1, text_dim=None), counted
  from `nnx.eval_shape`: nothing is allocated, so the 2B preset is counted in seconds."""
  kwargs = {**efficient_unet_config(name), **overrides}
  abstract = nnx.eval_shape(lambda: EfficientUNet(**kwargs, rngs=nnx.Rngs(0)))
  return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


# Video U-Net presets. ho_small / ho_large: the text-to-video 16x64x64 models of Ho et al.
# 2022 ("Video Diffusion Models", appendix A, "Small/Large 16x64x64 model"): base channels
# 128 / 256, multipliers (1, 2, 4, 8), 2 blocks per resolution, attention at 8, 16, 32 with
# head dimension 64, conditioning embedding 1024; clips of 16 frames (frames are an input,
# not a constructor argument). Temporal attention sits where the spatial attention is
# (sec. 3: "after each spatial attention block"), so the 64x64 level mixes no frames. The
# paper conditions on BERT-large embeddings by attention pooling only; these presets use
# the Imagen stages' text conditioning (T5-XXL width 4096, pooled + cross-attention at the
# attention resolutions). What differs from the paper: its net is ADM-layout (attention after
# every block, a middle block, 3 up blocks per level) and its conditioning MLP has 4 layers
# (ours 2); built here in the Efficient U-Net layout.
# video_param_count: ho_small 212.0M, ho_large 725.4M; with the paper's text path instead
# (text_dim=1024, cross_attn_resolutions=()) 170.7M and 638.2M.
_VIDEO_PRESETS = {
    "ho_small_16x64x64": dict(channels=3, image_size=64, ch=128, ch_mult=(1, 2, 4, 8),
                              num_res_blocks=2, attn_resolutions=(32, 16, 8),
                              cross_attn_resolutions=(32, 16, 8),
                              temporal_attn_resolutions=(32, 16, 8), head_dim=64,
                              num_heads=8, emb_ch=1024, text_dim=4096),
    "ho_large_16x64x64": dict(channels=3, image_size=64, ch=256, ch_mult=(1, 2, 4, 8),
                              num_res_blocks=2, attn_resolutions=(32, 16, 8),
                              cross_attn_resolutions=(32, 16, 8),
                              temporal_attn_resolutions=(32, 16, 8), head_dim=64,
                              num_heads=8, emb_ch=1024, text_dim=4096),
    # CPU-sized: every layer kind (temporal conv at 16, temporal attention at 8), fps input.
    "tiny_video": dict(channels=1, image_size=16, ch=16, ch_mult=(1, 2), num_res_blocks=(1, 2),
                       attn_resolutions=(8,), cross_attn_resolutions=(8,),
                       temporal_attn_resolutions=(8,), temporal_conv_resolutions=(16,),
                       num_heads=2, text_dim=8, fps_cond=True),
}


def video_unet_config(name: str) -> dict:
  """Constructor kwargs (without rngs) of a video preset: ho_small_16x64x64,
  ho_large_16x64x64, tiny_video."""
  if name not in _VIDEO_PRESETS:
    raise ValueError(f"unknown video U-Net preset {name!r}; choose from "
                     f"{sorted(_VIDEO_PRESETS)}")
  return dict(_VIDEO_PRESETS[name])


def video_param_count(name: str, **overrides) -> int:
  """Parameters of a video preset (kwargs override it), counted from `nnx.eval_shape`."""
  kwargs = {**video_unet_config(name), **overrides}
  abstract = nnx.eval_shape(lambda: VideoUNet(**kwargs, rngs=nnx.Rngs(0)))
  return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
