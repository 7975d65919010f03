"""Image-caption sources for text-to-image training, with one registry.

Every source has the interface of `pipeline.ImageSource`: `len(source)`, `source[i] ->
{"image": uint8 HxWxC, "label": int32, "caption": str}`, metadata `num_levels`,
`num_classes`, `image_shape`, and a repr without memory addresses (grain checks it when
restoring an iterator). Labels are 0 and num_classes 0 where the data has none.

`get_caption_source(name, split, ...)` names them:

  "digits"                  the offline default: scikit-learn's digits with captions made
                            from the labels (digits.DigitsSource(with_captions=True)).
  "synthetic:HxWxC"         random images captioned "random image of class k" (benchmarks).
  "jsonl:/dir/{split}.jsonl"  a folder of images with a JSONL index (JsonlCaptionSource).
                            "{split}" in the path is replaced by the split; a path without
                            it is one split, "train".
  "coco_captions"           tfds' COCO captions, read from ArrayRecord files.
  any other tfds name       a tfds dataset with an image feature and a text feature
                            (TfdsCaptionSource; pass image_key= and caption_key=).

Several captions per image (COCO has five): one caption is used per example, chosen by a
fixed rule so that a text-embedding cache (launch/data/text_cache.py) stores the very caption
training sees. The rule `caption_choice`:
  "hash" (default)  caption number crc32(str(i)) mod (number of captions) of example i
                    (digits.caption_for uses the same hash): different images use
                    different caption positions, and the choice never changes between runs;
  an int k          caption number k mod (number of captions) for every example.

Images of varying sizes (COCO, most folders) need `image_size`: each image is resized so
its shorter side is image_size (PIL bicubic, which low-pass filters when shrinking) and
centre-cropped to image_size x image_size. Without it images are returned at their native
size, pixel for pixel.
"""

import json
import os
import zlib

import numpy as np
import PIL.Image

from launch import fs
from launch.data import digits as digits_lib
from launch.data import tfds_source

NUM_LEVELS = 256  # 8-bit images
TFDS_PRESETS = {
    # tfds name: (image_key, caption_key); "a/b" is feature "b" inside (sequence) feature "a".
    "coco_captions": ("image", "captions/text"),
}


# ------------------------------------------------------------------------------- helpers


def choose_caption(captions, index: int, caption_choice="hash") -> str:
  """One caption of example `index` from a list of captions (see module docstring)."""
  captions = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in captions]
  if not captions:
    raise ValueError(f"example {index} has no caption")
  if caption_choice == "hash":
    k = zlib.crc32(str(int(index)).encode())
  elif isinstance(caption_choice, (int, np.integer)) and not isinstance(caption_choice, bool):
    k = int(caption_choice)
  else:
    raise ValueError(f"caption_choice must be 'hash' or an int, got {caption_choice!r}")
  return captions[k % len(captions)]


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 HxWxC -> size x size x C: shorter side to `size` (bicubic), then centre crop."""
  image = np.asarray(image, np.uint8)
  h, w, c = image.shape
  scale = size / min(h, w)
  new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
  pil = PIL.Image.fromarray(image[..., 0] if c == 1 else image)
  if (new_h, new_w) != (h, w):
    pil = pil.resize((new_w, new_h), PIL.Image.Resampling.BICUBIC)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  out = np.asarray(pil.crop((left, top, left + size, top + size)), np.uint8)
  return out.reshape(size, size, c)


def _check_image_size(image_size):
  if image_size is not None and (not isinstance(image_size, (int, np.integer)) or
                                 image_size < 1):
    raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
  return None if image_size is None else int(image_size)


# ---------------------------------------------------------------------------- tfds


def _nested_feature(features, key: str):
  """The feature at "a/b" (b inside a, through tfds Sequence wrappers), or None."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
  unwrap = lambda f: unwrap(f.feature) if isinstance(f, tfds.features.Sequence) else f
  feature = features
  for part in key.split("/"):
    feature = unwrap(feature)
    if not isinstance(feature, tfds.features.FeaturesDict) or part not in feature.keys():
      return None
    feature = feature[part]
  return unwrap(feature)


def _nested_value(record, key: str):
  for part in key.split("/"):
    record = record[part]
  return record


