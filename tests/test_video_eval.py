"""evaluation/video.py and evaluation/i3d.py.

Moving digits are made here by an independent simple rule: a real 8x8 test-split digit
pasted on a 20x20 black canvas (7 frames) at a corner that moves by a known step per frame
(left, right, up, down; "bouncing" moves diagonally and reflects at the walls, simulated step
by step). What
the measures must give follows from that rule: the centre-of-mass velocity of a rigidly
moving, whole digit is the corner's step, and a crop that keeps the whole digit shows the
digit itself, possibly shifted across its empty border columns.

I3D is checked against a PyTorch InceptionI3d written here (the pytorch-i3d layout: TF-SAME
padding, BN eps 1e-3), random weights with the real names and shapes, on small inputs.
"""

import math

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn
from torch.nn import functional as tf

from evaluation import digits_classifier as dc
from evaluation import frechet, i3d
from evaluation import video

CANVAS, FRAMES = 20, 7
ROOM = CANVAS - 8
STEPS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up", "bouncing": "left"}
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def corner_path(direction: str, speed: int = 1, start=(3, 3)) -> np.ndarray:
  """Top-left corners [F, 2]; straight moves start where the whole path fits on the canvas."""
  if direction == "bouncing":  # diagonal, reflected at the walls 0 and ROOM
    pos, vel, path = np.array(start), np.array([speed, speed]), []
    for _ in range(FRAMES):
      path.append(pos.copy())
      for a in range(2):
        if not 0 <= pos[a] + vel[a] <= ROOM:
          vel[a] = -vel[a]
      pos = pos + vel
    return np.array(path)
  step = np.array(STEPS[direction]) * speed
  first = np.where(step < 0, ROOM, np.where(step > 0, 0, start))
  return first + step * np.arange(FRAMES)[:, None]


def make_video(digit, path) -> np.ndarray:
  out = np.zeros((len(path), CANVAS, CANVAS), np.int64)
  for f, (r, c) in enumerate(path):
    out[f, r:r + 8, c:c + 8] = digit
  return out


def caption(label: int, direction: str, k: int) -> str:
  subject = f"the digit {label}" if k % 2 else f"a handwritten {WORDS[label]}"
  return f"{subject} {'bouncing around' if direction == 'bouncing' else 'moving ' + direction}"


@pytest.fixture(scope="module")
def digits():
  images, labels = dc.real_digits("test")
  return images[..., 0], labels


@pytest.fixture(scope="module")
def clf():
  return dc.get_classifier()


def placements_that_keep_the_digit(digit):
  """Every shift (dy, dx) in [-2, 2]^2 of the digit inside an 8x8 window that loses no mass."""
  out = []
  for dy in range(-2, 3):
    for dx in range(-2, 3):
      canvas = np.zeros((12, 12), digit.dtype)
      canvas[2:10, 2:10] = digit
      window = canvas[2 - dy:10 - dy, 2 - dx:10 - dx]
      if window.sum() == digit.sum():
        out.append(window)
  return np.stack(out)


def robust_digits(digits, clf, n):
  """The first n test digits the classifier reads correctly at every placement that keeps
  the whole digit in the window (so any crop holding the whole digit is read right)."""
  images, labels = digits
  keep = [i for i in range(len(images))
          if np.all(clf.predict(placements_that_keep_the_digit(images[i])[..., None]) ==
                    labels[i])]
  assert len(keep) >= n
  return images[keep[:n]], labels[keep[:n]]


def batch(images, labels, directions, speed=1):
  videos = np.stack([make_video(d, corner_path(directions[i % len(directions)], speed))
                     for i, d in enumerate(images)])
  dirs = [directions[i % len(directions)] for i in range(len(images))]
  return videos, dirs, [caption(int(l), d, i) for i, (l, d) in enumerate(zip(labels, dirs))]


DIRS = ("left", "right", "up", "down", "bouncing")


# --- alignment, consistency, direction ----------------------------------------------------------


