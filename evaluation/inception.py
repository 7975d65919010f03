"""FID with the standard Inception-v3, from a weight file the user provides.

FID (Heusel et al. 2017): Fréchet distance (frechet.py) between Inception-v3 pool3 features
(2048-d) of two image sets, with the network of pytorch-fid (`FIDInceptionA/C/E_1/E_2`:
TensorFlow's 2015-12-05 Inception graph ported to PyTorch). Nothing here downloads: the
weights are read from a safetensors file whose tensor names are those of the PyTorch release,
and a missing file raises FileNotFoundError naming the file and how to make it. Convert the
weights once, with torch:

    # pt_inception-2015-12-05-6726825d.pth: pytorch-fid's GitHub release "fid_weights"
    python -c "import torch, safetensors.torch; \
      sd = torch.load('pt_inception-2015-12-05-6726825d.pth'); \
      safetensors.torch.save_file(sd, 'inception_fid.safetensors')"

Inputs are resized to 299x299 bilinearly (as torch's `interpolate(..., align_corners=False)`,
no antialiasing) and scaled to [-1, 1], as pytorch-fid does.
"""

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from evaluation import frechet, pretrained

INCEPTION_FILE = "inception_fid.safetensors"
INCEPTION_HOWTO = (
    "Download pt_inception-2015-12-05-6726825d.pth (pytorch-fid's GitHub release "
    "'fid_weights') and convert it once with torch:\n  python -c \"import torch, "
    "safetensors.torch; sd = torch.load('pt_inception-2015-12-05-6726825d.pth'); "
    "safetensors.torch.save_file(sd, 'inception_fid.safetensors')\"")


# =============================================================================================
# Inception-v3 (pytorch-fid's FID variant), NHWC, every BasicConv2d = conv -> BN(eps 1e-3) ->
# ReLU with BN folded into the conv at load time.
# =============================================================================================

class ConvSpec(NamedTuple):
  cin: int
  cout: int
  kernel: tuple[int, int]
  stride: int = 1
  same: bool = True  # pad by kernel // 2 (torchvision's explicit padding); else no padding


def _block_convs(kind: str, cin: int, arg: int = 0) -> dict[str, ConvSpec]:
  """The BasicConv2d layers of one torchvision Inception block, by attribute name."""
  c = ConvSpec
  if kind == "A":  # arg: pool_features
    return {"branch1x1": c(cin, 64, (1, 1)), "branch5x5_1": c(cin, 48, (1, 1)),
            "branch5x5_2": c(48, 64, (5, 5)), "branch3x3dbl_1": c(cin, 64, (1, 1)),
            "branch3x3dbl_2": c(64, 96, (3, 3)), "branch3x3dbl_3": c(96, 96, (3, 3)),
            "branch_pool": c(cin, arg, (1, 1))}
  if kind == "B":
    return {"branch3x3": c(cin, 384, (3, 3), 2, False), "branch3x3dbl_1": c(cin, 64, (1, 1)),
            "branch3x3dbl_2": c(64, 96, (3, 3)), "branch3x3dbl_3": c(96, 96, (3, 3), 2, False)}
  if kind == "C":  # arg: channels_7x7
    return {"branch1x1": c(cin, 192, (1, 1)), "branch7x7_1": c(cin, arg, (1, 1)),
            "branch7x7_2": c(arg, arg, (1, 7)), "branch7x7_3": c(arg, 192, (7, 1)),
            "branch7x7dbl_1": c(cin, arg, (1, 1)), "branch7x7dbl_2": c(arg, arg, (7, 1)),
            "branch7x7dbl_3": c(arg, arg, (1, 7)), "branch7x7dbl_4": c(arg, arg, (7, 1)),
            "branch7x7dbl_5": c(arg, 192, (1, 7)), "branch_pool": c(cin, 192, (1, 1))}
  if kind == "D":
    return {"branch3x3_1": c(cin, 192, (1, 1)), "branch3x3_2": c(192, 320, (3, 3), 2, False),
            "branch7x7x3_1": c(cin, 192, (1, 1)), "branch7x7x3_2": c(192, 192, (1, 7)),
            "branch7x7x3_3": c(192, 192, (7, 1)),
            "branch7x7x3_4": c(192, 192, (3, 3), 2, False)}
  if kind == "E":
    return {"branch1x1": c(cin, 320, (1, 1)), "branch3x3_1": c(cin, 384, (1, 1)),
            "branch3x3_2a": c(384, 384, (1, 3)), "branch3x3_2b": c(384, 384, (3, 1)),
            "branch3x3dbl_1": c(cin, 448, (1, 1)), "branch3x3dbl_2": c(448, 384, (3, 3)),
            "branch3x3dbl_3a": c(384, 384, (1, 3)), "branch3x3dbl_3b": c(384, 384, (3, 1)),
            "branch_pool": c(cin, 192, (1, 1))}
  raise ValueError(kind)


