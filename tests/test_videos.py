"""Tests of video files: sample grids written as GIF and MP4 (launch/videos.py), and real
video data read back (launch/data/video_files.py): a folder of MP4s with a JSONL of captions,
and a tfds ArrayRecord dataset with a Video feature.

Written files are decoded by other code than wrote them (PIL for GIF, PyAV's decoder for MP4)
and compared with the grids launch/images.make_grid makes of each frame.
"""

import io
import json
import pickle

import av
import numpy as np
import PIL.Image
import pytest

from launch import fs
from launch import images
from launch import videos
from launch.data import pipeline
from launch.data import video_files

FPS = 10   # 100 ms per frame: a whole number of the GIF's 10 ms ticks


def moving_squares(n=3, frames=5, size=9, levels=17):
  """[n, frames, size, size, 1] levels: video k is a bright 3x3 square moving right one
  pixel per frame on a background of level k, so every frame differs from the last."""
  v = np.zeros((n, frames, size, size, 1), np.int64)
  for k in range(n):
    v[k] = k
    for f in range(frames):
      v[k, f, 2 + k:5 + k, f:f + 3] = levels - 1 - k
  return v


def gif_frames(data: bytes):
  """The frames a GIF viewer shows, each repeated for its duration in 1/FPS s, and size."""
  im = PIL.Image.open(io.BytesIO(data))
  shown = []
  for k in range(im.n_frames):
    im.seek(k)
    repeat = round(im.info["duration"] / (1000 / FPS))
    shown += [np.asarray(im.convert("RGB"))] * repeat
  return np.stack(shown), im.size


def mp4_frames(path):
  """Decoded RGB frames [F, H, W, 3] and (codec, profile, frame rate)."""
  with av.open(path) as container:
    stream = container.streams.video[0]
    about = (stream.codec_context.name, stream.codec_context.profile, stream.average_rate)
    frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
  return frames, about


def test_gif_round_trip_is_exact(tmp_path):
  """Grey 17-level videos: the decoded GIF is each frame's grid pixel for pixel (grey
  palette); a held frame (two identical frames, stored once by PIL) still shows twice."""
  v = moving_squares()
  v[:, 3] = v[:, 2]                       # frames 2 and 3 identical
  path = videos.write_gif(tmp_path / "s.gif", v, 17, fps=FPS)
  shown, size = gif_frames(fs.path(path).read_bytes())
  want = np.stack([images.make_grid(v[:, f], 17, scale=7) for f in range(5)])  # 64 // 9 = 7
  assert shown.shape[0] == 5 and size == (want.shape[2], want.shape[1])
  np.testing.assert_array_equal(shown, np.repeat(want, 3, axis=-1))
  # Colour with at most 256 colours per frame is exact too.
  rng = np.random.default_rng(0)
  colours = rng.integers(0, 256, (40, 3))
  rgb = colours[rng.integers(0, 40, (2, 4, 5, 6))]
  shown, _ = gif_frames(videos.encode_gif(rgb, 256, fps=FPS, scale=2, columns=1))
  want = np.stack([images.make_grid(rgb[:, f], 256, scale=2, columns=1) for f in range(4)])
  np.testing.assert_array_equal(shown, want)


def test_mp4_round_trip_within_a_level(tmp_path):
  """H.264 is lossy. The tolerance: 17 levels sit 255/16 = 15.9 apart in 8 bits, so an error
  under 8 decodes to the right level. The default crf 8 stays under it (4 measured here:
  these 7-px cells put sharp edges off the codec's 4x4 blocks, the worst case; crf 12 errs
  by 64 on them). The profile is plain High, which browsers play (crf 0 would need 4:4:4).
  Odd grid sizes are padded to even ones with white."""
  v = moving_squares(n=2, frames=6)        # grid (1 + 2 x 10) x 7 = 147 wide, 77 high
  path = videos.write_mp4(tmp_path / "s.mp4", v, 17, fps=FPS)
  frames, about = mp4_frames(path)
  want = np.stack([images.make_grid(v[:, f], 17, scale=7) for f in range(6)])
  assert want.shape[1:3] == (77, 147)
  assert frames.shape == (6, 78, 148, 3) and about == ("h264", "High", FPS)
  error = np.abs(frames[:, :77, :147].astype(int) - want)
  assert error.max() < 8 and error.mean() < 1
  levels = lambda u8: np.rint(u8.astype(np.float64) * 16 / 255)
  np.testing.assert_array_equal(levels(frames[:, :77, :147]), levels(np.repeat(want, 3, -1)))
  assert np.all(frames[:, 77:] > 247) and np.all(frames[:, :, 147:] > 247)  # white padding