def test_alignment_and_consistency_of_moving_digits(digits, clf):
  images, labels = robust_digits(digits, clf, 40)
  videos, _, captions = batch(images, labels, DIRS)
  assert video.prompt_alignment(videos, captions) == 1.0
  assert video.prompt_alignment(videos[..., None], labels) == 1.0  # [N, F, H, W, 1], labels
  assert video.prompt_alignment(videos, (labels + 1) % 10) == 0.0  # every prompt wrong
  assert video.identity_consistency(videos) == 1.0
  # A video whose digit changes after 3 of 7 frames: 4/7 frames agree with the majority.
  mixed = videos[:2].copy()
  mixed[0, :3] = videos[1, :3]
  assert video.identity_consistency(mixed[:1]) == pytest.approx(4 / 7)
  assert video.prompt_alignment(mixed[:1], labels[:1]) == pytest.approx(4 / 7)


def test_cropping_all_test_digits(digits, clf):
  """Every test digit pasted at random on 20x20: the crop is the digit's own box in about 90%
  (the module's documented figure) and the classifier reads the crops about as well as the
  unshifted digits (0.926)."""
  images, labels = digits
  rng = np.random.default_rng(0)
  corners = rng.integers(0, ROOM + 1, (len(images), 2))
  frames = np.stack([make_video(d, c[None])[0] for d, c in zip(images, corners)])
  got = video.crop_corners(frames)
  exact = np.mean(np.all(got == corners, axis=1))
  crops = video.crop_digits(frames[:, None])[:, 0]
  assert 0.87 < exact < 0.93
  whole = crops.reshape(len(crops), -1).sum(1) == images.reshape(len(images), -1).sum(1)
  assert whole.all()  # the crop always keeps the whole digit
  accuracy = np.mean(clf.predict(crops[..., None]) == labels)
  assert accuracy > 0.9
  assert video.prompt_alignment(frames[:, None], labels) == pytest.approx(accuracy)


def test_digit_scale_reads_enlarged_digits_as_the_digits(digits, clf):
  """Every test digit enlarged 2x (pixel repetition) and pasted at random on 40x40: with
  digit_scale=2 the 8x8 crop is the digit itself about as often as at scale 1 (module
  docstring, 90%) and otherwise the digit shifted by whole pixels, never blurred, so
  alignment matches the classifier on the digits; a rigid move of one
  pixel per frame is measured on the full frames (direction and FD's motion features)."""
  images, labels = digits
  rng = np.random.default_rng(1)
  corners = rng.integers(0, 40 - 16 + 1, (len(images), 2))
  frames = np.zeros((len(images), 40, 40), np.int64)
  for f, d, (r, c) in zip(frames, images, corners):
    f[r:r + 16, c:c + 16] = np.kron(d, np.ones((2, 2), np.int64))
  crops = video.crop_digits(frames[:, None], digit_scale=2)[:, 0]
  exact = np.mean(np.all(crops == images, axis=(1, 2)))
  # Every crop is the whole digit, unblurred, at worst shifted across its empty border.
  assert all(any(np.array_equal(c, p) for p in placements_that_keep_the_digit(d))
             for c, d in zip(crops, images))
  assert 0.85 < exact < 0.93   # 0.88 here, against 0.90 at scale 1
  accuracy = np.mean(clf.predict(crops[..., None]) == labels)
  assert accuracy > 0.9 and abs(accuracy - np.mean(clf.predict(images[..., None]) == labels)) < 0.03
  assert video.prompt_alignment(frames[:, None], labels, digit_scale=2) == pytest.approx(accuracy)
  # Read at scale 1, the 16x16 digits are cropped to a quarter of a digit: far worse.
  assert video.prompt_alignment(frames[:, None], labels) < 0.5
  # A 2x digit moving right one pixel per frame for 7 frames.
  clip = np.zeros((1, 7, 40, 40), np.int64)
  for f in range(7):
    clip[0, f, 5:21, 3 + f:19 + f] = np.kron(images[0], np.ones((2, 2), np.int64))
  report = video.video_report(clip, [f"the digit {labels[0]} moving right"], digit_scale=2)
  assert report["direction_accuracy"] == 1.0
  np.testing.assert_allclose(video.motion_features(video.centres_of_mass(clip))[0],
                             [0, 1, 0, 0, 1], atol=1e-12)
  # Frames exactly the 2x digit's size are reduced as they are.
  whole = np.repeat(np.kron(images[:5], np.ones((1, 2, 2), np.int64))[:, None], 3, axis=1)
  np.testing.assert_array_equal(video.crop_digits(whole, digit_scale=2),
                                np.repeat(images[:5, None], 3, axis=1))
  with pytest.raises(ValueError, match="digits fit the 12x12 frames"):
    video.crop_digits(np.zeros((1, 1, 12, 12)), digit_scale=2)


