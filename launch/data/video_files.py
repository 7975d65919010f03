"""Real video data: a folder of video files with a JSONL of captions, and tfds video datasets.

Both are random-access sources with the video sources' interface (moving_digits.py):
`source[i]` = {"video": uint8 [F, H, W, C], "label": int32[, "caption": str]}, metadata
num_levels=256, num_classes, num_frames=F, frame_shape=(H, W, C), video_shape,
image_shape=frame_shape, and a repr without addresses or directories (grain checks it).

The clip. Every example is one clip of `num_frames` frames taken every `frame_stride`-th
decoded frame from the start of the video: frames 0, s, 2s, ..., (F - 1) s. A video with
fewer than (F - 1) s + 1 frames is an error naming the file (reduce num_frames or
frame_stride, or drop the video). With `frame_size` each frame is resized so its shorter side
is frame_size (PIL bicubic) and centre-cropped to frame_size x frame_size (the same
captions.resize_center_crop the image sources use); without it frames keep their size, and
every video must share the first one's.

"video_jsonl:/dir/{split}.jsonl" (`VideoJsonlSource`): one line per video,
{"video": path relative to the JSONL file's folder, "caption": str (or a list of str, one
chosen by captions.choose_caption's hash), optional "label": int}. Files are decoded with
PyAV (FFmpeg: MP4/H.264, WebM, AVI, GIF, ...) and read through launch/fs.py, so the folder
may be on gs://.

"tfds_video:NAME" (`TfdsVideoSource`): a tensorflow-datasets dataset prepared as ArrayRecord
whose `video_key` feature is a `tfds.features.Video` (or a Sequence of Image). Video's
constructor calls TensorFlow (`tf.dtypes.as_dtype`), so `tfds.builder_from_directory` fails
without TensorFlow on any dataset with a Video feature. Its stored form is exactly a
Sequence of Image (Video subclasses Sequence and serializes through it), so the reader
rebuilds the dataset's features with each Video replaced by the equivalent
Sequence(Image(frame shape, dtype, encoding)) and reads the records with tfds' own numpy
parser, decoding only the frames of the clip. Prepare such a dataset where TensorFlow is
(e.g. `tfds build ucf101 --file_format=array_record`).
"""

import functools
import json
import os

import av
import numpy as np

from launch import fs
from launch.data import captions as captions_lib
from launch.data import tfds_source

NUM_LEVELS = 256  # 8-bit frames


# ------------------------------------------------------------------------------ clips


def _check_positive(name: str, value) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)


def clip_indices(num_frames: int, frame_stride: int) -> np.ndarray:
  """The decoded frames a clip takes: 0, s, ..., (F - 1) s."""
  return np.arange(num_frames) * frame_stride


def _resize(frames: list, frame_size) -> np.ndarray:
  if frame_size:
    frames = [captions_lib.resize_center_crop(f, frame_size) for f in frames]
  return np.stack(frames).astype(np.uint8)


def _too_short(what: str, have: int, num_frames: int, frame_stride: int) -> ValueError:
  need = (num_frames - 1) * frame_stride + 1
  return ValueError(f"{what} has {have} frames; a clip of {num_frames} frames at "
                    f"frame_stride {frame_stride} needs {need}: reduce num_frames or "
                    "frame_stride, or drop this video")


