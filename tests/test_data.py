"""Tests of the input pipelines: digits, tfds ArrayRecord, synthetic, the grain loaders."""

import re

import jax
import numpy as np
import PIL.Image
import pytest
from sklearn import datasets as sk_datasets

from launch.data import digits
from launch.data import pipeline
from launch.data import synthetic
from launch import fs
from launch.data import tfds_source


class IndexedSource:
  """Test source whose example i is identifiable: label i, image filled with i % 200."""

  num_levels = 256
  num_classes = 0
  image_shape = (2, 3, 1)

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"image": np.full(self.image_shape, i % 200, np.uint8), "label": np.int32(i)}

  def __repr__(self):
    return f"IndexedSource({self.n})"


def take(iterator, k):
  return [next(iterator) for _ in range(k)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# ------------------------------------------------------------------------------- digits


def test_digits_splits_match_sklearn():
  ref = sk_datasets.load_digits()
  train, test = digits.DigitsSource("train"), digits.DigitsSource("test")
  assert len(train) + len(test) == 1797 and len(test) == 297
  examples = [train[i] for i in range(len(train))] + [test[i] for i in range(len(test))]
  images = np.stack([e["image"] for e in examples])
  labels = np.array([e["label"] for e in examples])
  assert images.dtype == np.uint8 and images.shape == (1797, 8, 8, 1)
  assert images.min() == 0 and images.max() == 16
  assert train.num_levels == 17 and train.num_classes == 10
  np.testing.assert_array_equal(images[..., 0], ref.images.astype(np.uint8))
  np.testing.assert_array_equal(labels, ref.target)
  with pytest.raises(ValueError, match="valid splits"):
    digits.DigitsSource("validation")


_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _digits_named(caption):
  """The set of digits a caption names, as a word or a numeral."""
  named = {d for d, w in enumerate(_WORDS) if re.search(rf"\b{w}\b", caption)}
  return named | {int(c) for c in re.findall(r"\d", caption)}


def test_digits_captions_name_the_right_digit():
  per_label = {d: set() for d in range(10)}
  for split in ("train", "test"):
    source = digits.DigitsSource(split)
    for i in range(len(source)):
      example = source[i]
      label = int(example["label"])
      assert _digits_named(example["caption"]) == {label}, example["caption"]
      per_label[label].add(example["caption"])
  # Several phrasings per digit, and the public helpers agree with the source.
  assert all(len(c) >= 4 for c in per_label.values())
  assert digits.caption_for(7, 3) in digits.caption_phrasings(7)
  assert "a picture of an eight" in digits.caption_phrasings(8)
  assert "7" in digits.caption_phrasings(7)


# ----------------------------------------------------------------------------- loaders


def test_loader_batches_and_determinism():
  source = IndexedSource(40)
  make = lambda seed: iter(pipeline.make_loader(source, global_batch_size=8, seed=seed,
                                                process_index=0, process_count=1))
  a, b, c = take(make(0), 6), take(make(0), 6), take(make(1), 6)
  assert_batches_equal(a, b)
  assert any(not np.array_equal(x["label"], y["label"]) for x, y in zip(a, c))
  for batch in a:
    assert batch["image"].dtype == np.int32 and batch["image"].shape == (8, 2, 3, 1)
    assert batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], batch["label"] % 200)
  # Shuffled (not the identity order), and each of the first 5 batches = one epoch of 40.
  epoch = np.concatenate([x["label"] for x in a[:5]])
  assert sorted(epoch) == list(range(40)) and list(epoch) != list(range(40))


def test_loader_shards_per_process():
  source = IndexedSource(40)
  seen = []
  for p in range(2):
    loader = pipeline.make_loader(source, global_batch_size=8, seed=5, num_epochs=1,
                                  process_index=p, process_count=2)
    batches = list(loader)
    assert len(batches) == 5 and all(b["label"].shape == (4,) for b in batches)
    seen.append(np.concatenate([b["label"] for b in batches]))
  assert not set(seen[0]) & set(seen[1])
  assert sorted(np.concatenate(seen)) == list(range(40))
  with pytest.raises(ValueError, match="multiple of process_count"):
    pipeline.make_loader(source, global_batch_size=9, seed=0, process_index=0,
                         process_count=2)


