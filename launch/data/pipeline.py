"""The input pipeline: sources by name, a grain training loader, a one-pass eval iterator.

A *source* is random access: `len(source)`, `source[i] -> {"image": uint8 HxWxC,
"label": int32[, "caption": str]}`, with metadata `num_levels` (distinct pixel values: 256
for 8-bit data, 17 for the digits), `num_classes` (0 if unlabelled) and `image_shape`.
Sources: `digits.DigitsSource`, `tfds_source.TfdsSource`, `synthetic.SyntheticSource`,
all reachable through `get_source(name, split)`.

Video sources give "video": uint8 [F, H, W, C] in place of "image" (batched to
[B, F, H, W, C]) and add `num_frames`, `frame_shape` and `video_shape` to the metadata
(their `image_shape` is the frame shape): `moving_digits.MovingDigitsSource` (the offline
default), `video_files.VideoJsonlSource` and `video_files.TfdsVideoSource`, reached through
`get_source(name, split, **options)` with the options of moving_digits.from_name or of the
video_files sources (num_frames, frame_stride, frame_size, ...).

Batches are dicts of numpy arrays with a leading per-process batch axis:
  "image": int32 pixel values in 0..num_levels-1 (integers, not floats: the discrete
           decoder's likelihood needs the level index). The MODEL SIDE maps them to
           [-1, 1], e.g. VDM's bin centres x = (2k + 1) / num_levels - 1;
  "label": int32; "caption": str (if the source has captions);
  "mask":  bool, only from `epoch_iterator` (False on padding).
`to_global` turns a per-process batch into global jax arrays on a mesh.

Training loader (`make_loader`): a grain DataLoader. Each JAX process reads only its shard
of the records (grain's ShardOptions: process p gets the p-th contiguous 1/P of the
records, shuffled within the shard with a fresh order each epoch), and yields batches of
global_batch_size / process_count examples, so the P per-process batches of one step form
one global batch. With num_epochs=None the stream repeats forever and a batch may straddle
an epoch boundary; with num_epochs=k the last incomplete batch is dropped. Order and
random transforms are fixed by `seed` (grain gives example at sampler index n the rng
Philox(seed + n)). `iter(loader)` returns a DataLoaderIterator with
get_state() -> bytes / set_state(bytes), so training resumes on the exact next batch.
"""

import math
from typing import Any, Callable, Iterable, Protocol, Sequence

import grain
import jax
import numpy as np

from launch.data import digits as digits_lib
from launch.data import moving_digits as moving_digits_lib
from launch.data import synthetic as synthetic_lib

OFFLINE_SOURCES = ("digits", "synthetic:HxWxC", "moving_digits[:FxHxW]")
VIDEO_SOURCES = ("moving_digits[:FxHxW]", "video_jsonl:/dir/{split}.jsonl", "tfds_video:NAME")


# What a wrapping source (text embeddings, the first n examples) carries over from its source.
METADATA = ("num_levels", "num_classes", "image_shape", "num_frames", "frame_shape",
            "video_shape")


def copy_metadata(wrapper, source) -> None:
  """Gives `wrapper` the metadata `source` has: levels, classes, image shape and, for a video
  source, its frame count, frame shape and clip shape."""
  for name in METADATA:
    if hasattr(source, name):
      setattr(wrapper, name, getattr(source, name))


class ImageSource(Protocol):
  """What every source provides (see module docstring)."""
  num_levels: int
  num_classes: int
  image_shape: tuple

  def __len__(self) -> int:
    ...

  def __getitem__(self, i: int) -> dict:
    ...


