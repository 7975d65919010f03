"""Tests of the moving-digits video source (launch/data/moving_digits.py) and its registry
entry and batching (launch/data/pipeline.py).

The motion rule is re-derived here from the module docstring alone: crc32 read as a
mixed-radix number, straight moves in closed form and bounces by a step-by-step simulation
(not the source's triangle wave). Centres of mass are measured on the frames themselves.
"""

import zlib

import numpy as np
import pytest
from sklearn import datasets as sk_datasets

from evaluation import digits_classifier
from launch.data import moving_digits as md
from launch.data import pipeline

NAMES = ("left", "right", "up", "down", "bouncing")


@pytest.fixture(scope="module")
def sk_digits():
  ref = sk_datasets.load_digits()
  return np.rint(ref.images).astype(np.uint8), ref.target


def expected_motion(g, copy, frames, height, width, stride, max_speed):
  """(direction, pixels per frame, corners [F, 2]) by the docstring's rule, bounces simulated."""
  h = zlib.crc32(f"moving_digits:{g}:{copy}".encode())
  ry, rx = height - 8, width - 8
  speeds = max_speed if frames == 1 else min(max_speed, min(ry, rx) // ((frames - 1) * stride))
  direction, h = h % 5, h // 5
  v, h = (1 + h % speeds) * stride, h // speeds
  travel = (frames - 1) * v
  f = np.arange(frames)
  if direction in (0, 1):
    x0, h = h % (rx - travel + 1), h // (rx - travel + 1)
    x0 += travel if direction == 0 else 0
    y0 = h % (ry + 1)
    x = x0 - v * f if direction == 0 else x0 + v * f
    return direction, v, np.stack([np.full(frames, y0), x], 1)
  if direction in (2, 3):
    y0, h = h % (ry - travel + 1), h // (ry - travel + 1)
    y0 += travel if direction == 2 else 0
    x0 = h % (rx + 1)
    y = y0 - v * f if direction == 2 else y0 + v * f
    return direction, v, np.stack([y, np.full(frames, x0)], 1)
  y0, h = h % (ry + 1), h // (ry + 1)
  x0, h = h % (rx + 1), h // (rx + 1)
  vy, h = (v if h % 2 else -v), h // 2
  vx = v if h % 2 else -v
  corners, pos, vel = [], [y0, x0], [vy, vx]
  for _ in range(frames):     # one pixel at a time, bouncing off the walls 0 and R
    corners.append(list(pos))
    for axis, room in ((0, ry), (1, rx)):
      for _ in range(abs(vel[axis])):
        step = 1 if vel[axis] > 0 else -1
        if not 0 <= pos[axis] + step <= room:
          vel[axis] = -vel[axis]
          step = -step
        pos[axis] += step
  return direction, v, np.array(corners)


def centre_of_mass(frames):
  """(row, col) centre of mass of each frame [F, H, W, 1], mass = grey level."""
  m = frames[..., 0].astype(np.float64)
  rows, cols = np.arange(m.shape[1]), np.arange(m.shape[2])
  total = m.sum((1, 2))
  return np.stack([(m.sum(2) * rows).sum(1) / total, (m.sum(1) * cols).sum(1) / total], 1)


def test_videos_are_deterministic_and_use_the_digits_split(sk_digits):
  images, targets = sk_digits
  train, test = md.MovingDigitsSource("train"), md.MovingDigitsSource("test")
  assert (len(train), len(test)) == (1500, 297)
  for source, offset, indices in ((train, 0, (0, 7, 1499)), (test, 1500, (0, 150, 296))):
    again = md.MovingDigitsSource(source.split)   # a second instance: same videos
    for i in indices:
      a, b = source[i], again[i]
      np.testing.assert_array_equal(a["video"], b["video"])
      assert a["caption"] == b["caption"]
      video = a["video"]
      assert video.dtype == np.uint8 and video.shape == (8, 16, 16, 1)
      assert a["label"] == targets[offset + i]
      # Each frame is sklearn's digit offset+i pasted somewhere on a black canvas.
      for frame in video[..., 0]:
        hits = [(y, x) for y in range(9) for x in range(9)
                if np.array_equal(frame[y:y + 8, x:x + 8], images[offset + i]) and
                frame.sum() == int(images[offset + i].sum())]
        assert hits, f"frame of example {i} does not hold digit {offset + i}"
  # Copies of a digit (videos_per_digit) show the same digit with their own motions.
  two = md.MovingDigitsSource("test", videos_per_digit=2)
  assert len(two) == 594
  assert two[5]["label"] == two[5 + 297]["label"] == test[5]["label"]
  np.testing.assert_array_equal(two[5]["video"], test[5]["video"])
  moves = [two.motion(i) for i in range(594)]
  assert sum(moves[i] != moves[i + 297] for i in range(297)) > 250


@pytest.mark.parametrize("name,options", [
    ("moving_digits", {}),
    ("moving_digits:4x20x22", {"frame_stride": 2, "max_speed": 3}),
])
def test_centre_of_mass_moves_as_the_rule_and_caption_say(name, options):
  source = pipeline.get_source(name, "test", **options)
  frames, height, width, _ = source.video_shape
  stride = options.get("frame_stride", 1)
  speeds_seen, bounced = set(), 0
  for i in range(0, 297, 2):
    ex = source[i]
    direction, v, corners = expected_motion(1500 + i, 0, frames, height, width, stride,
                                            options.get("max_speed", 3))
    assert ex["direction"] == direction and ex["speed"] == v
    assert md.direction_of_caption(ex["caption"]) == direction
    assert NAMES[direction] in ex["caption"].split()
    com = centre_of_mass(ex["video"])
    np.testing.assert_allclose(ex["track"], com, atol=1e-4)
    step = np.diff(com, axis=0)
    # Straight moves: v pixels per frame along the captioned axis, nothing across it.
    want = {0: (0, -v), 1: (0, v), 2: (-v, 0), 3: (v, 0)}.get(direction)
    if want is not None:
      np.testing.assert_allclose(step, np.broadcast_to(want, step.shape), atol=1e-9)
    # Every move (bounces too): the corner track of the rule, seen through the COM.
    np.testing.assert_allclose(com - com[0], corners - corners[0], atol=1e-9)
    if direction == 4:
      bounced += int(np.any(np.sign(step[1:]) != np.sign(step[:-1])))
    speeds_seen.add(v)
  assert bounced >= 3, "no bounce off a wall was checked"
  if name == "moving_digits:4x20x22":   # min(20, 22) - 8 = 12 px = 2 x (3 steps of stride 2)
    assert speeds_seen == {2, 4}


def corners_in(video, digit):
  """The (row, col) where the 8x8 `digit` sits in each frame, found by search."""
  found = []
  for frame in video[..., 0]:
    hits = [(y, x) for y in range(frame.shape[0] - 7) for x in range(frame.shape[1] - 7)
            if np.array_equal(frame[y:y + 8, x:x + 8], digit)]
    assert len(hits) == 1
    found.append(hits[0])
  return np.array(found)


def test_bouncing_reverses_at_the_wall(sk_digits):
  """A bouncing digit moves 1 px per frame along both axes, and its step along an axis
  flips sign exactly when its corner touches 0 or the far wall (found on the frames)."""
  images, _ = sk_digits
  source = md.MovingDigitsSource("test", num_frames=5, canvas=(12, 14), max_speed=1)
  flips = 0
  for i in range(297):
    if source.motion(i).direction != md.BOUNCING:
      continue
    ex = source[i]
    assert "bouncing" in ex["caption"].split()
    corners = corners_in(ex["video"], images[1500 + i])
    for axis, room in ((0, 12 - 8), (1, 14 - 8)):
      steps = np.diff(corners[:, axis])
      assert np.all(np.abs(steps) == 1)
      for f in range(1, len(steps)):
        at_wall = corners[f, axis] in (0, room)
        assert (steps[f] == -steps[f - 1]) == at_wall, (i, axis, f)
        flips += at_wall
  assert flips >= 20


def test_digit_scale_draws_each_digit_k_times_larger_moving_by_the_rule(sk_digits):
  """digit_scale 2 on 16 frames of 32x32: every frame holds sklearn's digit enlarged to 16x16
  by pixel repetition, whole, at the corner the rule gives for a 16x16 digit (the rule on a
  canvas 8 px smaller per side, since only the room H - 8k enters it); the track is the
  frames' centre of mass."""
  images, _ = sk_digits
  source = pipeline.get_source("moving_digits:16x32x32", "test", digit_scale=2)
  assert source.video_shape == (16, 32, 32, 1) and "digit_scale=2" in repr(source)
  for i in range(0, 297, 11):
    ex = source[i]
    big = np.kron(images[1500 + i], np.ones((2, 2), np.uint8))
    direction, v, corners = expected_motion(1500 + i, 0, 16, 32 - 8, 32 - 8, 1, 3)
    assert (ex["direction"], ex["speed"]) == (direction, v) == (direction, 1)
    for frame, (y, x) in zip(ex["video"][..., 0], corners):
      np.testing.assert_array_equal(frame[y:y + 16, x:x + 16], big)
      assert frame.sum() == big.sum()
    np.testing.assert_allclose(ex["track"], centre_of_mass(ex["video"]), atol=1e-4)
  with pytest.raises(ValueError, match="larger than the 16x16 digit"):
    pipeline.get_source("moving_digits:4x16x16", "test", digit_scale=2)
  with pytest.raises(ValueError, match="digit_scale must be a positive int"):
    pipeline.get_source("moving_digits", "test", digit_scale=0)


def test_captions_name_the_digit_and_vary():
  source = md.MovingDigitsSource("train")
  examples = [source[i] for i in range(0, 1500, 3)]
  captions = [e["caption"] for e in examples]
  assert captions == [source.caption(i) for i in range(0, 1500, 3)]   # without the video
  labels = np.array([e["label"] for e in examples])
  np.testing.assert_array_equal(digits_classifier.labels_from_prompts(captions), labels)
  assert "the digit 3 moving left" in md.caption_phrasings(3, md.LEFT)
  assert len(set(c.replace(str(l), "#") for c, l in zip(captions, labels))) >= 20
  # Motions are spread over the directions and not tied to the digit.
  directions = np.array([e["direction"] for e in examples])
  assert all(np.mean(directions == d) > 0.12 for d in range(5))
  for digit in range(10):
    assert len(set(directions[labels == digit])) == 5
  with pytest.raises(ValueError, match="names 2 motions"):
    md.direction_of_caption("a three moving left then right")


def test_registry_and_loader_batch_videos():
  source = pipeline.get_source("moving_digits:4x12x12", "train")
  assert source.video_shape == (4, 12, 12, 1) and source.image_shape == (12, 12, 1)
  assert (source.num_frames, source.num_levels, source.num_classes) == (4, 17, 10)
  loader = pipeline.make_loader(source, global_batch_size=4, seed=0, shuffle=False,
                                process_index=0, process_count=1)
  batch = next(iter(loader))
  assert batch["video"].shape == (4, 4, 12, 12, 1) and batch["video"].dtype == np.int32
  assert batch["track"].shape == (4, 4, 2) and batch["caption"].shape == (4,)
  for k in range(4):
    np.testing.assert_array_equal(batch["video"][k], source[k]["video"])
    assert batch["caption"][k] == source[k]["caption"]
    assert batch["label"][k] == source[k]["label"]
  evals = list(pipeline.epoch_iterator(source, global_batch_size=512, process_index=0,
                                       process_count=1))
  assert sum(int(b["mask"].sum()) for b in evals) == 1500


def test_bad_options_are_clear_errors():
  with pytest.raises(ValueError, match="canvas of at least 15x15"):
    pipeline.get_source("moving_digits:8x12x12", "train")
  with pytest.raises(ValueError, match="FxHxW"):
    pipeline.get_source("moving_digits:8x16", "train")
  with pytest.raises(ValueError, match="unknown moving digits options"):
    pipeline.get_source("moving_digits", "train", num_frame=4)
  with pytest.raises(ValueError, match="takes no options"):
    pipeline.get_source("digits", "train", num_frames=4)
  with pytest.raises(ValueError, match="unknown digits split"):
    pipeline.get_source("moving_digits", "validation")
