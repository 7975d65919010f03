"""The Efficient U-Net presets: the paper's stage networks (base64, sr256, sr1024) and tiny
CPU variants, as constructor kwargs of `imagen.efficient_unet.EfficientUNet`."""

import math

import jax
from flax import nnx

from imagen.efficient_unet import EfficientUNet

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