def get_source(name: str, split: str, data_dir=None, **options) -> ImageSource:
  """A source by name: "digits", "synthetic:HxWxC", a video source, or a tfds dataset name.

  Video sources take `options` (image sources take none):
    "moving_digits" (8 frames of 16x16) or "moving_digits:FxHxW": frame_stride, max_speed,
        videos_per_digit (launch/data/moving_digits.py);
    "video_jsonl:/dir/{split}.jsonl": num_frames, frame_stride, frame_size, mode;
    "tfds_video:NAME" (read from data_dir like tfds names): num_frames, frame_stride,
        frame_size, video_key, caption_key, label_key (launch/data/video_files.py).

  A tfds name (e.g. "cifar10", "downsampled_imagenet/64x64", or a dataset you prepared) is
  read from data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets; a name found nowhere
  raises FileNotFoundError listing the valid names and how to prepare a tfds dataset.
  """
  if name == "moving_digits" or name.startswith("moving_digits:"):
    return moving_digits_lib.from_name(name, split, **options)
  if name.startswith(("video_jsonl:", "tfds_video:")):
    from launch.data import video_files  # pylint: disable=g-import-not-at-top  (imports av)
    if name.startswith("video_jsonl:"):
      return video_files.VideoJsonlSource(
          video_files.jsonl_path(name[len("video_jsonl:"):], split), split, **options)
    return video_files.TfdsVideoSource(name[len("tfds_video:"):], split, data_dir, **options)
  if options:
    raise ValueError(f"source {name!r} takes no options, got {sorted(options)}; options are "
                     f"for the video sources {VIDEO_SOURCES}")
  if name == "digits":
    return digits_lib.DigitsSource(split)
  if name.startswith("synthetic"):
    if not name.startswith("synthetic:"):
      raise ValueError(f"synthetic source needs a shape, e.g. 'synthetic:32x32x3'; got "
                       f"{name!r}")
    shape = synthetic_lib.parse_shape(name[len("synthetic:"):])
    return synthetic_lib.SyntheticSource(shape, split)
  from launch.data import tfds_source  # pylint: disable=g-import-not-at-top  (imports tfds)
  return tfds_source.TfdsSource(name, split, data_dir)


# ---------------------------------------------------------------------------- transforms


class ToModelInputs(grain.transforms.Map):
  """uint8 image (or video) -> int32 levels 0..num_levels-1, label -> int32; other keys kept.

  Rejects pixel values >= num_levels: they mean the source's num_levels is wrong, which
  would silently corrupt the discrete likelihood.
  """

  def __init__(self, num_levels: int):
    self.num_levels = int(num_levels)

  def map(self, element: dict) -> dict:
    out = dict(element)
    for key in ("image", "video"):
      if key not in element:
        continue
      pixels = np.asarray(element[key])
      if pixels.size and int(pixels.max()) >= self.num_levels:
        raise ValueError(f"pixel value {int(pixels.max())} >= num_levels={self.num_levels}: "
                         "the source's num_levels does not match its data")
      out[key] = pixels.astype(np.int32)
    out["label"] = np.int32(element["label"])
    return out


class RandomFlip(grain.transforms.RandomMap):
  """Flips the image left-right with probability 1/2 (the rng is grain's, per example)."""

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    if rng.random() < 0.5:
      element = dict(element, image=np.asarray(element["image"])[:, ::-1])
    return element


class _FunctionMap(grain.transforms.Map):
  """Wraps a plain function example -> example as a grain Map."""

  def __init__(self, fn: Callable[[dict], dict]):
    self.fn = fn

  def map(self, element):
    return self.fn(element)


def _as_transformation(t):
  if isinstance(t, (grain.transforms.Map, grain.transforms.RandomMap,
                    grain.transforms.MapWithIndex, grain.transforms.Filter)):
    return t
  if callable(t):
    return _FunctionMap(t)
  raise TypeError(f"transform {t!r} is neither a grain transform nor a callable")


# ------------------------------------------------------------------------------- loaders


