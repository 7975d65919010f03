"""Video super-resolution inputs of the Imagen Video cascade (Ho et al. 2022b, "Imagen Video",
sec. 2.2-2.3 and 2.5).

A super-resolution stage sees the previous stage's clip, brought to its own shape and
concatenated channel-wise to z_t (the Video U-Net's cond["lowres"], built with
lowres_cond=True). The paper (sec. 2.3): "spatial upsampling before concatenation is
performed using bilinear resizing, and temporal upsampling before concatenation is
performed by repeating frames or by filling in blank frames."

  * SSR (spatial, `lowres_size` > 0): the clip at the previous stage's frame size, every
    frame bilinearly upsampled (per frame; the frame axis is untouched).
  * TSR (temporal, `lowres_frames` > 0): the clip at the previous stage's frame count, every
    k-th frame of this stage's clip (k = num_frames / lowres_frames, the frame skipping of
    sec. 2.2), placed at its time: low frame i lands on frame i k. The k - 1 frames after it
    are filled (`tsr_fill`) either by repeating it ("repeat") or blank ("blank": zeros, the
    middle grey of [-1, 1]); the paper names both and does not say which it used.
A stage may do both (spatially, then temporally); the paper's stages do one each.

Noise conditioning augmentation (sec. 2.5, imagen/noise_augmentation.py) is applied to the
upsampled and filled clip, one level t_aug per video: U[0, max_aug_level) in training,
the fixed sample_aug_level at sampling.

In training the low-resolution clip is made from the stage's own clip x (area downsampling
and frame skipping compose exactly with the stage's own, so this equals reading the data at
the previous stage's shape). Joint image-video examples (cond["is_image"]) of a TSR stage
hold independent frames, which have no low-frame-rate version: each of their frames is its
own known frame (spatially reduced as usual).

Frames may be non-square: shapes are (F, H, W); `lowres_size` is the previous stage's frame
height and the width scales by the same factor.
"""

import jax
import jax.numpy as jnp

from imagen import noise_augmentation

FILLS = ("repeat", "blank")


def area_downsample(x, height: int, width: int):
  """Mean over pixel blocks: [..., H, W, C] -> [..., height, width, C] (H, W multiples)."""
  *lead, h, w, c = x.shape
  fh, fw = h // height, w // width
  x = x.reshape(tuple(lead) + (height, fh, width, fw, c))
  return x.mean(axis=(-4, -2))


def upsample_frames(x, height: int, width: int):
  """Bilinear resizing of every frame of [B, F, h, w, C] clips to height x width (half-pixel
  centres, edges clamped: torch's align_corners=False)."""
  b, f, _, _, c = x.shape
  return jax.image.resize(x, (b, f, height, width, c), method="bilinear")


def place_frames(x_low, factor: int, fill: str = "repeat"):
  """[B, F/k, ...] -> [B, F, ...]: low frame i at frame i k, the k - 1 frames after it
  repeating it ("repeat") or zero ("blank") (Imagen Video sec. 2.3)."""
  if fill not in FILLS:
    raise ValueError(f"unknown tsr_fill {fill!r}; choose one of {FILLS}")
  b, f_low = x_low.shape[:2]
  out = jnp.repeat(x_low, factor, axis=1)
  if fill == "blank":
    known = (jnp.arange(f_low * factor) % factor == 0).reshape((1, -1) + (1,) * (x_low.ndim - 2))
    out = jnp.where(known, out, 0.0)
  return out


