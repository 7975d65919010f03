"""Video measures for moving digits, computed offline (no downloads, numpy only).

A video batch is [N, F, H, W] (or [N, F, H, W, 1]) of integer grey levels 0..num_levels-1 on
a black canvas, as launch/data/moving_digits.py makes them (one 8x8 scikit-learn digit moving
across an H x W canvas) and as a sampler's quantised output should look. The measures reuse
the digits classifier of digits_classifier.py (a 64-64-10 MLP on 8x8 digits) and the
Fréchet distance of frechet.py:

  * `prompt_alignment`: share of frames (all videos, all frames) classified as the digit the
    prompt names.
  * `direction_accuracy`: share of videos whose centre-of-mass track moves the way the prompt
    says (left, right, up, down, bouncing); the rule is `motion_directions`.
    `axis_accuracy`: the same up to the sign (horizontal, vertical, bouncing).
  * `identity_consistency`: per video, the share of frames whose predicted class is the
    video's majority class, averaged over videos (1.0 = the digit never changes).
  * `video_frechet_distance`: a Fréchet distance between two video sets in OUR features, the
    classifier's hidden units averaged over frames plus centre-of-mass velocity statistics.
    It plays FVD's role for moving digits but it is NOT FVD (Unterthiner et al. 2018), which
    uses I3D logits on 224x224 natural video (i3d.py, from a user-provided weight file); the
    two are not comparable.

Centre of mass: the level-weighted mean (row, col) of each frame over the whole canvas;
a blank frame gets the canvas centre. Rows grow downwards, so "up" lowers the row. The
motion measures track the digit (`digit_tracks`): pixels under TRACK_FLOOR of the level
range count as background there, so the faint speckle a sampler may leave on the canvas
(the digits cascade's 32x32 stage: a fifth of its pixels at levels 1-3) does not pull the
track towards the canvas centre and stop the digit. The real clips' background is 0.

Cropping: the classifier sees 8x8 digits, so on a larger canvas each frame is cropped to an
8x8 window first. The window is placed so that the frame's centre of mass sits where the
digits' centre of mass sits on average inside their own 8x8 box (about (3.49, 3.58) over the
train split), then slid by up to 2 pixels in each direction to the position holding the most
mass (ties: the one nearest that first placement), clamped to the canvas. A whole digit
pasted on a blank canvas is cropped exactly in 90% of the test split's digits (pasted at
random on 16x16), against 73% for the centre-of-mass placement alone, and the classifier's
accuracy on the crops is 0.912 against 0.926 on the digits themselves (0.795 without the
slide): digits whose own centre of mass is off the average lose a column to a pure
centre-of-mass crop. An 8x8 canvas is used as is.

Digit scale: data drawn with digits k times larger (moving_digits `digit_scale = k`, as a
cascade's data is) pass `digit_scale=k`; the classifier then reads each frame reduced by
k x k block means of an 8k x 8k crop (placed as above with every length times k, then moved
by under k pixels onto the digit's own k x k pixel grid, `on_block_grid`), while the motion
is measured on the full frames, so tracks and speeds stay in the clip's own pixels. Every
test digit enlarged 2x and pasted at random on 40x40 is then read as the digit itself in 88%
of cases and as the digit shifted by whole pixels otherwise (never blurred), with classifier
accuracy 0.909 against 0.912 at scale 1.

On the real moving digits (launch/data/moving_digits.py, test split: 297 videos of 8 frames,
16x16, their captions) the measures give alignment 0.917, direction accuracy 1.0, identity
consistency 0.998, and the FD against the first 297 train videos is 0.76: the values a
perfect sampler approaches (FD only at equal N).
"""

import functools

import numpy as np

from evaluation import digits_classifier as dc
from evaluation import frechet