def test_direction_accuracy(digits, clf):
  images, labels = digits[0][:50], digits[1][:50]
  videos, dirs, captions = batch(images, labels, DIRS)
  codes = np.array([DIRS.index(d) for d in dirs])
  np.testing.assert_array_equal(video.motion_directions(video.centres_of_mass(videos)), codes)
  assert video.direction_accuracy(videos, captions) == 1.0
  assert video.direction_accuracy(videos, codes) == 1.0
  wrong = [c.replace("bouncing around", "moving left") if "bouncing" in c else
           c.replace(d, OPPOSITE[d]) for c, d in zip(captions, dirs)]
  assert video.direction_accuracy(videos, wrong) == 0.0
  fast, _, _ = batch(images, labels, DIRS, speed=2)  # speed does not matter
  assert video.direction_accuracy(fast, captions) == 1.0
  # A digit that goes right 4 frames and back 2 is bouncing; one that stands still matches
  # no direction.
  path = np.array([[4, c] for c in (0, 1, 2, 3, 4, 3, 2)])
  back_and_forth = make_video(images[0], path)[None]
  assert video.direction_accuracy(back_and_forth, ["the digit 1 bouncing"]) == 1.0
  # Faint speckle (level 1 on every background pixel) outweighs the digit's mass and would
  # pull the centre of mass to the canvas centre: the plain track moves under MIN_SPEED
  # pixels per frame (STATIC), the digit's track (levels under 2 are background) does not.
  speckled = np.maximum(videos, 1)
  assert video.motion_directions(video.centres_of_mass(speckled[:1]))[0] == video.STATIC
  np.testing.assert_array_equal(
      video.motion_directions(video.digit_tracks(speckled)), codes)
  assert video.direction_accuracy(speckled, captions) == 1.0
  still = make_video(images[0], np.full((FRAMES, 2), 4))[None]
  assert video.motion_directions(video.centres_of_mass(still))[0] == video.STATIC
  assert video.direction_accuracy(np.repeat(still, 5, 0), list(range(5))) == 0.0
  assert video.axis_accuracy(np.repeat(still, 5, 0), list(range(5))) == 0.0
  # Played backwards, straight moves go the other way along the same axis: direction 0 and
  # axis 1 for them; bounces stay bounces (both 1). 40 straight clips and 10 bouncing.
  backwards = videos[:, ::-1]
  straight = np.array([d != "bouncing" for d in dirs])
  assert video.direction_accuracy(backwards, captions) == pytest.approx(np.mean(~straight))
  assert video.axis_accuracy(backwards, captions) == 1.0
  assert video.axis_accuracy(videos, wrong) == pytest.approx(np.mean(straight))


def test_centres_of_mass_of_pasted_digits(digits):
  digit = digits[0][3]
  rows, cols = np.indices(digit.shape)
  own = np.array([(rows * digit).sum(), (cols * digit).sum()]) / digit.sum()
  path = corner_path("bouncing", start=(6, 2))
  got = video.centres_of_mass(make_video(digit, path)[None])[0]
  np.testing.assert_allclose(got, path + own, atol=1e-12)
  blank = video.centres_of_mass(np.zeros((1, 1, 16, 10)))
  np.testing.assert_allclose(blank[0, 0], [7.5, 4.5])