# (name, block kind, in channels, block argument) in forward order, after the stem.
INCEPTION_BLOCKS = (
    ("Mixed_5b", "A", 192, 32), ("Mixed_5c", "A", 256, 64), ("Mixed_5d", "A", 288, 64),
    ("Mixed_6a", "B", 288, 0),
    ("Mixed_6b", "C", 768, 128), ("Mixed_6c", "C", 768, 160), ("Mixed_6d", "C", 768, 160),
    ("Mixed_6e", "C", 768, 192),
    ("Mixed_7a", "D", 768, 0), ("Mixed_7b", "E", 1280, 0), ("Mixed_7c", "E", 2048, 0),
)
INCEPTION_STEM = {
    "Conv2d_1a_3x3": ConvSpec(3, 32, (3, 3), 2, False),
    "Conv2d_2a_3x3": ConvSpec(32, 32, (3, 3), 1, False),
    "Conv2d_2b_3x3": ConvSpec(32, 64, (3, 3)),
    "Conv2d_3b_1x1": ConvSpec(64, 80, (1, 1)),
    "Conv2d_4a_3x3": ConvSpec(80, 192, (3, 3), 1, False),
}
INCEPTION_CONVS: dict[str, ConvSpec] = dict(INCEPTION_STEM)
for _name, _kind, _cin, _arg in INCEPTION_BLOCKS:
  INCEPTION_CONVS.update({f"{_name}.{k}": v for k, v in _block_convs(_kind, _cin, _arg).items()})
BN_EPS = 1e-3  # torchvision BasicConv2d


def inception_tensor_shapes() -> dict[str, tuple[int, ...]]:
  """Every tensor the FID network reads: torchvision names -> PyTorch shapes (OIHW convs)."""
  shapes = {}
  for name, s in INCEPTION_CONVS.items():
    shapes[f"{name}.conv.weight"] = (s.cout, s.cin) + s.kernel
    for t in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{name}.bn.{t}"] = (s.cout,)
  return shapes


def _fold_batchnorm(tensors: dict[str, np.ndarray], name: str):
  """conv (OIHW, no bias) + BN(running stats) -> (HWIO kernel, bias): one affine conv."""
  return pretrained.fold_batchnorm(tensors, name, "conv", BN_EPS)


def load_inception(weights_path) -> dict:
  """Reads and checks pytorch-fid's Inception weights (safetensors); returns folded params.

  Extra tensors in the file (fc.*, AuxLogits.*, bn.num_batches_tracked) are ignored.
  """
  check_inception_file(weights_path)
  tensors = pretrained.load_safetensors(weights_path)
  pretrained.check_tensor_shapes(tensors, inception_tensor_shapes(), weights_path,
                                 "pytorch-fid's Inception state dict", INCEPTION_HOWTO)
  return {name: _fold_batchnorm(tensors, name) for name in INCEPTION_CONVS}


