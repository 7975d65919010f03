"""tensorflow-datasets image datasets read from ArrayRecord files, without TensorFlow.

`tfds.data_source` gives random access to a dataset prepared with
`file_format=array_record`; it decodes each example to numpy (PNG through PIL), so training
needs no TensorFlow. This module wraps it as a source of {"image": uint8 HxWxC,
"label": int32[, "caption": str]} with `num_levels = 256` (8-bit pixels).

Works for cifar10, downsampled_imagenet/32x32 and /64x64, and any dataset the user prepared
in that format (read back from its dataset_info.json, no builder code needed). Datasets
without labels (downsampled_imagenet) get label 0 and `num_classes = 0`.

Where the files are looked for: the `data_dir` argument, else $TFDS_DATA_DIR, else
~/tensorflow_datasets. Preparing a dataset needs TensorFlow and internet, once, anywhere:
  pip install tensorflow tensorflow-datasets
  tfds build cifar10 --file_format=array_record --data_dir=/some/dir
then copy /some/dir/cifar10 next to the other datasets and point TFDS_DATA_DIR at them.
"""

import os
import re

import numpy as np

from launch import fs

ENV_VAR = "TFDS_DATA_DIR"
KNOWN_DATASETS = ("cifar10", "downsampled_imagenet/32x32", "downsampled_imagenet/64x64")
NUM_LEVELS = 256


def resolve_data_dir(data_dir=None) -> str:
  """data_dir if given, else $TFDS_DATA_DIR, else ~/tensorflow_datasets (tfds' default)."""
  if data_dir:
    return os.fspath(data_dir)
  return os.environ.get(ENV_VAR) or os.path.expanduser("~/tensorflow_datasets")


def prepare_instructions(name: str, data_dir: str) -> str:
  """How to make `name` readable here: build it as ArrayRecord where TF is, copy it over."""
  return (f"To prepare it, on a machine with TensorFlow and internet run\n"
          f"  pip install tensorflow tensorflow-datasets\n"
          f"  tfds build {name} --file_format=array_record --data_dir=/some/dir\n"
          f"then copy /some/dir/{name.split('/')[0]} into {data_dir}, or set {ENV_VAR}="
          f"/some/dir (or pass data_dir=...). Datasets you build yourself work the same "
          f"way if they were written with file_format='array_record'.")


def _registered_builder(name: str, data_dir: str):
  """The builder of a registered tfds dataset (runs its builder code), or a clear error."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
  where = f"in data_dir {data_dir!r} (from the data_dir argument, else ${ENV_VAR}, " \
          f"else ~/tensorflow_datasets)"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise FileNotFoundError(
        f"dataset {name!r} is neither a tensorflow-datasets dataset nor prepared {where}. "
        f"Known image datasets: {KNOWN_DATASETS}; the offline sources are 'digits' and "
        f"'synthetic:HxWxC'.\n" + prepare_instructions(name, data_dir)) from e
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"dataset {name!r} is not prepared {where}: expected files under "
        f"{os.fspath(builder.data_dir)}.\n" + prepare_instructions(name, data_dir))
  file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
  if file_format != "array_record":
    raise ValueError(
        f"dataset {name!r} in {os.fspath(builder.data_dir)} is stored as {file_format!r}, "
        f"which has no random access; rebuild it with --file_format=array_record.\n"
        + prepare_instructions(name, data_dir))
  return builder


def _prepared_dir(name: str, data_dir: str) -> str | None:
  """data_dir/name[/config]/<latest version> holding dataset_info.json, or None.

  "coco_captions" alone finds its single config directory (coco_captions/2014/...); with
  several configs the name must say which ("coco_captions/2017").
  """
  def latest(root):
    if not root.is_dir():
      return None
    versions = [v.name for v in root.iterdir() if re.fullmatch(r"\d+\.\d+\.\d+", v.name)
                and (v / "dataset_info.json").is_file()]
    if not versions:
      return None
    return os.fspath(root / max(versions, key=lambda v: tuple(map(int, v.split(".")))))

  root = fs.path(data_dir).joinpath(*name.split("/"))   # local or gs://
  found = latest(root)
  if found or "/" in name or not root.is_dir():
    return found
  configs = {c.name: latest(c) for c in sorted(root.iterdir())}
  configs = {c: d for c, d in configs.items() if d}
  if len(configs) > 1:
    raise ValueError(f"dataset {name!r} in {data_dir!r} has configs {sorted(configs)}: name "
                     f"one, e.g. '{name}/{next(iter(configs))}'")
  return next(iter(configs.values()), None)


def open_builder(name: str, data_dir: str):
  """The builder of a prepared ArrayRecord dataset, read from its files.

  `tfds.builder` would run the dataset's builder code, and some (coco_captions) import
  TensorFlow: a prepared directory is read with `tfds.builder_from_directory` instead,
  which needs only dataset_info.json. Anything else gets tfds_source's errors.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
  prepared = _prepared_dir(name, data_dir)
  if prepared is None:
    try:
      return _registered_builder(name, data_dir)
    except (ImportError, RuntimeError) as e:  # builder code that needs TensorFlow
      raise FileNotFoundError(
          f"dataset {name!r} is not prepared in data_dir {data_dir!r} (from the data_dir "
          f"argument, else ${ENV_VAR}, else ~/tensorflow_datasets).\n" +
          prepare_instructions(name, data_dir)) from e
  builder = tfds.builder_from_directory(prepared)
  file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
  if file_format != "array_record":
    raise ValueError(f"dataset {name!r} in {prepared} is stored as {file_format!r}, which "
                     "has no random access; rebuild it with --file_format=array_record.\n"
                     + prepare_instructions(name, data_dir))
  return builder