class TfdsCaptionSource:
  """Random-access source over a tfds ArrayRecord dataset with an image and its caption(s).

  The caption feature may be one Text, a Sequence of Text, or a text field inside a
  Sequence of dicts (COCO: caption_key="captions/text"); several captions are reduced to
  one by `caption_choice`. Read through `tfds.data_source` like tfds_source.TfdsSource
  (same data_dir lookup and errors; no TensorFlow).
  """

  num_levels = NUM_LEVELS

  def __init__(self, name: str, split: str = "train", data_dir=None, *,
               image_key: str | None = None, caption_key: str | None = None,
               label_key: str = "label", caption_choice="hash", image_size=None):
    preset = TFDS_PRESETS.get(name, ("image", "caption"))
    self.name, self.split = name, split
    self.image_key = image_key or preset[0]
    self.caption_key = caption_key or preset[1]
    self.caption_choice = caption_choice
    choose_caption(["x"], 0, caption_choice)  # validates caption_choice early
    self.image_size = _check_image_size(image_size)
    self.data_dir = tfds_source.resolve_data_dir(data_dir)
    builder = tfds_source.open_builder(name, self.data_dir)
    features = builder.info.features
    image_feature = _nested_feature(features, self.image_key)
    if image_feature is None or np.dtype(image_feature.np_dtype) != np.uint8:
      raise KeyError(f"dataset {name!r} has no uint8 image feature {self.image_key!r}; its "
                     f"features are {list(features.keys())}: pass image_key=...")
    caption_feature = _nested_feature(features, self.caption_key)
    if caption_feature is None or np.dtype(caption_feature.np_dtype).kind not in "OSU":
      raise KeyError(f"dataset {name!r} has no text feature {self.caption_key!r}; its "
                     f"features are {features}: pass caption_key=... ('a/b' for field b of "
                     "a sequence feature a)")
    self.label_key = label_key if label_key in features.keys() else None
    self.num_classes = features[label_key].num_classes if self.label_key else 0
    channels = image_feature.shape[-1]
    self.image_shape = ((self.image_size, self.image_size, channels) if self.image_size
                        else tuple(image_feature.shape))
    try:
      self._source = builder.as_data_source(split=split)
    except ValueError as e:  # unknown split: tfds' message lists the valid ones
      raise ValueError(f"dataset {name!r} in {self.data_dir!r}: {e}") from e
    # The same records with the image left encoded, for reading captions alone.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self._text_source = (self._source if "/" in self.image_key else builder.as_data_source(
        split=split, decoders={self.image_key: tfds.decode.SkipDecoding()}))

  def __len__(self) -> int:
    return len(self._source)

  def _caption_of(self, record, i: int) -> str:
    captions = _nested_value(record, self.caption_key)
    if isinstance(captions, (bytes, str)):
      captions = [captions]
    return choose_caption(list(captions), i, self.caption_choice)

  def caption(self, i: int) -> str:
    """source[i]["caption"] without decoding the image (used by text_cache.encode_split)."""
    return self._caption_of(self._text_source[i], i)

  def __getitem__(self, i: int) -> dict:
    record = self._source[i]
    image = np.asarray(_nested_value(record, self.image_key), np.uint8)
    if self.image_size:
      image = resize_center_crop(image, self.image_size)
    label = np.int32(record[self.label_key]) if self.label_key else np.int32(0)
    return {"image": image, "label": label, "caption": self._caption_of(record, i)}

  def __repr__(self) -> str:
    return (f"TfdsCaptionSource(name={self.name!r}, split={self.split!r}, "
            f"caption={self.caption_key!r}, choice={self.caption_choice!r}, "
            f"image_size={self.image_size})")


# --------------------------------------------------------------------------- JSONL folder


def read_index(path, *, valid, expected: str, what: str, missing: str) -> list[dict]:
  """The non-empty lines of a JSONL index (local or gs://) as dicts. A missing file is
  FileNotFoundError(`missing`); a line that is not JSON or fails `valid(entry)` is an error
  naming the file, the line and the `expected` form; an empty index names `what` it is."""
  p = fs.path(path)
  if not p.is_file():
    raise FileNotFoundError(missing)
  entries = []
  for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    try:
      entry = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
    if not (isinstance(entry, dict) and valid(entry)):
      raise ValueError(f"{path}:{n}: each line must be {expected}, got {line.strip()[:200]}")
    entries.append(entry)
  if not entries:
    raise ValueError(f"{what} {os.fspath(path)!r} has no entries")
  return entries


def _read_jsonl(path: str) -> list[dict]:
  """The index lines, each checked for an "image" path and a "caption" string."""
  return read_index(
      path, expected='{"image": str, "caption": str}', what="caption index",
      valid=lambda e: isinstance(e.get("image"), str) and isinstance(e.get("caption"), str),
      missing=f"caption index {path!r} not found. A JSONL caption folder holds images and a "
      'file with one line per image: {"image": "relative/path.png", "caption": "a cat"} '
      '(optional "label": int); name it as "jsonl:/dir/{split}.jsonl".')