def _conv(params, name, x):
  """BasicConv2d with BN folded: relu(conv(x) + b), torchvision's stride and padding."""
  kernel, bias = params[name]
  spec = INCEPTION_CONVS[name]
  pad = [(k // 2, k // 2) if spec.same else (0, 0) for k in spec.kernel]
  y = jax.lax.conv_general_dilated(x, kernel, (spec.stride,) * 2, pad,
                                   precision=pretrained.HIGHEST,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jax.nn.relu(y + bias)


def _max_pool(x, stride: int, pad: int):
  """3x3 max pool (torch pads max pools with -inf)."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                               [(0, 0), (pad, pad), (pad, pad), (0, 0)])


def _avg_pool_exclude_pad(x):
  """3x3 stride-1 average pool over valid pixels only (count_include_pad=False, the FID
  patch: TensorFlow's average pool does not count the zero padding)."""
  window = lambda v: jax.lax.reduce_window(v, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1),
                                           [(0, 0), (1, 1), (1, 1), (0, 0)])
  return window(x) / window(jnp.ones_like(x[..., :1]))


def _inception_block(params, name: str, kind: str, x):
  """One Mixed block; branch outputs are concatenated in torchvision's order."""
  c = lambda sub, h: _conv(params, f"{name}.{sub}", h)
  if kind == "A":
    return jnp.concatenate([
        c("branch1x1", x),
        c("branch5x5_2", c("branch5x5_1", x)),
        c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x))),
        c("branch_pool", _avg_pool_exclude_pad(x))], axis=-1)
  if kind == "B":
    return jnp.concatenate([
        c("branch3x3", x),
        c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x))),
        _max_pool(x, 2, 0)], axis=-1)
  if kind == "C":
    b7 = c("branch7x7_3", c("branch7x7_2", c("branch7x7_1", x)))
    d7 = x
    for i in range(1, 6):
      d7 = c(f"branch7x7dbl_{i}", d7)
    return jnp.concatenate([c("branch1x1", x), b7, d7,
                            c("branch_pool", _avg_pool_exclude_pad(x))], axis=-1)
  if kind == "D":
    b7 = x
    for i in range(1, 5):
      b7 = c(f"branch7x7x3_{i}", b7)
    return jnp.concatenate([c("branch3x3_2", c("branch3x3_1", x)), b7, _max_pool(x, 2, 0)],
                           axis=-1)
  if kind == "E":  # Mixed_7b pools by average (FIDInceptionE_1), Mixed_7c by max (E_2)
    b3 = c("branch3x3_1", x)
    d3 = c("branch3x3dbl_2", c("branch3x3dbl_1", x))
    pool = _max_pool(x, 1, 1) if name == "Mixed_7c" else _avg_pool_exclude_pad(x)
    return jnp.concatenate([
        c("branch1x1", x),
        c("branch3x3_2a", b3), c("branch3x3_2b", b3),
        c("branch3x3dbl_3a", d3), c("branch3x3dbl_3b", d3),
        c("branch_pool", pool)], axis=-1)
  raise ValueError(kind)


def resize_bilinear(x, size: int):
  """[N, H, W, C] -> [N, size, size, C], as torch interpolate(bilinear, align_corners=False)."""
  n, _, _, ch = x.shape
  return jax.image.resize(x, (n, size, size, ch), "bilinear", antialias=False)


@jax.jit
def inception_pool3(params, images):
  """Pool3 features [N, 2048] of RGB images [N, H, W, 3] in [0, 1] (pytorch-fid's block 3)."""
  x = 2.0 * resize_bilinear(images, 299) - 1.0
  for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
    x = _conv(params, name, x)
  x = _max_pool(x, 2, 0)
  x = _conv(params, "Conv2d_4a_3x3", _conv(params, "Conv2d_3b_1x1", x))
  x = _max_pool(x, 2, 0)
  for name, kind, _, _ in INCEPTION_BLOCKS:
    x = _inception_block(params, name, kind, x)
  return x.mean(axis=(1, 2))  # adaptive average pool to 1x1


@functools.lru_cache(maxsize=2)
def _cached_inception(path: str, mtime: float):
  del mtime  # part of the cache key only: a rewritten file is read again
  return load_inception(path)


def check_inception_file(weights_path) -> str:
  """The path, or FileNotFoundError naming it and how to make it (call before long runs)."""
  return pretrained.require_file(weights_path, f"FID Inception weights ({INCEPTION_FILE})",
                                 INCEPTION_HOWTO)


def inception_features(images, weights_path, batch_size: int = 50) -> np.ndarray:
  """Inception-v3 pool3 features [N, 2048] (float64) of uint8 or [0, 1] float images."""
  check_inception_file(weights_path)
  params = _cached_inception(os.path.abspath(weights_path), os.path.getmtime(weights_path))
  images = pretrained.to_unit_images(images)
  return pretrained.batched(functools.partial(inception_pool3, params), images,
                            min(batch_size, len(images)))


def fid_from_images(images_a, images_b, weights_path, batch_size: int = 50) -> float:
  """FID between two image sets (uint8 or [0, 1] float, [N, H, W, 1 or 3]).

  Biased upwards at small N like every Fréchet distance (frechet.frechet_distance); the
  standard protocol uses 50,000 samples, and numbers are comparable only at equal N.
  """
  return frechet.frechet_distance(inception_features(images_a, weights_path, batch_size),
                                  inception_features(images_b, weights_path, batch_size))