DIRECTIONS = ("left", "right", "up", "down", "bouncing")  # as launch/data/moving_digits.py
STATIC = len(DIRECTIONS)  # the code `motion_directions` gives a video that does not move
DIGIT = dc.IMAGE_SHAPE[0]  # 8
SLIDE = 2  # pixels the crop may slide from its centre-of-mass placement
MIN_SPEED = 0.5  # pixels per frame, averaged over the video, for an axis to count as moving
TRACK_FLOOR = 2 / 16  # of the level range: fainter pixels are background to digit_tracks
MOTION_FEATURES = ("mean velocity row", "mean velocity col", "std velocity row",
                   "std velocity col", "mean speed")


# --- input checks ----------------------------------------------------------------------------

def check_videos(videos, num_levels: int = dc.NUM_LEVELS) -> np.ndarray:
  """Validates integer-level videos [N, F, H, W] or [N, F, H, W, 1]; returns [N, F, H, W]."""
  videos = np.asarray(videos)
  if videos.ndim == 5 and videos.shape[-1] == 1:
    videos = videos[..., 0]
  if videos.ndim != 4:
    raise ValueError(f"videos must be [N, F, H, W] or [N, F, H, W, 1] grey levels, got shape "
                     f"{videos.shape}.")
  if videos.shape[0] == 0 or videos.shape[1] == 0:
    raise ValueError(f"got an empty video batch of shape {videos.shape}.")
  if videos.shape[2] < DIGIT or videos.shape[3] < DIGIT:
    raise ValueError(f"the canvas {videos.shape[2]}x{videos.shape[3]} is smaller than the "
                     f"{DIGIT}x{DIGIT} digits the classifier reads.")
  if not (np.issubdtype(videos.dtype, np.integer) or np.issubdtype(videos.dtype, np.floating)):
    raise ValueError(f"videos must hold integer grey levels, got dtype {videos.dtype}.")
  lo, hi = videos.min(), videos.max()
  fractional = np.issubdtype(videos.dtype, np.floating) and not np.all(videos == np.round(videos))
  if lo < 0 or hi > num_levels - 1 or fractional:
    raise ValueError(f"video pixels must be integer levels 0..{num_levels - 1} (num_levels="
                     f"{num_levels}), got values {lo}..{hi}"
                     f"{' with fractions' if fractional else ''}; quantise samples to levels "
                     "first, or pass the num_levels they were quantised to.")
  return videos


def _check_batch(videos, n_prompts: int, what: str):
  if n_prompts != len(videos):
    raise ValueError(f"got {len(videos)} videos but {n_prompts} {what}; pass one per video.")


# --- centre of mass and cropping -------------------------------------------------------------

def centres_of_mass(videos) -> np.ndarray:
  """Level-weighted (row, col) centroid of every frame, [N, F, 2]; blank frames: the centre."""
  v = np.asarray(videos, np.float64)
  h, w = v.shape[-2:]
  mass = v.sum(axis=(-2, -1))
  rows = v.sum(axis=-1) @ np.arange(h)
  cols = v.sum(axis=-2) @ np.arange(w)
  blank = mass == 0
  safe = np.where(blank, 1.0, mass)
  centre = np.stack([np.where(blank, (h - 1) / 2, rows / safe),
                     np.where(blank, (w - 1) / 2, cols / safe)], axis=-1)
  return centre


def digit_tracks(videos, num_levels: int = dc.NUM_LEVELS) -> np.ndarray:
  """[N, F, 2] centres of mass of the digit: `centres_of_mass` with every pixel under
  TRACK_FLOOR of the level range (levels 0 and 1 of 0..16) set to background."""
  v = np.asarray(videos)
  return centres_of_mass(np.where(v >= TRACK_FLOOR * (num_levels - 1), v, 0))


@functools.lru_cache(maxsize=1)
def digit_centre() -> np.ndarray:
  """The digits' mean centre of mass (row, col) inside their 8x8 box, over the train split."""
  images, _ = dc.real_digits("train")
  return centres_of_mass(images[None, ..., 0])[0].mean(axis=0)


def scaled_digit_centre(k: int) -> np.ndarray:
  """The mean digit centre (row, col) in a digit drawn k times larger: k c + (k - 1) / 2."""
  return k * digit_centre() + (k - 1) / 2


