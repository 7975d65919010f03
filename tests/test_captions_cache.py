"""Tests of launch/data/captions.py (caption sources), launch/data/text_cache.py (T5 cache),
launch/text_encoder.py and the launch/encode_text.py command."""

import json
import os
import pickle
import re
import subprocess
import sys
import zlib

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import PIL.Image
import pytest

from imagen import t5
from launch import fs
from launch import workdir as workdir_lib
from launch import encode_text
from launch import text_encoder as text_encoder_lib
from launch.data import captions
from launch.data import digits
from launch.data import pipeline
from launch.data import text_cache

# ------------------------------------------------------------------------ JSONL folders


def _write_folder(root, images, texts, name="train.jsonl", labels=None):
  lines = []
  for k, (image, text) in enumerate(zip(images, texts)):
    rel = f"img/{k}.png"
    os.makedirs(root / "img", exist_ok=True)
    PIL.Image.fromarray(image if image.shape[-1] == 3 else image[..., 0]).save(root / rel)
    line = {"image": rel, "caption": text}
    if labels is not None:
      line["label"] = labels[k]
    lines.append(json.dumps(line))
  (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(root / name)


def test_jsonl_native_size_is_pixel_exact(tmp_path):
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(4)]
  texts = ["a red cat", "ünïcode «quotes»", "", "two\nlines"]
  _write_folder(tmp_path, images, texts, labels=[3, 1, 0, 2])
  source = captions.get_caption_source(f"jsonl:{tmp_path}/{{split}}.jsonl", "train")
  assert len(source) == 4 and source.image_shape == (6, 5, 3)
  assert source.num_levels == 256 and source.num_classes == 4
  for k in range(4):
    example = source[k]
    assert example["image"].dtype == np.uint8
    np.testing.assert_array_equal(example["image"], images[k])
    assert example["caption"] == texts[k] == source.caption(k)
    assert example["label"] == [3, 1, 0, 2][k]
  assert not re.search(r"0x[0-9a-f]+", repr(source)) and str(tmp_path) not in repr(source)
  # The eval iterator carries the captions through, in order.
  batches = list(pipeline.epoch_iterator(source, global_batch_size=3, process_index=0,
                                         process_count=1))
  mask = np.concatenate([b["mask"] for b in batches])
  assert list(np.concatenate([b["caption"] for b in batches])[mask]) == texts


def test_jsonl_resize_and_crop(tmp_path):
  wide = np.arange(4 * 8 * 3, dtype=np.uint8).reshape(4, 8, 3)  # short side already 4
  flat = np.full((12, 9, 3), 77, np.uint8)  # resized 12x9 -> 5x4 then cropped
  grey = np.arange(30, dtype=np.uint8).reshape(6, 5, 1)
  _write_folder(tmp_path, [wide, flat, grey], ["w", "f", "g"])
  source = captions.JsonlCaptionSource(tmp_path / "train.jsonl", image_size=4)
  assert source.image_shape == (4, 4, 3) and source.num_classes == 0
  np.testing.assert_array_equal(source[0]["image"], wide[:, 2:6])  # pure centre crop
  np.testing.assert_array_equal(source[1]["image"], np.full((4, 4, 3), 77, np.uint8))
  assert source[2]["image"].shape == (4, 4, 3)  # grey PNG converted to RGB
  # Mixed native sizes need image_size.
  with pytest.raises(ValueError, match="image_size"):
    _ = captions.JsonlCaptionSource(tmp_path / "train.jsonl")[1]
  # Greyscale mode keeps one channel, pixel-exact at native size.
  _write_folder(tmp_path / "grey", [grey], ["g"])
  grey_source = captions.JsonlCaptionSource(tmp_path / "grey" / "train.jsonl", mode="L")
  assert grey_source.image_shape == (6, 5, 1)
  np.testing.assert_array_equal(grey_source[0]["image"], grey)