def decode_clip(file, num_frames: int, frame_stride: int = 1, *, mode: str = "RGB",
                frame_size=None, name: str = "video") -> np.ndarray:
  """Decodes frames 0, s, ..., (F - 1) s of a video file (a path or binary file object).

  Returns uint8 [F, H, W, C] with C = 3 for mode "RGB" and 1 for "L" (grey). Decoding
  stops after the clip's last frame.
  """
  wanted = set(clip_indices(num_frames, frame_stride).tolist())
  last = max(wanted)
  frames = []
  with av.open(file) as container:
    if not container.streams.video:
      raise ValueError(f"{name} has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    count = 0
    for frame in container.decode(stream):
      if count in wanted:
        array = frame.to_ndarray(format="rgb24" if mode == "RGB" else "gray")
        frames.append(array if array.ndim == 3 else array[..., None])
      count += 1
      if count > last:
        break
  if count <= last:
    raise _too_short(name, count, num_frames, frame_stride)
  return _resize(frames, frame_size)


# ------------------------------------------------------------------- video_jsonl folder


def _captions_ok(caption) -> bool:
  return isinstance(caption, str) or (isinstance(caption, list) and bool(caption) and
                                      all(isinstance(c, str) for c in caption))


def _read_index(path) -> list[dict]:
  """The JSONL lines, each checked for a "video" path and a caption."""
  return captions_lib.read_index(
      path, expected='{"video": str, "caption": str or [str, ...]}', what="video index",
      valid=lambda e: isinstance(e.get("video"), str) and _captions_ok(e.get("caption")),
      missing=f"video index {os.fspath(path)!r} not found. A video folder holds video files "
      'and a JSONL file with one line per video: {"video": "relative/path.mp4", "caption": '
      '"a dog running"} (optional "label": int); name it as "video_jsonl:/dir/{split}.jsonl".')


class VideoJsonlSource:
  """Video files in a folder (local or gs://), listed with their captions in a JSONL file.

  See the module docstring for the line format and the clip. `mode` "RGB" gives 3
  channels, "L" one (grey).
  """

  num_levels = NUM_LEVELS

  def __init__(self, path, split: str = "train", *, num_frames: int, frame_stride: int = 1,
               frame_size=None, mode: str = "RGB"):
    if mode not in ("RGB", "L"):
      raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    self.path, self.split, self.mode = os.fspath(path), split, mode
    self.num_frames = _check_positive("num_frames", num_frames)
    self.frame_stride = _check_positive("frame_stride", frame_stride)
    self.frame_size = None if frame_size is None else _check_positive("frame_size",
                                                                      frame_size)
    self._root = fs.path(self.path).parent
    self._entries = _read_index(self.path)
    labels = [e.get("label") for e in self._entries]
    self.num_classes = (max(int(l) for l in labels) + 1
                        if all(l is not None for l in labels) else 0)
    channels = 3 if mode == "RGB" else 1
    if self.frame_size:
      self.frame_shape = (self.frame_size, self.frame_size, channels)
    else:
      with self._open(0) as f, av.open(f) as container:
        stream = container.streams.video[0]
        self.frame_shape = (stream.codec_context.height, stream.codec_context.width,
                            channels)
    self.image_shape = self.frame_shape
    self.video_shape = (self.num_frames, *self.frame_shape)

  def _open(self, i: int):
    p = self._root / self._entries[i]["video"]
    if not p.is_file():
      raise FileNotFoundError(f"video {os.fspath(p)!r} (line {i + 1} of {self.path}) not "
                              "found; video paths are relative to the JSONL file's folder")
    return p.open("rb")

  def __len__(self) -> int:
    return len(self._entries)

  def caption(self, i: int) -> str:
    """source[i]["caption"] without decoding the video (for text-embedding caches)."""
    caption = self._entries[i]["caption"]
    return caption if isinstance(caption, str) else captions_lib.choose_caption(caption, i)

  def __getitem__(self, i: int) -> dict:
    if not -len(self) <= i < len(self):
      raise IndexError(f"index {i} out of range for {self!r} of {len(self)} examples")
    i = int(i) % len(self)
    entry = self._entries[i]
    with self._open(i) as f:
      video = decode_clip(f, self.num_frames, self.frame_stride, mode=self.mode,
                          frame_size=self.frame_size, name=f"video {entry['video']!r}")
    if video.shape[1:] != self.frame_shape:
      raise ValueError(f"video {entry['video']!r} has frames of shape {video.shape[1:]}, the "
                       f"first video {self.frame_shape}: pass frame_size=... to resize and "
                       "crop them")
    return {"video": video, "label": np.int32(entry.get("label", 0)),
            "caption": self.caption(i)}

  def __repr__(self) -> str:
    return (f"VideoJsonlSource({os.path.basename(self.path)!r}, split={self.split!r}, "
            f"num_frames={self.num_frames}, frame_stride={self.frame_stride}, "
            f"frame_size={self.frame_size}, mode={self.mode!r})")


def jsonl_path(spec: str, split: str) -> str:
  """"/dir/{split}.jsonl" -> that split's file (captions.jsonl_path, named video_jsonl)."""
  return captions_lib.jsonl_path(spec, split, prefix="video_jsonl")


# -------------------------------------------------------------------------- tfds Video


def _videos_as_image_sequences(feature) -> None:
  """Rewrites, in place, every Video in a tfds feature proto as its stored form:
  Sequence(Image(frame shape, dtype, encoding), length=F). Builds no Video (needs TF)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
  kind = feature.WhichOneof("content")
  if kind == "video":
    video = feature.video
    shape = [None if d == -1 else int(d) for d in video.shape.dimensions]
    frame = tfds.features.Image(shape=tuple(shape[1:]) if shape else None,
                                dtype=np.dtype(video.dtype or "uint8"),
                                encoding_format=video.encoding_format or None)
    feature.CopyFrom(tfds.features.Sequence(frame, length=shape[0] if shape else None)
                     .to_proto())
  elif kind == "features_dict":
    for sub in feature.features_dict.features.values():
      _videos_as_image_sequences(sub)
  elif kind == "sequence":
    _videos_as_image_sequences(feature.sequence.feature)


def open_video_builder(name: str, data_dir: str):
  """A read-only tfds builder of a prepared ArrayRecord dataset, Videos read without TF."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
  from google.protobuf import json_format  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.proto import feature_pb2  # pylint: disable=g-import-not-at-top
  prepared = tfds_source._prepared_dir(name, data_dir)  # pylint: disable=protected-access
  if prepared is None:
    raise FileNotFoundError(
        f"video dataset {name!r} is not prepared in data_dir {data_dir!r} (from the data_dir "
        f"argument, else ${tfds_source.ENV_VAR}, else ~/tensorflow_datasets).\n" +
        tfds_source.prepare_instructions(name, data_dir))
  info = tfds.core.dataset_info.read_proto_from_builder_dir(prepared)
  if info.file_format != "array_record":
    raise ValueError(f"dataset {name!r} in {prepared} is stored as {info.file_format!r}, "
                     "which has no random access; rebuild it with "
                     "--file_format=array_record.\n" +
                     tfds_source.prepare_instructions(name, data_dir))
  features = feature_pb2.Feature()
  json_format.ParseDict(json.loads((fs.path(prepared) / "features.json").read_text()),
                        features)
  _videos_as_image_sequences(features)
  info.features.CopyFrom(features)
  return tfds.core.read_only_builder.ReadOnlyBuilder(prepared, info_proto=info)


class TfdsVideoSource:
  """Random-access source over one split of a tfds ArrayRecord video dataset (no TF).

  Reads raw records and parses them with tfds' numpy example parser; only the clip's
  frames are decoded (module docstring). "caption" when the dataset has a `caption_key`
  Text feature; "label" from `label_key` (a ClassLabel) or 0.
  """

  num_levels = NUM_LEVELS

  def __init__(self, name: str, split: str = "train", data_dir=None, *, num_frames: int,
               frame_stride: int = 1, frame_size=None, video_key: str = "video",
               caption_key: str = "caption", label_key: str = "label"):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
    self._arguments = dict(name=name, split=split, data_dir=data_dir, num_frames=num_frames,
                           frame_stride=frame_stride, frame_size=frame_size,
                           video_key=video_key, caption_key=caption_key, label_key=label_key)
    self.name, self.split = name, split
    self.num_frames = _check_positive("num_frames", num_frames)
    self.frame_stride = _check_positive("frame_stride", frame_stride)
    self.frame_size = None if frame_size is None else _check_positive("frame_size",
                                                                      frame_size)
    self.data_dir = tfds_source.resolve_data_dir(data_dir)
    builder = open_video_builder(name, self.data_dir)
    features = builder.info.features
    video = features[video_key] if video_key in features.keys() else None
    frame = getattr(video, "feature", None)
    if not isinstance(frame, tfds.features.Image):
      raise KeyError(f"dataset {name!r} has no video feature {video_key!r} (a tfds Video or "
                     f"a Sequence of Image); its features are {list(features.keys())}: pass "
                     "video_key=...")
    if np.dtype(frame.np_dtype) != np.uint8:
      raise ValueError(f"dataset {name!r} video {video_key!r} has dtype {frame.np_dtype}; "
                       "only 8-bit (uint8) frames are supported (num_levels=256)")
    self.video_key = video_key
    self.caption_key = caption_key if caption_key in features.keys() else None
    self.label_key = label_key if label_key in features.keys() else None
    self.num_classes = features[label_key].num_classes if self.label_key else 0
    self._frame_feature = frame
    if self.frame_size:
      self.frame_shape = (self.frame_size, self.frame_size, frame.shape[-1])
    else:
      self.frame_shape = tuple(frame.shape)   # None for variable-size dimensions
    self.image_shape = self.frame_shape
    self.video_shape = (self.num_frames, *self.frame_shape)
    try:
      self._records = builder.as_data_source(
          split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    except ValueError as e:  # unknown split: tfds' message lists the valid ones
      raise ValueError(f"dataset {name!r} in {self.data_dir!r}: {e}") from e
    self._serialized_info = features.get_serialized_info()

  def __getstate__(self):
    # tfds' builder pickles as its directory alone and would rebuild the Video feature
    # (TensorFlow) in a grain worker: pickle the arguments and open the dataset again.
    return self._arguments

  def __setstate__(self, arguments):
    self.__init__(**arguments)

  @functools.cached_property
  def _parser(self):
    from tensorflow_datasets.core import example_parser  # pylint: disable=g-import-not-at-top
    return example_parser.ExampleParserNp(self._serialized_info)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i: int) -> dict:
    if not -len(self) <= i < len(self):
      raise IndexError(f"index {i} out of range for {self!r} of {len(self)} examples")
    record = self._parser.parse_example(self._records[int(i) % len(self)])
    encoded = record[self.video_key]   # the encoded frames (PNG/JPEG bytes)
    if len(encoded) <= clip_indices(self.num_frames, self.frame_stride)[-1]:
      raise _too_short(f"example {i} of {self!r}", len(encoded), self.num_frames,
                       self.frame_stride)
    frames = [self._frame_feature.decode_example_np(encoded[k])
              for k in clip_indices(self.num_frames, self.frame_stride)]
    return {"video": _resize(frames, self.frame_size),
            **tfds_source.label_and_caption(record, self.label_key, self.caption_key)}

  def __repr__(self) -> str:
    return (f"TfdsVideoSource(name={self.name!r}, split={self.split!r}, "
            f"num_frames={self.num_frames}, frame_stride={self.frame_stride}, "
            f"frame_size={self.frame_size})")
