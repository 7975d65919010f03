"""Moving digits with captions: the offline default video data set.

Each video shows one of scikit-learn's 8x8 digits (17 grey levels, launch/data/digits.py)
moving across a small black canvas, e.g. 8 frames of 16x16, captioned from the digit and
its motion: "the digit 3 moving left". Videos are made on the fly from the example index,
so they are identical on every call, process and machine, and nothing is stored. With
`digit_scale = k` the digit is drawn k times larger (8k x 8k, pixel repetition), so a
cascade's data at 2x the base's size shows the base's digits at the base's scale.

Split: the digits' own (first 1,500 images train, last 297 test), imported from
launch/data/digits.py, so the video and image models and the digits classifier that scores
them never see a test digit in training. With `videos_per_digit = K`, example i of a split
shows the split's digit i mod n (n digits in the split) in its copy c = i div n, each copy
with its own motion.

The motion rule. Let g be the digit's index in `load_digits` (as for the digits' captions, so
a video never depends on which split holds it), c the copy, F frames of H x W, the frame
stride s, and R_y = H - 8k, R_x = W - 8k the room for the digit's top-left corner. Take
h = crc32("moving_digits:{g}:{c}") (zlib, identical everywhere) and read it as a
mixed-radix number, least significant digit first:
  1. direction = h mod 5: 0 left, 1 right, 2 up, 3 down, 4 bouncing;  h <- h div 5.
  2. speed: k = 1 + h mod num_speeds;  h <- h div num_speeds. The digit moves
     v = k * s pixels per frame (s source steps of k pixels each).
     num_speeds = min(max_speed, min(R_y, R_x) // ((F - 1) s)) (max_speed when F = 1), so
     a straight move of (F - 1) v pixels always fits on the canvas; a clip that cannot fit
     even at k = 1 (a canvas under 8k + (F - 1) s) is an error.
  3. the start (y0, x0) of the top-left corner, with D = (F - 1) v; each draw "h mod r"
     is followed by h <- h div r:
     left:  x0 = D + h mod (R_x - D + 1), then y0 = h mod (R_y + 1)
     right: x0 = h mod (R_x - D + 1),     then y0 = h mod (R_y + 1)
     up:    y0 = D + h mod (R_y - D + 1), then x0 = h mod (R_x + 1)
     down:  y0 = h mod (R_y - D + 1),     then x0 = h mod (R_x + 1)
     bouncing: y0 = h mod (R_y + 1), then x0 = h mod (R_x + 1), then one bit each:
               sign_y = +1 if h mod 2 else -1, then sign_x likewise.
  4. frame f (0-based) puts the corner at
     left (y0, x0 - v f), right (y0, x0 + v f), up (y0 - v f, x0), down (y0 + v f, x0),
     bouncing (reflect(y0 + sign_y v f, R_y), reflect(x0 + sign_x v f, R_x)), where
     reflect(u, R) = R - |(u mod 2R) - R| folds the straight path back at the walls 0 and R
     (a diagonal bounce, as in Moving MNIST).
  5. the caption: subject = CAPTION_SUBJECTS[h mod 5] naming the digit, h <- h div 5;
     motion phrase = MOTION_PHRASES[direction][h mod 3]; caption = subject + " " + phrase.
Rows grow downwards, so "up" lowers the row index. Every subject names the digit once (a
numeral or a word, as evaluation/digits_classifier.labels_from_prompts reads captions) and
every motion phrase holds exactly one of the words in DIRECTIONS (`direction_of_caption`).

`source[i]` = {"video": uint8 [F, H, W, 1] in 0..16, "label": int32 digit,
"caption": str, "direction": int32 code, "speed": int32 pixels per frame,
"track": float32 [F, 2] the (row, col) centre of mass of each frame}. The track is the
digit's own centre of mass plus the corner position (the digit never leaves the canvas), so
motion evaluation can compare a sample's track with its prompt's.
"""

import re
import zlib
from typing import NamedTuple

import numpy as np

from launch.data import digits as digits_lib
from launch.data import synthetic

