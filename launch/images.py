"""Sample grids as PNG files, so a person can look at what a model makes."""

import io
import math
import os

import numpy as np
from PIL import Image

from launch import fs


def to_uint8(images, num_levels: int) -> np.ndarray:
  """Integer levels 0..num_levels-1 -> uint8 0..255 (17 grey levels spread over 0..255)."""
  images = np.asarray(images, np.float64)
  return np.round(images * 255.0 / (num_levels - 1)).clip(0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, num_levels: int, *, columns: int | None = None,
              scale: int = 1, pad: int = 1) -> np.ndarray:
  """Tiles [N, H, W, C] integer images into one uint8 image with `pad` pixels between cells."""
  images = to_uint8(images, num_levels)
  n, h, w, c = images.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, columns)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + col * (w + pad):pad + col * (w + pad) + w] = images[i]
  if scale > 1:
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
  return grid


def default_scale(height: int) -> int:
  """Nearest-neighbour enlargement of cells `height` pixels high to about 64 px."""
  return max(1, 64 // height)


def write_grid(path, images, num_levels: int, *, columns: int | None = None,
               scale: int | None = None) -> str:
  """Writes a PNG grid; small images are enlarged (nearest) to about 64 px per cell."""
  images = np.asarray(images)
  scale = scale or default_scale(images.shape[1])
  return write_png(path, make_grid(images, num_levels, columns=columns, scale=scale))


def write_png(path, image: np.ndarray) -> str:
  """Writes one uint8 [H, W, C] image (C 1 or 3) as a PNG, local or gs://."""
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  fs.write_atomic(path, buffer.getvalue())
  return os.fspath(path)