# --- Fréchet distance in our features ---------------------------------------------------------


def marked(images):
  """Digits with one level set in two opposite corners, so that no 8x8 window other than the
  digit's own box holds all of its mass: the crop is then exactly the pasted image."""
  out = images.copy()
  out[:, 0, 0] = np.maximum(out[:, 0, 0], 1)
  out[:, 7, 7] = np.maximum(out[:, 7, 7], 1)
  return out


def test_video_features_and_frechet_distance(digits, clf):
  images, labels = marked(digits[0][:60]), digits[1][:60]
  videos, dirs, _ = batch(images, labels, DIRS)
  feats = video.video_features(videos)
  assert feats.shape == (60, dc.FEATURE_DIM + 5)
  # Classifier part: the digit's own features in every frame. Motion part: the corner path's
  # velocities (the digit moves rigidly), mean / std per axis and mean speed.
  np.testing.assert_allclose(feats[:, :dc.FEATURE_DIM], clf.features(images[..., None]),
                             atol=1e-12)
  steps = [np.diff(corner_path(d), axis=0).astype(float) for d in dirs]
  motion = np.array([np.r_[s.mean(0), s.std(0), np.hypot(s[:, 0], s[:, 1]).mean()]
                     for s in steps])
  np.testing.assert_allclose(feats[:, dc.FEATURE_DIM:], motion, atol=1e-12)

  assert abs(video.video_frechet_distance(videos, videos.copy())) < 1e-6
  fast, _, _ = batch(images, labels, DIRS, speed=2)
  fd_fast = video.video_frechet_distance(videos, fast)
  assert fd_fast == pytest.approx(frechet.frechet_distance(feats, video.video_features(fast)),
                                  rel=1e-12)
  assert fd_fast > 0.5  # twice the speed: the velocity statistics move by ~1 pixel
  other, _, _ = batch(marked(digits[0][100:160]), digits[1][100:160], DIRS)
  reshuffled, _, _ = batch(images, labels, DIRS[::-1])  # same digits, other directions
  assert video.video_frechet_distance(videos, other) > 0.5
  assert video.video_frechet_distance(videos, reshuffled) > 0.1

  report = video.video_report(videos, [caption(int(l), d, 1) for l, d in zip(labels, dirs)],
                              reference=videos)
  assert report["direction_accuracy"] == 1.0 and abs(report["fd"]) < 1e-6
  assert set(report) == {"alignment", "direction_accuracy", "axis_accuracy", "consistency", "fd"}


@pytest.mark.parametrize("call, error, match", [
    (lambda: video.prompt_alignment(np.zeros((2, 4, 16)), [1, 2]), ValueError, r"\[N, F, H, W\]"),
    (lambda: video.prompt_alignment(np.zeros((2, 4, 6, 6)), [1, 2]), ValueError, "smaller than"),
    (lambda: video.prompt_alignment(np.full((2, 4, 16, 16), 0.5), [1, 2]), ValueError,
     "with fractions"),
    (lambda: video.prompt_alignment(np.full((2, 4, 16, 16), 17), [1, 2]), ValueError,
     "0..16"),
    (lambda: video.prompt_alignment(np.zeros((2, 4, 16, 16)), [1]), ValueError,
     "2 videos but 1 prompts"),
    (lambda: video.direction_accuracy(np.zeros((1, 4, 16, 16)), ["the digit 3 moving"]),
     ValueError, "names 0 directions"),
    (lambda: video.direction_accuracy(np.zeros((1, 4, 16, 16)), [7]), ValueError, "ints 0..4"),
    (lambda: video.video_frechet_distance(np.zeros((1, 4, 16, 16)), np.zeros((3, 4, 16, 16))),
     ValueError, "at least 2 videos"),
])
def test_bad_inputs_are_clear_errors(call, error, match):
  with pytest.raises(error, match=match):
    call()


# --- I3D against PyTorch ----------------------------------------------------------------------