class JsonlCaptionSource:
  """Images in a folder, listed with their captions in a JSONL file.

  Each line: {"image": path relative to the JSONL file's folder, "caption": str} and
  optionally "label": int (num_classes is then max label + 1). Images are read with PIL
  and converted to `mode` ("RGB": 3 channels, "L": 1); with `image_size` they are
  resized and centre-cropped (module docstring), else all must share the first one's size.
  """

  num_levels = NUM_LEVELS

  def __init__(self, path: str, split: str = "train", *, image_size=None, mode: str = "RGB"):
    if mode not in ("RGB", "L"):
      raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    self.path, self.split, self.mode = os.fspath(path), split, mode
    self.image_size = _check_image_size(image_size)
    self._root = os.path.dirname(os.path.abspath(self.path))
    self._entries = _read_jsonl(self.path)
    labels = [e.get("label") for e in self._entries]
    self.num_classes = (max(int(l) for l in labels) + 1
                        if all(l is not None for l in labels) else 0)
    channels = 3 if mode == "RGB" else 1
    if self.image_size:
      self.image_shape = (self.image_size, self.image_size, channels)
    else:
      with self._open(0) as first:
        self.image_shape = (first.height, first.width, channels)

  def _open(self, i: int) -> PIL.Image.Image:
    path = os.path.join(self._root, self._entries[i]["image"])
    if not os.path.isfile(path):
      raise FileNotFoundError(f"image {path!r} (line {i + 1} of {self.path}) not found; "
                              "image paths are relative to the JSONL file's folder")
    return PIL.Image.open(path)

  def __len__(self) -> int:
    return len(self._entries)

  def caption(self, i: int) -> str:
    """source[i]["caption"] without reading the image (used by text_cache.encode_split)."""
    return self._entries[i]["caption"]

  def __getitem__(self, i: int) -> dict:
    if not -len(self) <= i < len(self):
      raise IndexError(f"index {i} out of range for {self!r} of {len(self)} examples")
    entry = self._entries[i]
    with self._open(i) as pil:
      image = np.asarray(pil.convert(self.mode), np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    if self.image_size:
      image = resize_center_crop(image, self.image_size)
    elif image.shape != self.image_shape:
      raise ValueError(f"image {entry['image']!r} has shape {image.shape}, the first image "
                       f"{self.image_shape}: pass image_size=... to resize and crop them")
    return {"image": image, "label": np.int32(entry.get("label", 0)),
            "caption": entry["caption"]}

  def __repr__(self) -> str:
    # No directory: a dataset copied elsewhere restores the same iterator state.
    return (f"JsonlCaptionSource({os.path.basename(self.path)!r}, split={self.split!r}, "
            f"image_size={self.image_size}, mode={self.mode!r})")


# ------------------------------------------------------------------------------ registry


def jsonl_path(spec: str, split: str, prefix: str = "jsonl") -> str:
  """"/dir/{split}.jsonl" -> that split's file; a path without "{split}" is "train" only.
  `prefix`: the source's registry name ("jsonl", "video_jsonl"), for the message."""
  if "{split}" in spec:
    return spec.replace("{split}", split)
  if split != "train":
    raise ValueError(f"{prefix} source {spec!r} holds one split, 'train' (no '{{split}}' in "
                     f"its path); for split {split!r} name files per split, e.g. "
                     f"'{prefix}:/data/{{split}}.jsonl' with train.jsonl and test.jsonl")
  return spec


def get_caption_source(name: str, split: str, data_dir=None, *, image_size=None, **kwargs):
  """A caption source by name (module docstring): "digits", "jsonl:PATH", or a tfds name.

  kwargs go to the source: JSONL takes mode=; tfds takes image_key=, caption_key=,
  label_key=, caption_choice=.
  """
  if name == "digits":
    if image_size not in (None, digits_lib.IMAGE_SHAPE[0]) or kwargs:
      raise ValueError(f"the digits source is 8x8 with 17 levels and takes no options; got "
                       f"image_size={image_size}, {kwargs} (resizing would break its levels)")
    return digits_lib.DigitsSource(split, with_captions=True)
  if name.startswith("synthetic:"):   # random images, captions from random labels (benches)
    from launch.data import synthetic  # pylint: disable=g-import-not-at-top
    shape = synthetic.parse_shape(name[len("synthetic:"):])
    return synthetic.SyntheticSource(shape, split, with_captions=True)
  if name.startswith("jsonl:"):
    return JsonlCaptionSource(jsonl_path(name[len("jsonl:"):], split), split,
                              image_size=image_size, **kwargs)
  if name.endswith(".jsonl"):
    raise ValueError(f"to read a JSONL caption file, name it 'jsonl:{name}'")
  return TfdsCaptionSource(name, split, data_dir, image_size=image_size, **kwargs)