def test_loader_state_restores_exactly():
  def make():  # a fresh source object each time, as after a restart
    return pipeline.make_loader(digits.DigitsSource("train"), global_batch_size=16, seed=3,
                                transforms=[pipeline.RandomFlip()], process_index=0,
                                process_count=1)
  it = iter(make())
  take(it, 3)
  state = it.get_state()
  later = take(it, 4)
  restored = iter(make())
  restored.set_state(state)
  assert_batches_equal(take(restored, 4), later)
  fresh = take(iter(make()), 4)  # guards against a state that did not move
  assert not np.array_equal(fresh[0]["label"], later[0]["label"])


def test_random_flip_is_seeded_and_flips():
  source = digits.DigitsSource("train")
  make = lambda seed: pipeline.make_loader(
      source, global_batch_size=1, seed=seed, shuffle=False,
      transforms=[pipeline.RandomFlip()], process_index=0, process_count=1)
  batches = take(iter(make(0)), 20)
  flips = []
  for i, batch in enumerate(batches):
    image = source[i]["image"].astype(np.int32)
    if np.array_equal(batch["image"][0], image):
      flips.append(False)
    else:
      np.testing.assert_array_equal(batch["image"][0], image[:, ::-1])
      flips.append(True)
  assert 0 < sum(flips) < 20
  assert_batches_equal(batches, take(iter(make(0)), 20))


def test_worker_process_matches_in_process_loading():
  source = IndexedSource(24)
  make = lambda workers: iter(pipeline.make_loader(
      source, global_batch_size=4, seed=2, worker_count=workers, process_index=0,
      process_count=1))
  assert_batches_equal(take(make(1), 4), take(make(0), 4))


def test_epoch_iterator_visits_each_example_once():
  source = IndexedSource(23)
  real = []
  for p in range(2):
    batches = list(pipeline.epoch_iterator(source, global_batch_size=8, process_index=p,
                                           process_count=2))
    assert len(batches) == pipeline.num_eval_batches(23, 8) == 3
    for b, batch in enumerate(batches):
      positions = 8 * b + 4 * p + np.arange(4)
      np.testing.assert_array_equal(batch["mask"], positions < 23)
      np.testing.assert_array_equal(batch["label"][batch["mask"]],
                                    positions[positions < 23])
      np.testing.assert_array_equal(batch["image"][~batch["mask"]], 0)
      real.extend(batch["label"][batch["mask"]])
  assert sorted(real) == list(range(23))


def test_epoch_iterator_full_digits_test_split():
  source = digits.DigitsSource("test")
  batches = list(pipeline.epoch_iterator(source, global_batch_size=32, process_index=0,
                                         process_count=1))
  mask = np.concatenate([b["mask"] for b in batches])
  images = np.concatenate([b["image"] for b in batches])[mask]
  assert len(batches) == 10 and mask.sum() == 297 and not mask[297:].any()
  ref = sk_datasets.load_digits().images[1500:]
  np.testing.assert_array_equal(images[..., 0], ref)


def test_to_global_shards_the_batch():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  batch = next(iter(pipeline.make_loader(digits.DigitsSource("train"), global_batch_size=8,
                                         seed=0, process_index=0, process_count=1)))
  out = pipeline.to_global(batch, mesh, jax.sharding.PartitionSpec("data"))
  assert out["image"].shape == (8, 8, 8, 1) and out["image"].dtype == np.int32
  for shard in out["image"].addressable_shards:
    row = shard.index[0].start
    np.testing.assert_array_equal(np.asarray(shard.data), batch["image"][row:row + 1])
  np.testing.assert_array_equal(np.asarray(out["label"]), batch["label"])
  assert out["caption"] is batch["caption"] or list(out["caption"]) == list(batch["caption"])


# ------------------------------------------------------------------- synthetic, registry


def test_synthetic_source():
  source = pipeline.get_source("synthetic:6x4x3", "train")
  assert isinstance(source, synthetic.SyntheticSource) and source.num_levels == 256
  a, b = source[5], source[5]
  assert a["image"].shape == (6, 4, 3) and a["image"].dtype == np.uint8
  np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(source[5]["image"], source[6]["image"])
  values = np.concatenate([source[i]["image"].ravel() for i in range(50)])
  assert values.min() == 0 and values.max() == 255
  with pytest.raises(ValueError, match="HxWxC"):
    pipeline.get_source("synthetic:6x4", "train")


def test_wrong_num_levels_is_rejected():
  source = IndexedSource(8)
  source.num_levels = 3  # pixel values go up to 7
  with pytest.raises(ValueError, match="num_levels"):
    next(iter(pipeline.make_loader(source, global_batch_size=8, seed=0, shuffle=False,
                                   process_index=0, process_count=1)))