def same_pad(x, kernel, stride):
  """TensorFlow SAME padding of [N, C, T, H, W]: total max(k - s, 0) or max(k - n % s, 0),
  the smaller half in front."""
  pads = []
  for n, k, s in zip(x.shape[2:], kernel, stride):
    total = max(k - s, 0) if n % s == 0 else max(k - n % s, 0)
    pads += [(total // 2, total - total // 2)]
  return tf.pad(x, [p for pair in reversed(pads) for p in pair])


class Unit3D(nn.Module):
  def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1)):
    super().__init__()
    self.kernel, self.stride = kernel, stride
    self.conv3d = nn.Conv3d(cin, cout, kernel, stride, bias=False)
    self.bn = nn.BatchNorm3d(cout, eps=1e-3)

  def forward(self, x):
    return torch.relu(self.bn(self.conv3d(same_pad(x, self.kernel, self.stride))))


class MaxPool(nn.Module):
  def __init__(self, kernel, stride):
    super().__init__()
    self.kernel, self.stride = kernel, stride

  def forward(self, x):  # zero padding: inputs are ReLU outputs
    return tf.max_pool3d(same_pad(x, self.kernel, self.stride), self.kernel, self.stride)


class Mixed(nn.Module):
  def __init__(self, cin, c):
    super().__init__()
    k3 = (3, 3, 3)
    self.b0 = Unit3D(cin, c[0])
    self.b1a, self.b1b = Unit3D(cin, c[1]), Unit3D(c[1], c[2], k3)
    self.b2a, self.b2b = Unit3D(cin, c[3]), Unit3D(c[3], c[4], k3)
    self.b3a, self.b3b = MaxPool(k3, (1, 1, 1)), Unit3D(cin, c[5])

  def forward(self, x):
    return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)),
                      self.b3b(self.b3a(x))], 1)


class TorchI3D(nn.Module):
  """Inception-v1 inflated (Carreira & Zisserman 2017), pytorch-i3d's module names."""

  def __init__(self, classes=400):
    super().__init__()
    self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
    self.MaxPool3d_2a_3x3 = MaxPool((1, 3, 3), (1, 2, 2))
    self.Conv3d_2b_1x1 = Unit3D(64, 64)
    self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
    self.MaxPool3d_3a_3x3 = MaxPool((1, 3, 3), (1, 2, 2))
    self.Mixed_3b = Mixed(192, [64, 96, 128, 16, 32, 32])
    self.Mixed_3c = Mixed(256, [128, 128, 192, 32, 96, 64])
    self.MaxPool3d_4a_3x3 = MaxPool((3, 3, 3), (2, 2, 2))
    self.Mixed_4b = Mixed(480, [192, 96, 208, 16, 48, 64])
    self.Mixed_4c = Mixed(512, [160, 112, 224, 24, 64, 64])
    self.Mixed_4d = Mixed(512, [128, 128, 256, 24, 64, 64])
    self.Mixed_4e = Mixed(512, [112, 144, 288, 32, 64, 64])
    self.Mixed_4f = Mixed(528, [256, 160, 320, 32, 128, 128])
    self.MaxPool3d_5a_2x2 = MaxPool((2, 2, 2), (2, 2, 2))
    self.Mixed_5b = Mixed(832, [256, 160, 320, 32, 128, 128])
    self.Mixed_5c = Mixed(832, [384, 192, 384, 48, 128, 128])
    self.logits = nn.Module()
    self.logits.conv3d = nn.Conv3d(1024, classes, 1, bias=True)

  def forward(self, x):  # [N, 3, T, H, W] in [-1, 1]
    for name, layer in self.named_children():
      if name != "logits":
        x = layer(x)
    x = tf.avg_pool3d(x, (min(2, x.shape[2]), min(7, x.shape[3]), min(7, x.shape[4])), 1)
    return self.logits.conv3d(x)[:, :, :, 0, 0].mean(2)  # squeeze space, mean over time