def _ensure_absl_flags_parsed():
  """grain's worker processes read absl flags; outside an absl app (pytest, notebooks)
  nobody parsed them, and the workers would fail with UnparsedFlagAccessError."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _process_layout(global_batch_size, process_index, process_count):
  """Resolves the process defaults and returns (index, count, per-process batch)."""
  process_index = jax.process_index() if process_index is None else int(process_index)
  process_count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple "
                     f"of process_count={process_count}: each process loads "
                     "global_batch_size / process_count examples")
  return process_index, process_count, global_batch_size // process_count


def make_loader(source: ImageSource, *, global_batch_size: int, seed: int,
                shuffle: bool = True, num_epochs: int | None = None,
                process_index: int | None = None, process_count: int | None = None,
                worker_count: int = 0, worker_buffer_size: int = 1,
                transforms: Sequence[Any] = (),
                read_options: grain.ReadOptions | None = None) -> grain.DataLoader:
  """A sharded, deterministic, checkpointable grain DataLoader over `source`.

  Args:
    source: an ImageSource (its repr is stored in the iterator state and checked on
      restore, so sources define a repr without memory addresses).
    global_batch_size: examples per step over all processes; this process yields
      batches of global_batch_size // process_count (drop_remainder).
    seed: shuffle order and per-example rngs (a 32-bit non-negative int).
    shuffle: shuffle within this process's shard, differently each epoch.
    num_epochs: None repeats forever.
    process_index, process_count: default jax.process_index() / jax.process_count();
      pass them to simulate several hosts.
    worker_count: grain worker processes (0 = in this process; the CPU default). With
      worker_count > 0 the batch order differs from worker_count=0 (each worker batches
      its own records), but is just as deterministic.
    transforms: per-example grain transforms or plain functions dict -> dict, applied to
      the source's example (uint8 image) before the int32 conversion and batching,
      e.g. [RandomFlip()]. With worker_count > 0 they must be picklable (module-level
      functions or classes, not lambdas).
    read_options: grain ReadOptions (threads and prefetch per process).

  Returns:
    A grain.DataLoader; `iter(loader)` has get_state()/set_state().
  """
  process_index, process_count, local_batch = _process_layout(
      global_batch_size, process_index, process_count)
  shard = grain.sharding.ShardOptions(process_index, process_count, drop_remainder=True)
  shard_size = len(source) // process_count
  if local_batch > shard_size:
    raise ValueError(f"per-process batch {local_batch} is larger than this process's "
                     f"{shard_size} examples ({len(source)} in {source!r} split over "
                     f"{process_count} processes)")
  sampler = grain.samplers.IndexSampler(
      num_records=len(source), shard_options=shard, shuffle=shuffle,
      num_epochs=num_epochs, seed=seed)
  operations = [_as_transformation(t) for t in transforms]
  operations += [ToModelInputs(source.num_levels),
                 grain.transforms.Batch(local_batch, drop_remainder=True)]
  if worker_count:
    _ensure_absl_flags_parsed()
  return grain.DataLoader(
      data_source=source, sampler=sampler, operations=operations,
      worker_count=worker_count, worker_buffer_size=worker_buffer_size,
      shard_options=shard, read_options=read_options)


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
  """Steps of `epoch_iterator`: ceil(num_examples / global_batch_size)."""
  return math.ceil(num_examples / global_batch_size)


def _zeros_like(example: dict) -> dict:
  return {k: "" if isinstance(v, str) else np.zeros_like(v) for k, v in example.items()}


def epoch_iterator(source: ImageSource, *, global_batch_size: int,
                   process_index: int | None = None, process_count: int | None = None,
                   num_threads: int = 4) -> Iterable[dict]:
  """One pass over every example of `source` exactly once, for evaluation (bits/dim).

  Global step b covers examples [b*G, (b+1)*G) in order (G = global_batch_size); process
  p loads positions [b*G + p*L, b*G + (p+1)*L) of it (L = G / process_count). Positions
  past the end are padding: zero image and label, "caption" "", and "mask" False, so a
  sum over mask counts each example once. Every process yields the same number of
  batches, num_eval_batches(len(source), G), as collectives in the eval step require.
  """
  process_index, process_count, local_batch = _process_layout(
      global_batch_size, process_index, process_count)
  n = len(source)
  steps = num_eval_batches(n, global_batch_size)
  to_model = ToModelInputs(source.num_levels)
  padding = _zeros_like(to_model.map(source[0]))

  def read(k):
    step, j = divmod(k, local_batch)
    g = step * global_batch_size + process_index * local_batch + j
    example = to_model.map(source[g]) if g < n else dict(padding)
    example["mask"] = np.bool_(g < n)
    return example

  ds = grain.MapDataset.range(steps * local_batch).map(read).batch(local_batch)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=4 * local_batch))


# ------------------------------------------------------------------------ global arrays


def to_global(batch: dict, mesh: jax.sharding.Mesh,
              batch_spec: jax.sharding.PartitionSpec) -> dict:
  """Per-process numpy batch -> global jax arrays sharded by `batch_spec` over `mesh`.

  Each process passes its own rows; the global leading size is the sum over processes
  (jax.make_array_from_process_local_data). batch_spec names the mesh axes of the batch
  axis, e.g. P(("data", "fsdp")); trailing axes are replicated. String arrays (captions)
  cannot be jax arrays: they are returned unchanged, still per process, for the host-side
  tokenizer.
  """
  sharding = jax.sharding.NamedSharding(mesh, batch_spec)
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.dtype.kind in "USO":
      out[key] = value
    else:
      out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out