# ------------------------------------------------------------------ tfds ArrayRecord


def _tiny_images(n, seed):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
  """A 12+5 example tfds dataset written as ArrayRecord by a real tfds builder.

  The builder is not registered (as for a dataset a user prepared elsewhere): reading it
  back must go through its dataset_info.json alone.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path_factory.mktemp("tfds")

  with tfds.core.registered.skip_registration():

    class LaunchTestTinyImages(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(6, 5, 3)),
            "label": tfds.features.ClassLabel(num_classes=4),
            "caption": tfds.features.Text()}))

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(12, 0),
                "test": self._generate_examples(5, 1)}

      def _generate_examples(self, n, seed):
        for i, image in enumerate(_tiny_images(n, seed)):  # PIL: no TF needed to encode
          yield i, {"image": PIL.Image.fromarray(image), "label": i % 4,
                    "caption": f"tiny image {i}"}

  LaunchTestTinyImages(data_dir=str(data_dir),
                       file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_array_record_round_trip(tiny_tfds_dir, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tiny_tfds_dir))
  source = pipeline.get_source("launch_test_tiny_images", "train")  # via TFDS_DATA_DIR
  originals = _tiny_images(12, 0)
  assert len(source) == 12 and source.num_levels == 256 and source.num_classes == 4
  indices = []
  for i in range(len(source)):
    example = source[i]
    k = int(example["caption"].removeprefix("tiny image "))
    indices.append(k)
    assert example["image"].dtype == np.uint8
    np.testing.assert_array_equal(example["image"], originals[k])
    assert example["label"] == k % 4
  assert sorted(indices) == list(range(12))
  assert len(tfds_source.TfdsSource("launch_test_tiny_images", "test", tiny_tfds_dir)) == 5
  # Through the eval iterator: every example once, pixel-exact, as int32 levels.
  batches = list(pipeline.epoch_iterator(source, global_batch_size=5, process_index=0,
                                         process_count=1))
  mask = np.concatenate([b["mask"] for b in batches])
  captions = np.concatenate([b["caption"] for b in batches])[mask]
  images = np.concatenate([b["image"] for b in batches])[mask]
  for caption, image in zip(captions, images):
    np.testing.assert_array_equal(image, originals[int(caption.split()[-1])])
  assert sorted(captions) == sorted(f"tiny image {i}" for i in range(12))


def test_tfds_dataset_read_from_gcs(tiny_tfds_dir, gcs_dir, monkeypatch):
  """TFDS_DATA_DIR=gs://... on the local GCS emulator: the prepared dataset's files copied
  there give the examples of the local copy, in the same order."""
  for f in tiny_tfds_dir.rglob("*"):
    if f.is_file():
      fs.path(gcs_dir).joinpath(*f.relative_to(tiny_tfds_dir).parts).write_bytes(f.read_bytes())
  monkeypatch.setenv("TFDS_DATA_DIR", gcs_dir)
  remote = pipeline.get_source("launch_test_tiny_images", "train")
  local = tfds_source.TfdsSource("launch_test_tiny_images", "train", tiny_tfds_dir)
  assert len(remote) == len(local) == 12
  for i in range(12):
    a, b = remote[i], local[i]
    np.testing.assert_array_equal(a["image"], b["image"])
    assert (a["label"], a["caption"]) == (b["label"], b["caption"])


def test_tfds_missing_dataset_error(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with pytest.raises(FileNotFoundError) as e:
    pipeline.get_source("cifar10", "train")
  message = str(e.value)
  for needle in ("cifar10", "TFDS_DATA_DIR", str(tmp_path),
                 "tfds build cifar10 --file_format=array_record"):
    assert needle in message
  with pytest.raises(FileNotFoundError) as e:
    pipeline.get_source("no_such_dataset_xyz", "train", data_dir=tmp_path)
  for needle in ("no_such_dataset_xyz", "digits", "synthetic:HxWxC", "cifar10",
                 "downsampled_imagenet/64x64", "TFDS_DATA_DIR"):
    assert needle in str(e.value)


def test_tfds_unknown_split_names_dataset(tiny_tfds_dir):
  with pytest.raises(ValueError, match="launch_test_tiny_images.*validation"):
    tfds_source.TfdsSource("launch_test_tiny_images", "validation", tiny_tfds_dir)