DIRECTIONS = ("left", "right", "up", "down", "bouncing")
LEFT, RIGHT, UP, DOWN, BOUNCING = range(5)
DIGIT_SIZE = 8  # the digits are 8x8
OPTIONS = ("num_frames", "canvas", "frame_stride", "max_speed", "videos_per_digit",
           "digit_scale")

# Each subject names the digit exactly once; {a_word} is "a seven" / "an eight".
CAPTION_SUBJECTS = (
    "the digit {numeral}",
    "a handwritten {word}",
    "{a_word}",
    "the number {word}",
    "a handwritten digit {numeral}",
)
# Each phrase holds exactly one word of DIRECTIONS and no number.
MOTION_PHRASES = (
    ("moving left", "sliding to the left", "going left"),
    ("moving right", "sliding to the right", "going right"),
    ("moving up", "sliding up", "going up"),
    ("moving down", "sliding down", "going down"),
    ("bouncing around", "bouncing off the walls", "bouncing"),
)


class Motion(NamedTuple):
  """The motion of one video (module docstring, steps 1-4)."""
  direction: int
  speed: int      # pixels per frame, v
  y0: int
  x0: int
  sign_y: int     # bouncing only (0 otherwise)
  sign_x: int
  phrasing: int   # the hash left for step 5


def reflect(u, room: int):
  """Folds positions u back into [0, room] at the walls: room - |(u mod 2 room) - room|."""
  u = np.asarray(u)
  if room == 0:
    return np.zeros_like(u)
  return room - np.abs(np.mod(u, 2 * room) - room)