def tf1_resize_reference(frames, size):
  """TensorFlow 1 resize_bilinear (align_corners=False, half_pixel_centers=False) by loops:
  source = i * in / out, top = floor, bottom = min(top + 1, in - 1), lerp by the fraction."""
  *lead, h, w, c = frames.shape
  out = np.zeros((*lead, size, size, c))
  for i in range(size):
    y = i * h / size
    y0, y1, fy = math.floor(y), min(math.floor(y) + 1, h - 1), y - math.floor(y)
    for j in range(size):
      x = j * w / size
      x0, x1, fx = math.floor(x), min(math.floor(x) + 1, w - 1), x - math.floor(x)
      top = frames[..., y0, x0, :] * (1 - fx) + frames[..., y0, x1, :] * fx
      bottom = frames[..., y1, x0, :] * (1 - fx) + frames[..., y1, x1, :] * fx
      out[..., i, j, :] = top * (1 - fy) + bottom * fy
  return out


def test_tf1_bilinear_resize():
  x = np.random.default_rng(1).uniform(size=(2, 5, 7, 3))
  for size in (12, 4):  # up and down
    np.testing.assert_allclose(np.asarray(i3d.resize_bilinear_tf1(x.astype(np.float32), size)),
                               tf1_resize_reference(x, size), atol=1e-5)


@pytest.fixture(scope="module")
def torch_i3d(tmp_path_factory):
  """A random TorchI3D with perturbed BN statistics, and its state dict as safetensors."""
  torch.manual_seed(0)
  net = TorchI3D().eval()
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, nn.BatchNorm3d):
        m.running_mean.normal_(0.0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.1)
  path = str(tmp_path_factory.mktemp("i3d") / i3d.I3D_FILE)
  safetensors.torch.save_file(net.state_dict(), path)
  return net, path


def test_i3d_tensor_names_are_pytorch_i3d_ones(torch_i3d):
  net, _ = torch_i3d
  names = {k: tuple(v.shape) for k, v in net.state_dict().items()
           if not k.endswith("num_batches_tracked")}
  assert i3d.i3d_tensor_shapes() == names


def test_i3d_features_and_fvd_match_torch(torch_i3d):
  """Grey uint8 videos of 9 frames, 20x24, resized to 32x32 (the network at 1/7 of FVD's
  224: the same layers, a smaller pool window), compiled at XLA's optimisation level 0 for
  a fast compile."""
  net, path = torch_i3d
  rng = np.random.default_rng(2)
  videos = rng.integers(0, 256, (4, 9, 20, 24, 1)).astype(np.uint8)
  options = {"xla_backend_optimization_level": 0}
  got = i3d.i3d_features(videos, path, batch_size=2, size=32, compiler_options=options)
  assert got.shape == (4, 400)
  frames = np.repeat(videos.astype(np.float64) / 255.0, 3, axis=-1)
  x = 2.0 * tf1_resize_reference(frames, 32) - 1.0
  with torch.no_grad():
    want = net(torch.from_numpy(x).float().permute(0, 4, 1, 2, 3)).double().numpy()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
  assert np.abs(want).max() > 0.05  # the signal survives the random network
  got_fvd = i3d.fvd(videos[:2], videos[2:], path, batch_size=2, size=32,
                    compiler_options=options)
  assert got_fvd == pytest.approx(frechet.frechet_distance(want[:2], want[2:]), rel=1e-3)


def test_i3d_clear_errors(tmp_path, torch_i3d):
  _, path = torch_i3d
  with pytest.raises(FileNotFoundError, match="rgb_imagenet.pt"):
    i3d.i3d_features(np.zeros((2, 16, 8, 8, 3), np.uint8), str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="at least 9 frames"):
    i3d.i3d_features(np.zeros((2, 8, 8, 8, 3), np.uint8), path)
  bad = str(tmp_path / "bad.safetensors")
  safetensors.torch.save_file({"logits.conv3d.bias": torch.zeros(400)}, bad)
  with pytest.raises(ValueError, match="not pytorch-i3d's InceptionI3d"):
    i3d.load_i3d(bad)