def label_and_caption(record: dict, label_key: str, caption_key: str) -> dict:
  """A tfds record's {"label": int32 (0 without a label_key), "caption": str (if any)}."""
  out = {"label": np.int32(record[label_key]) if label_key else np.int32(0)}
  if caption_key:
    caption = record[caption_key]
    out["caption"] = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
  return out


class TfdsSource:
  """Random-access source over one split of a tfds ArrayRecord image dataset.

  `source[i]` is {"image": uint8 HxWxC, "label": int32} plus "caption" (str) when the
  dataset has a `caption_key` feature. Metadata: num_levels=256, num_classes (0 if
  unlabelled), image_shape (None for variable-size dimensions), num_examples.
  """

  num_levels = NUM_LEVELS

  def __init__(self, name: str, split: str = "train", data_dir=None, *,
               image_key: str = "image", label_key: str = "label",
               caption_key: str = "caption"):
    self.name = name
    self.split = split
    self.data_dir = resolve_data_dir(data_dir)
    builder = open_builder(name, self.data_dir)
    features = builder.info.features
    if image_key not in features:
      raise KeyError(f"dataset {name!r} has no image feature {image_key!r}; its features "
                     f"are {list(features)}: pass image_key=...")
    if np.dtype(features[image_key].np_dtype) != np.uint8:
      raise ValueError(f"dataset {name!r} feature {image_key!r} has dtype "
                       f"{features[image_key].np_dtype}; only 8-bit (uint8) images are "
                       "supported (num_levels=256)")
    self.image_key = image_key
    self.label_key = label_key if label_key in features else None
    self.caption_key = caption_key if caption_key in features else None
    self.num_classes = (features[label_key].num_classes if self.label_key else 0)
    self.image_shape = tuple(features[image_key].shape)
    try:
      self._source = builder.as_data_source(split=split)
    except ValueError as e:  # unknown split: tfds' message lists the valid ones
      raise ValueError(f"dataset {name!r} in {self.data_dir!r}: {e}") from e

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict:
    record = self._source[i]
    image = np.asarray(record[self.image_key], dtype=np.uint8)
    if image.ndim == 2:  # defensive: tfds Image always has a channel axis
      image = image[..., None]
    return {"image": image, **label_and_caption(record, self.label_key, self.caption_key)}

  def __repr__(self) -> str:
    # grain checks repr(source) when restoring an iterator: no data_dir (it may move).
    return f"TfdsSource(name={self.name!r}, split={self.split!r})"