def test_jsonl_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='"caption"'):
    captions.get_caption_source(f"jsonl:{tmp_path}/{{split}}.jsonl", "train")
  path = _write_folder(tmp_path, [np.zeros((2, 2, 3), np.uint8)], ["x"])
  with pytest.raises(ValueError, match=r"\{split\}"):
    captions.get_caption_source(f"jsonl:{path}", "test")
  assert len(captions.get_caption_source(f"jsonl:{path}", "train")) == 1
  with pytest.raises(ValueError, match="jsonl:"):
    captions.get_caption_source(path, "train")
  (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\n', encoding="utf-8")
  with pytest.raises(ValueError, match="bad.jsonl:1"):
    captions.JsonlCaptionSource(tmp_path / "bad.jsonl")
  (tmp_path / "gone.jsonl").write_text(
      '{"image": "img/0.png", "caption": "a"}\n{"image": "nope.png", "caption": "b"}\n',
      encoding="utf-8")
  with pytest.raises(FileNotFoundError, match="nope.png"):
    _ = captions.JsonlCaptionSource(tmp_path / "gone.jsonl")[1]


def test_digits_through_the_registry():
  source = captions.get_caption_source("digits", "test")
  assert len(source) == 297 and source.num_levels == 17
  assert source[5]["caption"] == digits.caption_for(int(source[5]["label"]), 1505)
  with pytest.raises(ValueError, match="image_size"):
    captions.get_caption_source("digits", "train", image_size=32)


# --------------------------------------------------------------------------- tfds


def _tfds_images(n):
  rng = np.random.default_rng(1)
  return [rng.integers(0, 256, (5 + k % 3, 4, 3), dtype=np.uint8) for k in range(n)]


@pytest.fixture(scope="module")
def caption_tfds_dir(tmp_path_factory):
  """A COCO-like tfds dataset (variable-size images, 1-3 captions each) as ArrayRecord.

  Named coco_captions, like tfds' own, whose builder code needs TensorFlow: the source
  must read it from its prepared files alone.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path_factory.mktemp("tfds_captions")

  with tfds.core.registered.skip_registration():

    class CocoCaptions(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "key": np.int64,
            "captions": tfds.features.Sequence({"id": np.int64,
                                                "text": tfds.features.Text()}),
            "title": tfds.features.Text()}))

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

      def _generate_examples(self):
        for k, image in enumerate(_tfds_images(9)):
          yield k, {"image": PIL.Image.fromarray(image), "key": k, "title": f"título {k}",
                    "captions": [{"id": j, "text": f"image {k} caption {j}"}
                                 for j in range(1 + k % 3)]}

  CocoCaptions(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_captions_read_back_exactly(caption_tfds_dir, tmp_path):
  originals = _tfds_images(9)
  nested = captions.get_caption_source("coco_captions", "train", caption_tfds_dir)
  raw = nested._source  # pylint: disable=protected-access  (to identify the examples)
  assert len(nested) == 9 and nested.num_classes == 0 and nested.image_shape == (None, None, 3)
  seen = []
  for i in range(9):
    k = int(raw[i]["key"])
    seen.append(k)
    example = nested[i]
    np.testing.assert_array_equal(example["image"], originals[k])
    j = zlib.crc32(str(i).encode()) % (1 + k % 3)  # the documented "hash" rule
    assert example["caption"] == f"image {k} caption {j}" == nested.caption(i)
  assert sorted(seen) == list(range(9))
  fixed = captions.TfdsCaptionSource("coco_captions", "train", caption_tfds_dir,
                                     caption_key="captions/text", caption_choice=1)
  title = captions.TfdsCaptionSource("coco_captions", "train", caption_tfds_dir,
                                     caption_key="title", image_size=4)
  for i in range(9):
    k = int(raw[i]["key"])
    assert fixed[i]["caption"] == f"image {k} caption {1 % (1 + k % 3)}"
    assert title[i]["caption"] == f"título {k}" and title[i]["image"].shape == (4, 4, 3)
  assert title.image_shape == (4, 4, 3) and "0x" not in repr(title)
  with pytest.raises(KeyError, match="caption_key"):
    captions.TfdsCaptionSource("coco_captions", "train", caption_tfds_dir, caption_key="key")
  with pytest.raises(ValueError, match="coco_captions.*validation"):
    captions.TfdsCaptionSource("coco_captions", "validation", caption_tfds_dir)
  with pytest.raises(FileNotFoundError, match="tfds build coco_captions"):
    captions.get_caption_source("coco_captions", "train", tmp_path)


# ------------------------------------------------------------------- embedding cache

MAX_LENGTH = 12


@pytest.fixture(scope="module")
def text_encoder():
  return text_encoder_lib.load_text_encoder("tiny", max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def source():
  return workdir_lib.FirstExamples(digits.DigitsSource("test"), 37)


def _on_the_fly(text_encoder, captions_list):
  """Reference: the tokenizer and imagen.t5.encode in float32, in one unpadded batch."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from imagen import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  encoder = t5.T5Encoder(t5.T5Config.preset("tiny"), rngs=nnx.Rngs(0))
  tokens = tok_lib.default_tokenizer(MAX_LENGTH)(captions_list)
  emb, mask = t5.encode(encoder, tokens["input_ids"], tokens["attention_mask"])
  return np.asarray(emb, np.float32), np.asarray(mask)


def _encode(source, out, text_encoder, processes=1, **kwargs):
  for p in range(processes):
    text_cache.encode_split(source, str(out), "test", text_encoder, captions_name="digits",
                            process_index=p, process_count=processes, **kwargs)


def test_two_process_cache_equals_on_the_fly_encoding(tmp_path, source, text_encoder):
  _encode(source, tmp_path, text_encoder, processes=2, batch_size=8, part_size=8)
  assert sorted(os.listdir(tmp_path)) == [
      "test-00000-of-00002.array_record", "test-00001-of-00002.array_record",
      "test-manifest.json"]  # parts and progress files were cleaned up
  cache = text_cache.EmbeddingCache(tmp_path, "test")
  assert len(cache) == 37 and cache.d_model == 32 and cache.max_length == MAX_LENGTH
  assert cache.manifest["shard_counts"] == [19, 18] and cache.manifest["model"]["random"]
  texts = [source[i]["caption"] for i in range(37)]
  ref_emb, ref_mask = _on_the_fly(text_encoder, texts)
  for i in range(37):
    emb, mask = cache[i]
    assert emb.dtype == np.float32 and emb.shape == (MAX_LENGTH, 32)
    np.testing.assert_array_equal(mask, ref_mask[i])
    np.testing.assert_array_equal(emb[mask == 0], 0.0)
    # bf16 keeps 8 significant bits: relative error <= 2^-8 (one ulp, allowing for the
    # float32 sum order of a different batch shape).
    np.testing.assert_allclose(emb, ref_emb[i], rtol=2**-8, atol=1e-6)
    assert cache.record(i)["caption"] == texts[i]
  # Stored values are bf16 numbers exactly, and the largest errors are at the bf16 scale.
  emb0 = cache[0][0]
  np.testing.assert_array_equal(emb0, emb0.astype(ml_dtypes.bfloat16).astype(np.float32))
  assert np.abs(emb0 - ref_emb[0]).max() > 0  # really rounded, not stored in float32
  restored = pickle.loads(pickle.dumps(cache))
  np.testing.assert_array_equal(restored[36][0], cache[36][0])


def test_bf16_bits_round_trip():
  x = np.array([1.0, -2.5, 3.14159265, 1e-30, 65504.0, 0.0], np.float32)
  bits = text_cache.bf16_bits(x)
  assert bits.dtype == np.uint16 and bits[0] == 0x3F80 and bits[1] == 0xC020
  np.testing.assert_array_equal(text_cache.from_bf16_bits(bits),
                                jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))