def low_shape(model) -> tuple:
  """(F_low, h_low, w_low, C): the clip shape a stage conditions on (the previous stage's)."""
  frames, height, width, channels = model.image_shape
  if model.lowres_size:
    return (model.lowres_frames or frames, model.lowres_size,
            width * model.lowres_size // height, channels)
  return (model.lowres_frames or frames, height, width, channels)


def check_stage(image_shape, lowres_size: int, lowres_frames: int, fill: str):
  """Clear errors for SR settings that do not divide the stage's clip shape."""
  frames, height, width, _ = image_shape
  if lowres_size and (height % lowres_size or width * lowres_size % height
                      or lowres_size >= height):
    raise ValueError(f"model.lowres_size={lowres_size} must be a proper divisor of the frame "
                     f"height {height} that scales the width {width} to whole pixels (the "
                     "previous stage's frame height)")
  if lowres_frames and (frames % lowres_frames or lowres_frames >= frames):
    raise ValueError(f"model.lowres_frames={lowres_frames} must be a proper divisor of "
                     f"model.num_frames={frames} (the previous stage's frame count)")
  if fill not in FILLS:
    raise ValueError(f"model.tsr_fill={fill!r}: choose one of {FILLS}")


def spatial_factor(model) -> int:
  """How many times larger the stage's frames are than its input's (1: no SSR)."""
  return model.image_shape[1] // model.lowres_size if model.lowres_size else 1


def low_clip(model, x):
  """The low-resolution clip of the stage's clips x [B, F, H, W, C] (whole frames or
  training crops): every k-th frame, area-downsampled by the stage's spatial factor."""
  f_low, factor = low_shape(model)[0], spatial_factor(model)
  x = x[:, ::x.shape[1] // f_low]
  return area_downsample(x, x.shape[2] // factor, x.shape[3] // factor) if factor > 1 else x


def upsampled(model, x_low, size=None):
  """The previous stage's clips [B, F_low, h_low, w_low, C] brought to the stage's shape
  (bilinear per frame, then frames placed and filled): the conditioning before
  augmentation. `size` (H, W): the frame size of training crops (default: whole frames)."""
  frames = model.image_shape[0]
  if size is None:
    height, width = model.image_shape[1:3]
    if tuple(x_low.shape[1:]) != low_shape(model):
      raise ValueError(f"this stage conditions on clips of shape {low_shape(model)} (frames, "
                       f"height, width, channels: the previous stage's output), got "
                       f"{tuple(x_low.shape[1:])}")
  else:
    height, width = size
  if x_low.shape[2:4] != (height, width):
    x_low = upsample_frames(x_low, height, width)
  if x_low.shape[1] != frames:
    x_low = place_frames(x_low, frames // x_low.shape[1], model.tsr_fill)
  return x_low


def random_crops(model, x, rng, crop_size):
  """Per-clip random (h, w) = crop_size windows of x [B, F, H, W, C], the same window in
  every frame, with corners on the stage's spatial-factor grid so that area-downsampling a
  crop equals cropping the downsampled clip (Imagen's 256 -> 1024 recipe, which Imagen
  Video's ssr3 follows at 1280x768, sec. 2.3)."""
  b, f, h, w, c = x.shape
  (ch, cw), factor = crop_size, spatial_factor(model)
  if ch > h or cw > w or ch % factor or cw % factor:
    raise ValueError(f"model.crop_size={tuple(crop_size)} must fit in the {h}x{w} frames and "
                     f"be a multiple of the stage's upsampling factor {factor}")
  k_y, k_x = jax.random.split(rng)
  ys = jax.random.randint(k_y, (b,), 0, (h - ch) // factor + 1) * factor
  xs = jax.random.randint(k_x, (b,), 0, (w - cw) // factor + 1) * factor
  return jax.vmap(lambda clip, y, x0: jax.lax.dynamic_slice(clip, (0, y, x0, 0),
                                                            (f, ch, cw, c)))(x, ys, xs)


def training_input(model, x, is_image=None):
  """The conditioning clip (before augmentation) of the stage's clips x (whole frames or
  training crops): low_clip then upsampled; examples flagged is_image [B] keep all their
  frames as known frames."""
  up = upsampled(model, low_clip(model, x), size=x.shape[2:4])
  if is_image is None or not model.lowres_frames:
    return up
  own = x
  if model.lowres_size:
    factor = spatial_factor(model)
    own = upsample_frames(area_downsample(x, x.shape[2] // factor, x.shape[3] // factor),
                          *x.shape[2:4])
  return jnp.where(is_image.reshape((-1, 1, 1, 1, 1)), own, up)


def augment(model, up, rng, t_aug):
  """cond entries {"lowres", "aug_logsnr"}: the upsampled clip noise-augmented to t_aug [B]
  (one level per video; t_aug = 0 leaves it unchanged)."""
  z_lr, aug_logsnr = noise_augmentation.augment(up, t_aug, rng, model.schedule)
  return {"lowres": z_lr, "aug_logsnr": aug_logsnr}