def num_speeds(canvas: tuple[int, int], num_frames: int, frame_stride: int,
               max_speed: int, digit: int = DIGIT_SIZE) -> int:
  """How many speeds k = 1..num_speeds keep a straight move on the canvas (step 2)."""
  room = min(canvas[0], canvas[1]) - digit
  if num_frames == 1:
    return max_speed
  return min(max_speed, room // ((num_frames - 1) * frame_stride))


def motion_for(key_hash: int, canvas: tuple[int, int], num_frames: int, frame_stride: int,
               speeds: int, digit: int = DIGIT_SIZE) -> Motion:
  """Steps 1-3 of the rule: a Motion from h = crc32 of the example's key."""
  h = int(key_hash)
  room_y, room_x = canvas[0] - digit, canvas[1] - digit

  def take(radix):
    nonlocal h
    h, digit = divmod(h, radix)
    return digit

  direction = take(5)
  speed = (1 + take(speeds)) * frame_stride
  travel = (num_frames - 1) * speed
  sign_y = sign_x = 0
  if direction in (LEFT, RIGHT):
    x0 = take(room_x - travel + 1) + (travel if direction == LEFT else 0)
    y0 = take(room_y + 1)
  elif direction in (UP, DOWN):
    y0 = take(room_y - travel + 1) + (travel if direction == UP else 0)
    x0 = take(room_x + 1)
  else:
    y0, x0 = take(room_y + 1), take(room_x + 1)
    sign_y, sign_x = (1 if take(2) else -1), (1 if take(2) else -1)
  return Motion(direction, speed, y0, x0, sign_y, sign_x, h)


def corner_track(motion: Motion, canvas: tuple[int, int], num_frames: int,
                 digit: int = DIGIT_SIZE) -> np.ndarray:
  """Step 4: the digit's top-left corner (row, col) in each frame, int [F, 2]."""
  f = np.arange(num_frames)
  step = motion.speed * f
  y = np.full(num_frames, motion.y0)
  x = np.full(num_frames, motion.x0)
  if motion.direction == LEFT:
    x = x - step
  elif motion.direction == RIGHT:
    x = x + step
  elif motion.direction == UP:
    y = y - step
  elif motion.direction == DOWN:
    y = y + step
  else:
    y = reflect(motion.y0 + motion.sign_y * step, canvas[0] - digit)
    x = reflect(motion.x0 + motion.sign_x * step, canvas[1] - digit)
  return np.stack([y, x], axis=1).astype(np.int64)


def caption_phrasings(label: int, direction: int) -> list[str]:
  """Every caption of a digit and a motion, in the order subject-major (step 5)."""
  if not 0 <= int(label) < digits_lib.NUM_CLASSES:
    raise ValueError(f"digit label must be in 0..9, got {label}")
  word = digits_lib.DIGIT_WORDS[int(label)]
  subjects = [s.format(numeral=str(int(label)), word=word, a_word=digits_lib.with_article(word))
              for s in CAPTION_SUBJECTS]
  return [f"{s} {m}" for s in subjects for m in MOTION_PHRASES[int(direction)]]


def caption_for(label: int, direction: int, phrasing: int) -> str:
  """Step 5: the caption chosen by the hash left over after the motion."""
  phrases = MOTION_PHRASES[int(direction)]
  h = int(phrasing)
  subject, h = h % len(CAPTION_SUBJECTS), h // len(CAPTION_SUBJECTS)
  return caption_phrasings(label, direction)[subject * len(phrases) + h % len(phrases)]


def direction_of_caption(caption: str) -> int:
  """The motion code a caption names: the one word of DIRECTIONS in it (else an error)."""
  words = set(re.findall(r"[a-z]+", caption.lower()))
  found = [d for d, name in enumerate(DIRECTIONS) if name in words]
  if len(found) != 1:
    raise ValueError(f"caption {caption!r} names {len(found)} motions; a moving-digits "
                     f"caption holds exactly one of {DIRECTIONS}")
  return found[0]


def parse_shape(spec: str) -> tuple[int, int, int]:
  """"8x16x16" -> (8, 16, 16): frames x height x width, as Ho et al. write 16x64x64."""
  return synthetic.parse_dims(spec, "moving digits shape must be FxHxW (frames x height x "
                              "width)", "moving_digits:8x16x16")


class MovingDigitsSource:
  """Random-access source of moving-digit videos over one split of the digits.

  Metadata: num_levels=17, num_classes=10, num_frames=F, frame_shape=(H, W, 1),
  video_shape=(F, H, W, 1), and image_shape=frame_shape (the shape of one frame, for code
  that sizes per-frame layers or trains on images of the same size jointly).
  """

  num_levels = digits_lib.NUM_LEVELS
  num_classes = digits_lib.NUM_CLASSES

  def __init__(self, split: str = "train", *, num_frames: int = 8,
               canvas: tuple[int, int] = (16, 16), frame_stride: int = 1,
               max_speed: int = 3, videos_per_digit: int = 1, digit_scale: int = 1):
    for name, value in (("num_frames", num_frames), ("frame_stride", frame_stride),
                        ("max_speed", max_speed), ("videos_per_digit", videos_per_digit),
                        ("digit_scale", digit_scale)):
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"moving digits: {name} must be a positive int, got {value!r}")
    canvas = tuple(int(c) for c in canvas)
    self.digit_scale = int(digit_scale)
    self.digit_size = size = DIGIT_SIZE * self.digit_scale
    if len(canvas) != 2 or min(canvas) <= size:
      raise ValueError(f"moving digits: canvas must be (height, width) larger than the "
                       f"{size}x{size} digit (digit_scale {self.digit_scale}) so it can move, "
                       f"got {canvas}")
    self.split = split
    self.num_frames, self.canvas = int(num_frames), canvas
    self.frame_stride, self.max_speed = int(frame_stride), int(max_speed)
    self.videos_per_digit = int(videos_per_digit)
    self.num_speeds = num_speeds(canvas, self.num_frames, self.frame_stride, self.max_speed,
                                 size)
    if self.num_speeds < 1:
      need = size + (self.num_frames - 1) * self.frame_stride
      raise ValueError(
          f"moving digits: {self.num_frames} frames at frame_stride {self.frame_stride} move "
          f"a digit at least {need - size} px, more than a {canvas[0]}x{canvas[1]} "
          f"canvas leaves an {size}x{size} digit ({min(canvas) - size} px): "
          f"use a canvas of at least {need}x{need}, fewer frames or a smaller frame_stride")
    self.frame_shape = (*canvas, 1)
    self.image_shape = self.frame_shape
    self.video_shape = (self.num_frames, *self.frame_shape)
    self._digits = digits_lib.DigitsSource(split, with_captions=False)
    images, _ = digits_lib.load_all()
    # The digit's own centre of mass (row, col), mass = grey level: the track's offset. A
    # digit enlarged k times by pixel repetition has it at k c + (k - 1) / 2.
    mass = images[..., 0].astype(np.float64)
    rows = np.arange(DIGIT_SIZE, dtype=np.float64)
    total = mass.sum(axis=(1, 2))
    com = np.stack([(mass.sum(2) * rows).sum(1) / total,
                    (mass.sum(1) * rows).sum(1) / total], axis=1)
    self._digit_com = self.digit_scale * com + (self.digit_scale - 1) / 2

  def __len__(self) -> int:
    return len(self._digits) * self.videos_per_digit

  def key(self, i: int) -> tuple[int, int]:
    """(g, c): the digit's index in load_digits and the copy of example i."""
    copy, j = divmod(int(i), len(self._digits))
    return self._digits.global_index(j), copy

  def motion(self, i: int) -> Motion:
    """The motion of example i (module docstring, steps 1-3)."""
    g, copy = self.key(i)
    h = zlib.crc32(f"moving_digits:{g}:{copy}".encode())
    return motion_for(h, self.canvas, self.num_frames, self.frame_stride, self.num_speeds,
                      self.digit_size)

  def caption(self, i: int) -> str:
    """source[i]["caption"] without drawing the video (text_cache.encode_split uses it)."""
    motion = self.motion(i)
    label = int(self._digits[int(i) % len(self._digits)]["label"])
    return caption_for(label, motion.direction, motion.phrasing)

  def __getitem__(self, i: int) -> dict:
    if not -len(self) <= i < len(self):
      raise IndexError(f"index {i} out of range for {self!r} of {len(self)} examples")
    i = int(i) % len(self)
    g, _ = self.key(i)
    digit = self._digits[i % len(self._digits)]
    motion = self.motion(i)
    corners = corner_track(motion, self.canvas, self.num_frames, self.digit_size)
    image = np.kron(digit["image"], np.ones((self.digit_scale, self.digit_scale, 1), np.uint8))
    video = np.zeros(self.video_shape, np.uint8)
    size = self.digit_size
    for f, (y, x) in enumerate(corners):
      video[f, y:y + size, x:x + size] = image
    label = int(digit["label"])
    return {"video": video, "label": np.int32(label),
            "caption": caption_for(label, motion.direction, motion.phrasing),
            "direction": np.int32(motion.direction), "speed": np.int32(motion.speed),
            "track": (corners + self._digit_com[g]).astype(np.float32)}

  def __repr__(self) -> str:
    # grain checks repr(source) when restoring an iterator state: no addresses.
    return (f"MovingDigitsSource(split={self.split!r}, num_frames={self.num_frames}, "
            f"canvas={self.canvas}, frame_stride={self.frame_stride}, "
            f"max_speed={self.max_speed}, videos_per_digit={self.videos_per_digit}"
            + (f", digit_scale={self.digit_scale})" if self.digit_scale > 1 else ")"))


def from_name(name: str, split: str, **options) -> MovingDigitsSource:
  """The registry's entry: "moving_digits" (8 frames of 16x16) or "moving_digits:FxHxW".

  options: frame_stride, max_speed, videos_per_digit, digit_scale (and num_frames / canvas
  when the name gives no shape).
  """
  if name != "moving_digits":
    if not name.startswith("moving_digits:"):
      raise ValueError(f"not a moving digits name: {name!r}; use 'moving_digits' or "
                       "'moving_digits:FxHxW', e.g. 'moving_digits:8x16x16'")
    frames, height, width = parse_shape(name[len("moving_digits:"):])
    for key in ("num_frames", "canvas"):
      if key in options:
        raise ValueError(f"{name!r} already gives the shape; drop the {key} option")
    options = dict(options, num_frames=frames, canvas=(height, width))
  unknown = set(options) - set(OPTIONS)
  if unknown:
    raise ValueError(f"unknown moving digits options {sorted(unknown)}; valid: {OPTIONS}")
  return MovingDigitsSource(split, **options)