def test_resume_after_crash_on_gcs_gives_the_same_cache(tmp_path, gcs_dir, source,
                                                        text_encoder):
  """The crashed-and-resumed cache is written to gs:// (the local GCS emulator): every
  file byte-identical to a clean local one, and read back through gs://."""
  clean, crashed = tmp_path / "clean", fs.path(gcs_dir) / "crashed"
  _encode(source, clean, text_encoder, batch_size=8, part_size=16)
  calls = {"n": 0}

  def dying_embed(ids, mask):
    calls["n"] += 1
    if calls["n"] == 4:  # part 0 = batches 1-2 is written; crash inside part 1
      raise RuntimeError("simulated preemption")
    return text_encoder.embed(ids, mask)

  dying = text_encoder_lib.TextEncoder(text_encoder.tokenizer, dying_embed,
                                       text_encoder.d_model, text_encoder.identity)
  with pytest.raises(RuntimeError, match="preemption"):
    _encode(source, crashed, dying, batch_size=8, part_size=16)
  shard = "test-00000-of-00001.array_record"
  progress = json.loads((crashed / f"{shard}.progress.json").read_text())
  assert progress["parts_done"] == 1 and not (crashed / shard).exists()
  with pytest.raises(FileNotFoundError, match="incomplete.*process 0"):
    text_cache.EmbeddingCache(crashed, "test")
  calls["n"] = -100  # no more crashes; count the batches the rerun encodes
  _encode(source, crashed, dying, batch_size=8, part_size=16)
  assert calls["n"] == -100 + 3  # parts 1 and 2 (37 = 16 + 16 + 5): 2 + 1 batches
  assert (crashed / shard).read_bytes() == (clean / shard).read_bytes()
  assert (crashed / "test-manifest.json").read_bytes() == (
      clean / "test-manifest.json").read_bytes()
  assert sorted(p.name for p in crashed.iterdir()) == [shard, "test-manifest.json"]
  from_gcs, local = text_cache.EmbeddingCache(crashed, "test"), text_cache.EmbeddingCache(
      clean, "test")
  for i in (0, 17, 36):
    np.testing.assert_array_equal(from_gcs[i][0], local[i][0])
    assert from_gcs.record(i)["caption"] == local.record(i)["caption"]
  _encode(source, crashed, dying, batch_size=8, part_size=16)  # complete: a no-op
  assert calls["n"] == -97


