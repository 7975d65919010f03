"""What the pretrained-network measures (Inception FID, CLIP score) share.

Nothing downloads: weights come from safetensors files the user provides, and a missing file
is a FileNotFoundError naming the file and how to make it. Images arrive as uint8 (0..255) or
float in [0, 1], grey or RGB, and networks run jitted over fixed-size batches so that one
compilation serves a whole image set.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST  # FID must not run its convs in bf16 on TPU


def require_file(path, what: str, howto: str) -> str:
  """The path, or FileNotFoundError naming `what`, the path and `howto` (how to make it)."""
  if path is None or not os.path.isfile(path):
    raise FileNotFoundError(f"{what} not found at {path!r}. {howto}")
  return path


def load_safetensors(path) -> dict[str, np.ndarray]:
  """Every tensor of a safetensors file, as numpy arrays by name."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  return load_file(path)


def check_tensor_shapes(tensors: dict, expected: dict, path, what: str, howto: str) -> None:
  """A ValueError naming the file, the missing tensors and the wrong shapes, unless every
  tensor of `expected` ({name: shape}) is in `tensors` with that shape (extras ignored)."""
  missing = [k for k in expected if k not in tensors]
  wrong = [f"{k}: {tensors[k].shape} != {v}" for k, v in expected.items()
           if k in tensors and tuple(tensors[k].shape) != v]
  if missing or wrong:
    raise ValueError(f"{path} is not {what}: {len(missing)} missing tensors {missing[:4]}, "
                     f"{len(wrong)} with wrong shapes {wrong[:4]}. {howto}")


def fold_batchnorm(tensors: dict, name: str, conv: str, eps: float):
  """`name.conv` (kernel O, I, *spatial; no bias) followed by BatchNorm `name.bn` (running
  statistics) -> one affine conv: (kernel *spatial, I, O, bias), float32."""
  g = lambda t: np.asarray(tensors[f"{name}.{t}"], np.float64)
  scale = g("bn.weight") / np.sqrt(g("bn.running_var") + eps)
  kernel = g(f"{conv}.weight")
  kernel = kernel * scale.reshape((-1,) + (1,) * (kernel.ndim - 1))
  bias = g("bn.bias") - g("bn.running_mean") * scale
  spatial = tuple(range(2, kernel.ndim))
  return (jnp.asarray(kernel.transpose(spatial + (1, 0)), jnp.float32),
          jnp.asarray(bias, jnp.float32))


def to_unit_images(images) -> np.ndarray:
  """uint8 [N, H, W, C] (0..255) or float (0..1), C in {1, 3} -> float32 RGB in [0, 1]."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [N, H, W, 1 or 3], got shape {images.shape}.")
  if images.shape[0] == 0:
    raise ValueError("got 0 images; pass at least one (two per set for a Fréchet distance).")
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / 255.0
  elif np.issubdtype(images.dtype, np.floating):
    if images.size and (images.min() < 0 or images.max() > 1):
      raise ValueError(f"float images must lie in [0, 1], got {images.min()}..{images.max()}.")
  else:
    raise ValueError(f"images must be uint8 (0..255) or float in [0, 1], got {images.dtype}; "
                     "convert integer levels with launch.images.to_uint8(images, num_levels).")
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return images.astype(np.float32)


def batched(fn, images: np.ndarray, batch_size: int) -> np.ndarray:
  """fn over fixed-size batches (the last one padded) so that one compilation serves all."""
  outs = []
  for i in range(0, len(images), batch_size):
    batch = images[i:i + batch_size]
    pad = batch_size - len(batch)
    if pad:
      batch = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)])
    outs.append(np.asarray(fn(jnp.asarray(batch)))[:batch_size - pad])
  return np.concatenate(outs).astype(np.float64)