def test_still_images_for_tensorboard():
  v = moving_squares(n=4, frames=3)
  np.testing.assert_array_equal(videos.first_frames(v, 17),
                                images.make_grid(v[:, 0], 17))
  strip = videos.filmstrip(v, 17, max_frames=2)
  assert strip.shape == (1 + 4 * 10, 1 + 2 * 10, 1)   # rows = videos, columns = frames
  np.testing.assert_array_equal(strip[11:20, 11:20], images.to_uint8(v[1, 1], 17))
  with pytest.raises(ValueError, match=r"\[N, F, H, W, C\]"):
    videos.write_gif("unused.gif", v[0], 17)


def test_videos_written_to_gcs(gcs_dir):
  v = moving_squares(n=1, frames=3)
  paths = videos.write_videos(gcs_dir, "samples_100", v, 17, fps=FPS)
  assert paths == {"gif": f"{gcs_dir}/samples_100.gif", "mp4": f"{gcs_dir}/samples_100.mp4"}
  shown, _ = gif_frames(fs.path(paths["gif"]).read_bytes())
  assert shown.shape[0] == 3
  with fs.path(paths["mp4"]).open("rb") as f:
    frames, _ = mp4_frames(f)
  assert frames.shape[0] == 3


# ------------------------------------------------------------------- real video data


def write_mp4(path, frames, fps=FPS):
  """A test video in the real format: H.264 MP4 written by PyAV, nearly lossless."""
  with av.open(str(path), "w") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt, stream.options = "yuv420p", {"crf": "0"}
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())


def numbered_frames(video_id, count, height=10, width=14):
  """Frame k of video v is flat grey 20 k + 5 v, so a decoded frame tells its number."""
  return np.stack([np.full((height, width, 3), 20 * k + 5 * video_id, np.uint8)
                   for k in range(count)])


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("videos")
  (root / "clips").mkdir()
  lines = []
  for v, count in enumerate((10, 12, 4)):
    write_mp4(root / "clips" / f"v{v}.mp4", numbered_frames(v, count))
    caption = f"video {v}" if v != 1 else ["first caption", "second caption"]
    lines.append(json.dumps({"video": f"clips/v{v}.mp4", "caption": caption, "label": v}))
  (root / "train.jsonl").write_text("\n".join(lines[:2]) + "\n")
  (root / "test.jsonl").write_text(lines[2] + "\n")
  return root


def test_video_jsonl_clips_and_batches(video_folder):
  name = f"video_jsonl:{video_folder}/{{split}}.jsonl"
  source = pipeline.get_source(name, "train", num_frames=3, frame_stride=3)
  assert len(source) == 2 and source.video_shape == (3, 10, 14, 3)
  assert (source.num_levels, source.num_classes) == (256, 2)
  for v in range(2):
    ex = source[v]
    want = numbered_frames(v, 10)[[0, 3, 6]]        # frames 0, s, 2s
    assert ex["video"].dtype == np.uint8 and ex["label"] == v
    assert np.abs(ex["video"].astype(int) - want).max() <= 2
  assert source[0]["caption"] == "video 0"
  assert source[1]["caption"] in ("first caption", "second caption")
  # Resized and centre-cropped square frames, grey mode; batched by the grain loader.
  grey = pipeline.get_source(name, "train", num_frames=2, frame_size=6, mode="L")
  loader = pipeline.make_loader(grey, global_batch_size=2, seed=0, shuffle=False,
                                process_index=0, process_count=1)
  batch = next(iter(loader))
  assert batch["video"].shape == (2, 2, 6, 6, 1) and batch["video"].dtype == np.int32
  assert np.abs(batch["video"][1, 1] - 25).max() <= 2             # video 1, frame 1
  # A clip longer than the video names the file and the fix.
  short = pipeline.get_source(name, "test", num_frames=3, frame_stride=2)
  with pytest.raises(ValueError, match=r"v2.mp4.*4 frames.*needs 5.*reduce num_frames"):
    short[0]
  with pytest.raises(ValueError, match="holds one split"):
    pipeline.get_source(f"video_jsonl:{video_folder}/train.jsonl", "test", num_frames=2)