def test_cache_errors(tmp_path, source, text_encoder):
  with pytest.raises(FileNotFoundError, match="launch.encode_text.*--split test"):
    text_cache.EmbeddingCache(tmp_path, "test")
  _encode(source, tmp_path, text_encoder, batch_size=8)
  other = text_encoder_lib.load_text_encoder("tiny", max_length=MAX_LENGTH + 4)
  with pytest.raises(ValueError, match="different encoding.*max_length"):
    _encode(source, tmp_path, other, batch_size=8)
  cache = text_cache.EmbeddingCache(tmp_path, "test")
  with pytest.raises(ValueError, match="another split"):
    text_cache.WithTextEmbeddings(workdir_lib.FirstExamples(digits.DigitsSource("test"), 36),
                                  cache)
  shifted = workdir_lib.FirstExamples(digits.DigitsSource("train"), 37)  # same size, other captions
  wrapped = text_cache.WithTextEmbeddings(shifted, cache)
  with pytest.raises(ValueError, match="re-encode"):
    for i in range(37):  # the digits test and train captions differ at some index
      _ = wrapped[i]


def test_training_reads_cached_embeddings(tmp_path, source, text_encoder):
  _encode(source, tmp_path, text_encoder, batch_size=8)
  cache = text_cache.EmbeddingCache(tmp_path, "test")
  wrapped = text_cache.WithTextEmbeddings(source, cache)
  loader = pipeline.make_loader(wrapped, global_batch_size=4, seed=0, process_index=0,
                                process_count=1)
  batch = next(iter(loader))
  assert batch["text_emb"].shape == (4, MAX_LENGTH, 32) and batch["text_emb"].dtype == np.float32
  assert batch["text_mask"].shape == (4, MAX_LENGTH)
  for row in range(4):
    i = next(i for i in range(37) if source[i]["caption"] == batch["caption"][row] and
             np.array_equal(source[i]["image"], batch["image"][row]))
    np.testing.assert_array_equal(batch["text_emb"][row], cache[i][0])
  assert "0x" not in repr(wrapped)


