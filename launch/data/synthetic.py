"""Synthetic images for throughput benchmarks: no files, no decoding, same interface.

Example `i` is generated from a generator seeded with (seed, split, i), so `source[i]` is the
same on every call, process and machine, and nothing is held in memory. Pixels are uniform
over 0..num_levels-1; labels uniform over 0..num_classes-1. Name in the registry:
"synthetic:HxWxC" (e.g. "synthetic:64x64x3").
"""

import numpy as np

_SPLIT_IDS = {"train": 0, "test": 1, "validation": 2}


def parse_dims(spec: str, what: str, example: str) -> tuple[int, int, int]:
  """"AxBxC" -> (A, B, C), three positive integers; else an error naming `what` (the shape's
  meaning, e.g. "synthetic image shape must be HxWxC") and an `example` spec."""
  try:
    shape = tuple(int(d) for d in spec.lower().split("x"))
  except ValueError:
    shape = ()
  if len(shape) != 3 or min(shape) <= 0:
    raise ValueError(f"{what} with positive integers, e.g. '{example}'; got {spec!r}")
  return shape


def parse_shape(spec: str) -> tuple[int, int, int]:
  """"32x32x3" -> (32, 32, 3)."""
  return parse_dims(spec, "synthetic image shape must be HxWxC", "synthetic:32x32x3")


class SyntheticSource:
  """Random-access source of random images: {"image": uint8 HxWxC, "label": int32}."""

  def __init__(self, image_shape=(32, 32, 3), split: str = "train",
               num_examples: int | None = None, num_classes: int = 10,
               num_levels: int = 256, seed: int = 0, with_captions: bool = False):
    if split not in _SPLIT_IDS:
      raise ValueError(f"unknown synthetic split {split!r}; valid: {tuple(_SPLIT_IDS)}")
    if not 2 <= num_levels <= 256:
      raise ValueError(f"num_levels must be in 2..256 to fit uint8, got {num_levels}")
    self.image_shape = tuple(int(d) for d in image_shape)
    self.split = split
    self.num_examples = int(num_examples if num_examples is not None else
                            (50_000 if split == "train" else 10_000))
    self.num_classes = num_classes
    self.num_levels = num_levels
    self.seed = seed
    self.with_captions = with_captions   # "random image of class k": for text-to-image benches

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, i: int) -> dict:
    if not 0 <= i < self.num_examples:
      raise IndexError(f"index {i} out of range for {self!r}")
    rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], int(i)])
    image = rng.integers(0, self.num_levels, self.image_shape, dtype=np.uint8)
    label = np.int32(rng.integers(0, self.num_classes))
    out = {"image": image, "label": label}
    if self.with_captions:
      out["caption"] = f"random image of class {int(label)}"
    return out

  def __repr__(self) -> str:
    return (f"SyntheticSource(image_shape={self.image_shape}, split={self.split!r}, "
            f"num_examples={self.num_examples}, num_classes={self.num_classes}, "
            f"num_levels={self.num_levels}, seed={self.seed}"
            f"{', with_captions=True' if self.with_captions else ''})")


class VideoMetadata:
  """The metadata of a video data set of clips [F, H, W, C] without its data: what shapes a
  video model for `launch.aot` (frame count, frame and clip shapes, levels)."""

  def __init__(self, video_shape, num_levels: int = 256, num_classes: int = 0):
    self.video_shape = tuple(int(d) for d in video_shape)
    self.num_frames, self.frame_shape = self.video_shape[0], self.video_shape[1:]
    self.image_shape = self.frame_shape
    self.num_levels, self.num_classes = num_levels, num_classes