# The features.json that tfds 4.9.10 writes, with TensorFlow 2.21 installed, for
# tfds.features.Video(shape=(6, 4, 5, 3)) (checked once; this machine has no TensorFlow).
VIDEO_FEATURE_JSON = {
    "pythonClassName": "tensorflow_datasets.core.features.video_feature.Video",
    "video": {"dtype": "uint8", "encodingFormat": "png",
              "shape": {"dimensions": ["6", "4", "5", "3"]}}}


def tiny_videos(n):
  rng = np.random.default_rng(1)
  return rng.integers(0, 256, (n, 6, 4, 5, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tfds_video_dir(tmp_path_factory):
  """A tfds ArrayRecord dataset whose "video" feature is stored as a tfds Video.

  Writing a Video needs TensorFlow; its records are those of a Sequence of PNG Images
  (Video subclasses Sequence), so the dataset is written with that and its features.json
  then says Video, as a TensorFlow machine's would.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path_factory.mktemp("tfds_video")

  with tfds.core.registered.skip_registration():

    class LaunchTestTinyVideos(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "video": tfds.features.Sequence(tfds.features.Image(shape=(4, 5, 3)), length=6),
            "label": tfds.features.ClassLabel(num_classes=3),
            "caption": tfds.features.Text()}))

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(4)}

      def _generate_examples(self, n):
        for i, video in enumerate(tiny_videos(n)):
          yield i, {"video": [PIL.Image.fromarray(f) for f in video], "label": i % 3,
                    "caption": f"tiny video {i}"}

  LaunchTestTinyVideos(data_dir=str(data_dir), file_format="array_record"
                       ).download_and_prepare()
  features = data_dir / "launch_test_tiny_videos" / "1.0.0" / "features.json"
  content = json.loads(features.read_text())
  content["featuresDict"]["features"]["video"] = VIDEO_FEATURE_JSON
  features.write_text(json.dumps(content))
  return data_dir


def test_tfds_video_dataset_without_tensorflow(tfds_video_dir):
  source = pipeline.get_source("tfds_video:launch_test_tiny_videos", "train",
                               data_dir=tfds_video_dir, num_frames=3, frame_stride=2)
  originals = tiny_videos(4)
  assert len(source) == 4 and source.video_shape == (3, 4, 5, 3)
  assert source.num_classes == 3
  seen = []
  for i in range(4):
    ex = source[i]
    k = int(ex["caption"].removeprefix("tiny video "))
    seen.append(k)
    np.testing.assert_array_equal(ex["video"], originals[k][[0, 2, 4]])  # PNG: exact
    assert ex["label"] == k % 3
  assert sorted(seen) == [0, 1, 2, 3]
  # grain's worker processes get the source pickled: it reopens without TensorFlow.
  copy = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(copy[2]["video"], source[2]["video"])
  square = video_files.TfdsVideoSource("launch_test_tiny_videos", "train", tfds_video_dir,
                                       num_frames=6, frame_size=3)
  assert square[0]["video"].shape == (6, 3, 3, 3)
  with pytest.raises(ValueError, match="6 frames.*needs 7"):
    video_files.TfdsVideoSource("launch_test_tiny_videos", "train", tfds_video_dir,
                                num_frames=4, frame_stride=2)[0]
  with pytest.raises(KeyError, match="no video feature 'clip'"):
    video_files.TfdsVideoSource("launch_test_tiny_videos", "train", tfds_video_dir,
                                num_frames=2, video_key="clip")
  with pytest.raises(FileNotFoundError, match="tfds build"):
    pipeline.get_source("tfds_video:no_such_videos", "train", data_dir=tfds_video_dir,
                        num_frames=2)