def crop_corners(frames, digit_scale: int = 1) -> np.ndarray:
  """Top-left corners [M, 2] of the 8k x 8k crops of frames [M, H, W], k = digit_scale
  (module docstring; a k times larger digit has its centre at k c + (k - 1) / 2 and the
  crop slides k times as far)."""
  frames = np.asarray(frames, np.float64)
  m, h, w = frames.shape
  k = int(digit_scale)
  size, slide, centre = DIGIT * k, SLIDE * k, scaled_digit_centre(k)
  com = centres_of_mass(frames[:, None])[:, 0]
  start = np.rint(com - centre)
  integral = np.zeros((m, h + 1, w + 1))
  integral[:, 1:, 1:] = frames.cumsum(1).cumsum(2)
  offsets = np.array([(dy, dx) for dy in range(-slide, slide + 1)
                      for dx in range(-slide, slide + 1)])
  corners = start[:, None, :] + offsets[None]  # [M, (2 slide + 1)^2, 2]
  corners[..., 0] = np.clip(corners[..., 0], 0, h - size)
  corners[..., 1] = np.clip(corners[..., 1], 0, w - size)
  r, c = corners[..., 0].astype(int), corners[..., 1].astype(int)
  idx = np.arange(m)[:, None]
  mass = (integral[idx, r + size, c + size] - integral[idx, r, c + size]
          - integral[idx, r + size, c] + integral[idx, r, c])
  dist = ((corners + centre - com[:, None, :]) ** 2).sum(-1)
  # Most mass first, then nearest: masses of integer levels differ by >= 1 when they differ,
  # and dist < 100 k^2 (a candidate's centre stays within 6.5 k pixels of the centre of mass
  # per axis, clamping included), so mass - dist / (1000 k^2) orders the pairs
  # lexicographically.
  best = np.argmax(np.round(mass, 6) - 1e-3 * dist / k**2, axis=1)
  return corners[np.arange(m), best].astype(int)


def crop_digits(videos, digit_scale: int = 1) -> np.ndarray:
  """The 8x8 digit crop of every frame, [N, F, 8, 8] (the frames themselves on 8x8): an
  8k x 8k crop reduced by k x k block means rounded to levels, k = digit_scale, so a digit
  drawn k times larger is read as the 8x8 digit it was drawn from."""
  videos = np.asarray(videos)
  n, f, h, w = videos.shape
  k = int(digit_scale)
  size = DIGIT * k
  if k < 1 or h < size or w < size:
    raise ValueError(f"digit_scale {digit_scale} must be a positive int whose {size}x{size} "
                     f"digits fit the {h}x{w} frames.")
  if (h, w) == (size, size):
    crops = videos.reshape(n * f, size, size)
  else:
    frames = videos.reshape(n * f, h, w)
    corners = crop_corners(frames, k)
    if k > 1:
      corners = on_block_grid(frames, corners, k)
    crops = _crops(frames, corners, size)
  if k == 1:
    return crops.reshape(n, f, DIGIT, DIGIT)
  return _block_means(crops, k).reshape(n, f, DIGIT, DIGIT).astype(videos.dtype)


def _crops(frames, corners, size: int) -> np.ndarray:
  rows = corners[:, 0, None] + np.arange(size)
  cols = corners[:, 1, None] + np.arange(size)
  return frames[np.arange(len(frames))[:, None, None], rows[:, :, None], cols[:, None, :]]