def test_command_line_offline_default(tmp_path, caplog):
  from absl import flags  # pylint: disable=g-import-not-at-top
  flag_values = flags.FlagValues()  # not the global FLAGS, which other modules use
  encode_text.define_flags(flag_values)
  flag_values(["encode_text", "--captions", "digits", "--split", "test", "--out",
               str(tmp_path), "--t5", "tiny", "--max_length", "8", "--batch_size", "64"])
  with caplog.at_level("WARNING"):
    encode_text.encode_from_flags(flag_values)
  assert "OFFLINE DEFAULT: randomly initialised T5" in caplog.text
  assert "OFFLINE DEFAULT: small sentencepiece model" in caplog.text
  cache = text_cache.EmbeddingCache(tmp_path, "test")
  assert len(cache) == 297 and cache[296][0].shape == (8, 32)
  assert cache.manifest["model"]["t5"] == "tiny" and cache.manifest["captions"] == "digits"
  wrapped = text_cache.WithTextEmbeddings(digits.DigitsSource("test"), cache)
  assert wrapped[296]["caption"] == cache.record(296)["caption"]


def test_module_entry_point_parses_flags():
  """`python -m launch.encode_text` reaches absl (which rejects the missing --out)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "launch.encode_text", "--split", "test"],
                       capture_output=True, text=True, env=env, timeout=120, check=False,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode != 0 and "--out" in out.stderr


def _write_tiny_hf_checkpoint(directory):
  """A random T5 v1.1-shaped encoder in Hugging Face's file layout, with our vocabulary."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from imagen import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  v, d, kv, h, f, n = 256, 16, 4, 2, 24, 2
  rng = np.random.default_rng(3)
  w = lambda *shape: rng.normal(0, 0.5, shape).astype(np.float32)
  tensors = {"shared.weight": w(v, d), "encoder.final_layer_norm.weight": 1 + w(d)}
  for i in range(n):
    b = f"encoder.block.{i}.layer"
    for x in "qkv":
      tensors[f"{b}.0.SelfAttention.{x}.weight"] = w(h * kv, d)
    tensors[f"{b}.0.SelfAttention.o.weight"] = w(d, h * kv)
    tensors[f"{b}.0.layer_norm.weight"] = 1 + w(d)
    tensors[f"{b}.1.layer_norm.weight"] = 1 + w(d)
    tensors[f"{b}.1.DenseReluDense.wi_0.weight"] = w(f, d)
    tensors[f"{b}.1.DenseReluDense.wi_1.weight"] = w(f, d)
    tensors[f"{b}.1.DenseReluDense.wo.weight"] = w(d, f)
  tensors["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = w(32, h)
  os.makedirs(directory, exist_ok=True)
  safetensors.numpy.save_file(tensors, os.path.join(directory, "model.safetensors"))
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as fh:
    json.dump({"model_type": "t5", "vocab_size": v, "d_model": d, "d_kv": kv, "d_ff": f,
               "num_layers": n, "num_heads": h, "feed_forward_proj": "gated-gelu"}, fh)
  with open(tok_lib.DEFAULT_SPM_PATH, "rb") as src, open(
      os.path.join(directory, "spiece.model"), "wb") as dst:
    dst.write(src.read())


def test_hugging_face_checkpoint_directory(tmp_path, source):
  from imagen import t5_checkpoints  # pylint: disable=g-import-not-at-top
  ckpt = tmp_path / "t5-tiny-hf"
  _write_tiny_hf_checkpoint(ckpt)
  text_encoder = text_encoder_lib.load_text_encoder(f"hf:{ckpt}", max_length=MAX_LENGTH)
  assert text_encoder.d_model == 16 and not text_encoder.identity["random"]
  _encode(source, tmp_path / "cache", text_encoder, batch_size=8)
  cache = text_cache.EmbeddingCache(tmp_path / "cache", "test")
  assert cache.manifest["model"]["t5"] == "hf:t5-tiny-hf"
  _, encoder = t5_checkpoints.load_hf(str(ckpt))
  tokens = text_encoder.tokenizer([source[i]["caption"] for i in range(5)])
  ref, _ = t5.encode(encoder, tokens["input_ids"], tokens["attention_mask"])
  for i in range(5):
    np.testing.assert_allclose(cache[i][0], np.asarray(ref[i]), rtol=2**-8, atol=1e-6)
  with pytest.raises(FileNotFoundError, match="Hugging Face T5 directory"):
    text_encoder_lib.load_text_encoder(f"hf:{tmp_path}/missing")