def _block_means(crops, k: int) -> np.ndarray:
  """[M, S, S] -> [M, S/k, S/k]: k x k block means rounded to levels."""
  m, size = crops.shape[0], crops.shape[-1]
  blocks = np.asarray(crops, np.float64).reshape(m, size // k, k, size // k, k)
  return np.rint(blocks.mean(axis=(2, 4)))


def on_block_grid(frames, corners, k: int) -> np.ndarray:
  """Moves each 8k x 8k crop corner by under k pixels per axis onto the digit's own k x k
  pixel grid: among the shifts keeping the crop's mass, the one whose block means keep the
  most energy (sum of squares; blocks that straddle two of the digit's pixels average them
  and lose energy), then the one nearest the centre-of-mass placement (as crop_corners). A
  k times larger digit then reduces to itself, whole."""
  frames = np.asarray(frames, np.float64)
  m, h, w = frames.shape
  size = DIGIT * k
  ideal = centres_of_mass(frames[:, None])[:, 0] - scaled_digit_centre(k)
  shifts = [(dy, dx) for dy in range(1 - k, k) for dx in range(1 - k, k)]
  scores = []
  for dy, dx in shifts:
    moved = corners + np.array([dy, dx])
    moved[:, 0] = np.clip(moved[:, 0], 0, h - size)
    moved[:, 1] = np.clip(moved[:, 1], 0, w - size)
    crops = _crops(frames, moved, size)
    blocks = crops.reshape(m, DIGIT, k, DIGIT, k).mean(axis=(2, 4))
    scores.append((moved, np.round(crops.sum((1, 2)), 6), (blocks ** 2).sum((1, 2)),
                   ((moved - ideal) ** 2).sum(1)))
  mass = np.stack([s[1] for s in scores], 1)
  energy = np.stack([s[2] for s in scores], 1)
  dist = np.stack([s[3] for s in scores], 1)
  keeps = mass >= mass.max(axis=1, keepdims=True)
  # Energy first, then nearest: energies are sums of squared multiples of 1/k^2 levels, so
  # unequal ones differ by at least 1/k^4, far more than 1e-9 times a distance < 10^3.
  key = np.where(keeps, np.round(energy, 6) - 1e-9 * dist, -np.inf)
  best = np.argmax(key, axis=1)
  return np.stack([s[0] for s in scores], 1)[np.arange(m), best].astype(int)


# --- per-frame classification ----------------------------------------------------------------

def frame_predictions(videos, classifier: dc.DigitsClassifier | None = None,
                      num_levels: int = dc.NUM_LEVELS, digit_scale: int = 1) -> np.ndarray:
  """The classifier's digit for every frame's crop, [N, F]."""
  videos = check_videos(videos, num_levels)
  crops = crop_digits(videos, digit_scale)
  n, f = crops.shape[:2]
  classifier = classifier or dc.get_classifier()
  return classifier.predict(crops.reshape(n * f, DIGIT, DIGIT, 1), num_levels).reshape(n, f)


def prompt_alignment(videos, prompts, classifier: dc.DigitsClassifier | None = None,
                     num_levels: int = dc.NUM_LEVELS, digit_scale: int = 1) -> float:
  """Share of frames (over all videos) classified as the digit their video's prompt names.

  `prompts`: digit labels 0..9 or captions naming one digit ("the digit 3 moving left").
  """
  labels = dc.labels_from_prompts(prompts)
  preds = frame_predictions(videos, classifier, num_levels, digit_scale)
  _check_batch(preds, len(labels), "prompts")
  return float(np.mean(preds == labels[:, None]))


def identity_consistency(videos, classifier: dc.DigitsClassifier | None = None,
                         num_levels: int = dc.NUM_LEVELS, digit_scale: int = 1) -> float:
  """Mean over videos of the share of frames predicted as the video's majority class (ties:
  the smallest class). 1.0 when every video keeps one identity; 1/F at worst."""
  preds = frame_predictions(videos, classifier, num_levels, digit_scale)
  counts = np.stack([np.bincount(p, minlength=dc.NUM_CLASSES) for p in preds])
  return float(np.mean(counts.max(axis=1) / preds.shape[1]))


# --- motion ----------------------------------------------------------------------------------

def motion_directions(tracks, min_speed: float = MIN_SPEED) -> np.ndarray:
  """The motion of each centre-of-mass track [N, F, 2] (row, col): codes into DIRECTIONS,
  or STATIC.

  With velocities v_t = c_{t+1} - c_t, an axis's travel T = sum |v_t| and net displacement
  D = sum v_t:
    1. an axis moves if T >= min_speed * (F - 1) (half a pixel per frame by default);
    2. no axis moves: STATIC (never a prompt's direction);
    3. both axes move: "bouncing" (the moving digits' bouncing is diagonal; left, right, up
       and down move along one axis);
    4. one axis moves and reverses, |D| < T / 2 (over a quarter of its path runs back):
       "bouncing" (a bounce off a wall);
    5. otherwise the sign of D: col + "right", col - "left", row + "down", row - "up".
  """
  tracks = np.asarray(tracks, np.float64)
  if tracks.ndim != 3 or tracks.shape[-1] != 2:
    raise ValueError(f"tracks must be [N, F, 2] (row, col) per frame, got {tracks.shape}.")
  v = np.diff(tracks, axis=1)
  travel, net = np.abs(v).sum(axis=1), v.sum(axis=1)  # [N, 2]
  moves = (travel > 0) & (travel >= min_speed * (tracks.shape[1] - 1))  # one frame: STATIC
  out = np.full(len(tracks), STATIC)
  one = moves.sum(axis=1) == 1
  axis = np.argmax(moves, axis=1)  # the moving axis where exactly one moves
  d = net[np.arange(len(tracks)), axis]
  t = travel[np.arange(len(tracks)), axis]
  straight = one & (np.abs(d) >= t / 2)
  code = np.where(axis == 1, np.where(d > 0, DIRECTIONS.index("right"), DIRECTIONS.index("left")),
                  np.where(d > 0, DIRECTIONS.index("down"), DIRECTIONS.index("up")))
  out[straight] = code[straight]
  out[(moves.sum(axis=1) == 2) | (one & ~straight)] = DIRECTIONS.index("bouncing")
  return out


def directions_from_prompts(prompts) -> np.ndarray:
  """Direction codes from captions (exactly one of DIRECTIONS' words), names, or ints 0..4."""
  prompts = list(prompts)
  if prompts and all(isinstance(p, str) for p in prompts):
    codes = []
    for p in prompts:
      words = set(p.lower().replace(",", " ").replace(".", " ").split())
      found = [i for i, d in enumerate(DIRECTIONS) if d in words]
      if len(found) != 1:
        raise ValueError(f"caption {p!r} names {len(found)} directions; direction accuracy "
                         f"needs exactly one of {DIRECTIONS}, or pass direction codes 0..4.")
      codes.append(found[0])
    return np.array(codes, np.int64)
  codes = np.asarray(prompts)
  if codes.ndim != 1 or not np.issubdtype(codes.dtype, np.integer) or (
      len(codes) and (codes.min() < 0 or codes.max() >= len(DIRECTIONS))):
    raise ValueError(f"directions must be captions or ints 0..{len(DIRECTIONS) - 1} "
                     f"({', '.join(DIRECTIONS)}), got {codes!r:.80}.")
  return codes.astype(np.int64)


def direction_accuracy(videos, prompts, num_levels: int = dc.NUM_LEVELS,
                       min_speed: float = MIN_SPEED) -> float:
  """Share of videos whose digit's motion (`motion_directions` of `digit_tracks`) is the
  prompt's."""
  videos = check_videos(videos, num_levels)
  want = directions_from_prompts(prompts)
  _check_batch(videos, len(want), "prompts")
  return float(np.mean(motion_directions(digit_tracks(videos, num_levels), min_speed) == want))


# Motion codes up to their sign: left/right horizontal, up/down vertical, bouncing, static.
AXIS_OF = np.array([0, 0, 1, 1, 2, 3])


def axis_accuracy(videos, prompts, num_levels: int = dc.NUM_LEVELS,
                  min_speed: float = MIN_SPEED) -> float:
  """Share of videos moving along the prompt's axis, the sign aside ("left" is met by a
  move left or right, "bouncing" only by a bounce): beside direction_accuracy it tells a
  model that ignores the motion words (both near chance, 0.20 and 0.36 for the five
  motions' 2/5, 2/5, 1/5 split of axes) from one that reads the axis but not which way
  time runs (axis high, direction about half of it)."""
  videos = check_videos(videos, num_levels)
  want = directions_from_prompts(prompts)
  _check_batch(videos, len(want), "prompts")
  got = motion_directions(digit_tracks(videos, num_levels), min_speed)
  return float(np.mean(AXIS_OF[got] == AXIS_OF[want]))


# --- "FVD in our features" -------------------------------------------------------------------

def motion_features(tracks) -> np.ndarray:
  """[N, 5]: mean and std of the per-frame centroid velocity (row, col) and the mean speed."""
  v = np.diff(np.asarray(tracks, np.float64), axis=1)
  if v.shape[1] == 0:
    return np.zeros((len(v), len(MOTION_FEATURES)))
  return np.concatenate([v.mean(1), v.std(1), np.linalg.norm(v, axis=-1).mean(1)[:, None]], 1)


def video_features(videos, classifier: dc.DigitsClassifier | None = None,
                   num_levels: int = dc.NUM_LEVELS, digit_scale: int = 1) -> np.ndarray:
  """[N, 64 + 5]: the classifier's hidden units of each frame's crop averaged over frames,
  then `motion_features` of the centre-of-mass track (pixels per frame)."""
  videos = check_videos(videos, num_levels)
  crops = crop_digits(videos, digit_scale)
  n, f = crops.shape[:2]
  classifier = classifier or dc.get_classifier()
  feats = classifier.features(crops.reshape(n * f, DIGIT, DIGIT, 1), num_levels)
  return np.concatenate([feats.reshape(n, f, -1).mean(1),
                         motion_features(centres_of_mass(videos))], axis=1)


def video_frechet_distance(videos_a, videos_b, classifier: dc.DigitsClassifier | None = None,
                           num_levels: int = dc.NUM_LEVELS, digit_scale: int = 1) -> float:
  """Fréchet distance between two video sets in `video_features` ("FVD in our features").

  Not FVD: no I3D, no natural-video features; comparable only with itself, at equal sample
  counts (the estimate is biased upwards at small N, frechet.py).
  """
  feats_a = video_features(videos_a, classifier, num_levels, digit_scale)
  feats_b = video_features(videos_b, classifier, num_levels, digit_scale)
  if len(feats_a) < 2 or len(feats_b) < 2:
    raise ValueError("a Fréchet distance needs at least 2 videos per set (a covariance).")
  return frechet.frechet_distance(feats_a, feats_b)


def at_reference_scale(videos, reference):
  """(videos enlarged to the reference's frame size by pixel repetition, the reference at the
  videos' frame times, every k-th frame): how a cascade stage with fewer frames or pixels is
  compared with the data, since the digits classifier reads digits at the data's scale."""
  f, h, w = videos.shape[1:4]
  frames, height, width = reference.shape[1:4]
  if frames % f or height % h or width % w:
    raise ValueError(f"clips of {f}x{h}x{w} (frames x height x width) do not divide the "
                     f"reference's {frames}x{height}x{width}")
  big = np.repeat(np.repeat(videos, height // h, axis=2), width // w, axis=3)
  return big, reference[:, ::frames // f]


def video_report(videos, prompts=None, reference=None, num_levels: int = dc.NUM_LEVELS,
                 digit_scale: int = 1) -> dict:
  """{"alignment", "direction_accuracy", "axis_accuracy", "consistency", "fd"}: the first
  three need `prompts` (captions naming a digit and a direction), "fd" needs `reference`
  (real videos). `digit_scale`: the data's (module docstring)."""
  scale = dict(num_levels=num_levels, digit_scale=digit_scale)
  report = {"consistency": identity_consistency(videos, **scale)}
  if prompts is not None:
    report["alignment"] = prompt_alignment(videos, prompts, **scale)
    report["direction_accuracy"] = direction_accuracy(videos, prompts, num_levels)
    report["axis_accuracy"] = axis_accuracy(videos, prompts, num_levels)
  if reference is not None:
    report["fd"] = video_frechet_distance(videos, reference, **scale)
  return report
