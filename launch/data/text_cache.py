"""The text-embedding cache files: T5 embeddings of every caption of a split, beside the images.

Imagen keeps its T5 encoder frozen (Saharia et al. 2022, sec. 2.1), so a caption's
embedding never changes during training: computing it once saves running a 4.6B-parameter
encoder at every step. `encode_split` writes a split's cache (the command is
`python -m launch.encode_text`); training reads it through `WithTextEmbeddings(source,
EmbeddingCache(DIR, split))`, whose examples carry "text_emb" float32 [L, d] and
"text_mask" int32 [L] beside "image" and "caption"; the model then skips T5 entirely.

This module is what grain's data-loader workers import: numpy, safetensors, ml_dtypes and
array_record only, no jax. The encoder that `encode_split` writes with is any callable
captions -> (emb, mask) with `max_length`, `d_model` and `identity` attributes
(launch.text_encoder.TextEncoder).

Files in DIR, for each split:
  {split}-manifest.json     what was encoded: captions, split, count, max_length L,
                            d_model d, the model (spec, config and tokenizer hashes), the
                            process count P and the shard names and sizes;
  {split}-{p:05d}-of-{P:05d}.array_record
                            process p's examples i = p, p + P, p + 2P, ... in that order,
                            so example i is record i // P of shard i % P.
Each record is a safetensors blob (no pickle) with tensors
  "index"   int64 [1]   the example index (checked on read),
  "emb"     uint16 [L, d]  the bits of the bfloat16 embedding, zero at padding,
  "mask"    uint8 [L]   T5's attention mask (1 on the caption's tokens and EOS),
  "caption" uint8 [n]   the UTF-8 caption, so a reader can check it matches the source.
Embeddings are padded to max_length (simple fixed shapes; storing only the valid tokens
would take about L / mean length times less space).

Several processes (`launch.distributed`: one per host) each encode their own examples;
no collective is needed. Resuming: a process writes its records in parts of
`part_size` examples (each written under a .tmp name and renamed when closed) and records
finished parts in `{shard}.progress.json`; a rerun skips finished shards and parts, and
continues after the last finished part. When all its parts exist, the process merges
them into its shard (again .tmp, then rename) and deletes them.
"""

import json
import logging
import threading

import ml_dtypes
import numpy as np
import safetensors.numpy
from array_record.python import array_record_module

from launch import fs
from launch.data import pipeline

FORMAT = "launch.encode_text/v1"  # the files' format name (kept: existing caches carry it)
_WRITER_OPTIONS = "group_size:1"  # one record per chunk: cheap random access
_READER_OPTIONS = "readahead_buffer_size:0"


# ------------------------------------------------------------------------------- naming


def shard_name(split: str, process_index: int, process_count: int) -> str:
  return f"{split}-{process_index:05d}-of-{process_count:05d}.array_record"


def manifest_path(directory: str, split: str) -> str:
  return fs.join(directory, f"{split}-manifest.json")


def _progress_path(directory, shard):
  return fs.join(directory, shard + ".progress.json")


def _part_path(directory, shard, k):
  return fs.join(directory, f"{shard}.part-{k:05d}")


def _write_json_atomic(path: str, value) -> None:
  fs.write_atomic(path, json.dumps(value, indent=1, sort_keys=True))


def _read_json(path: str):
  return json.loads(fs.path(path).read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------- records


def bf16_bits(x) -> np.ndarray:
  """float array -> uint16 bits of its bfloat16 rounding (round to nearest even)."""
  return np.asarray(x).astype(ml_dtypes.bfloat16).view(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
  """uint16 bfloat16 bits -> float32 (exact: bf16 is the top half of a float32)."""
  return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def encode_record(index: int, emb_bits: np.ndarray, mask: np.ndarray, caption: str) -> bytes:
  return safetensors.numpy.save({
      "index": np.array([index], np.int64), "emb": np.ascontiguousarray(emb_bits, np.uint16),
      "mask": np.asarray(mask, np.uint8),
      "caption": np.frombuffer(caption.encode("utf-8"), np.uint8)})


def decode_record(blob: bytes) -> dict:
  """{"index": int, "emb": float32 [L, d], "mask": int32 [L], "caption": str}."""
  t = safetensors.numpy.load(blob)
  return {"index": int(t["index"][0]), "emb": from_bf16_bits(t["emb"]),
          "mask": t["mask"].astype(np.int32), "caption": t["caption"].tobytes().decode("utf-8")}


# -------------------------------------------------------------------------------- writing


def _manifest(source, split, captions_name, text_encoder, process_count) -> dict:
  n = len(source)
  counts = [len(range(p, n, process_count)) for p in range(process_count)]
  return {
      "format": FORMAT, "captions": captions_name, "split": split, "count": n,
      "max_length": text_encoder.max_length, "d_model": text_encoder.d_model,
      "dtype": "bfloat16", "model": text_encoder.identity,
      "process_count": process_count,
      "shards": [shard_name(split, p, process_count) for p in range(process_count)],
      "shard_counts": counts}


def _check_or_write_manifest(out_dir, split, manifest) -> None:
  """Writes the manifest, or checks that an existing one describes the same encoding."""
  path = manifest_path(out_dir, split)
  if fs.path(path).exists():
    existing = _read_json(path)
    if existing != manifest:
      diff = {k: (existing.get(k), manifest.get(k)) for k in set(existing) | set(manifest)
              if existing.get(k) != manifest.get(k)}
      raise ValueError(
          f"{path} describes a different encoding (existing, requested): {diff}. Use "
          "another --out directory, or delete this split's files there to re-encode.")
  else:
    _write_json_atomic(path, manifest)


def encode_split(source, out_dir: str, split: str, text_encoder, *,
                 captions_name: str = "", process_index: int = 0, process_count: int = 1,
                 batch_size: int = 64, part_size: int | None = None) -> str:
  """Encodes this process's examples of `source` into its shard; returns the shard path.

  Process p encodes examples p, p + P, ... (P = process_count) in batches of batch_size
  (the last one padded with empty captions, so one compiled shape serves all); every
  part_size examples (default 16 batches; a multiple of batch_size) are written and
  recorded as done, which is where a rerun continues after a crash.
  `text_encoder` maps a list of captions to (emb [B, L, d], mask [B, L]) and has
  `max_length`, `d_model` and `identity` (a launch.text_encoder.TextEncoder).
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  part_size = part_size or 16 * batch_size
  if batch_size < 1 or part_size % batch_size:
    raise ValueError(f"part_size={part_size} must be a positive multiple of "
                     f"batch_size={batch_size}")
  if len(source) and not isinstance(_caption(source, 0), str):
    raise ValueError(f"{source!r} has no captions (its examples lack a str 'caption'); use a "
                     "caption source (launch.data.captions.get_caption_source)")
  fs.path(out_dir).mkdir(parents=True, exist_ok=True)
  manifest = _manifest(source, split, captions_name, text_encoder, process_count)
  _check_or_write_manifest(out_dir, split, manifest)
  shard = shard_name(split, process_index, process_count)
  shard_path = fs.join(out_dir, shard)
  indices = list(range(process_index, len(source), process_count))
  num_parts = -(-len(indices) // part_size)
  progress_path = _progress_path(out_dir, shard)
  if fs.path(shard_path).exists():
    logging.info("%s is complete; nothing to do", shard_path)
    _remove_parts(out_dir, shard, num_parts)  # left over if a run stopped right after merging
    return shard_path
  done = 0
  if fs.path(progress_path).exists():
    progress = _read_json(progress_path)
    if progress.get("part_size") != part_size:
      raise ValueError(f"{progress_path} was written with part_size="
                       f"{progress.get('part_size')}; resume with the same part_size")
    done = int(progress["parts_done"])
    logging.info("Resuming %s after %d of %d parts", shard, done, num_parts)
  for k in range(done, num_parts):
    _write_part(source, indices[k * part_size:(k + 1) * part_size], text_encoder, batch_size,
                _part_path(out_dir, shard, k))
    _write_json_atomic(progress_path, {"part_size": part_size, "parts_done": k + 1,
                                       "num_parts": num_parts})
    logging.info("%s: part %d/%d written", shard, k + 1, num_parts)
  _merge_parts([_part_path(out_dir, shard, k) for k in range(num_parts)], shard_path)
  _remove_parts(out_dir, shard, num_parts)
  logging.info("Wrote %s (%d examples)", shard_path, len(indices))
  return shard_path


def _caption(source, i: int) -> str:
  """Example i's caption; sources with a `caption(i)` method skip decoding the image."""
  return source.caption(i) if hasattr(source, "caption") else source[i]["caption"]


def _remove_parts(out_dir, shard, num_parts) -> None:
  for path in [_part_path(out_dir, shard, k) for k in range(num_parts)] + [
      _progress_path(out_dir, shard)]:
    fs.remove(path)


# ArrayRecord writes local files only (its reader opens gs:// itself): each file is written
# locally and moved to its place whole (fs.local_then_move), so a crash leaves no half file.


def _write_part(source, indices, text_encoder, batch_size, path) -> None:
  with fs.local_then_move(path) as tmp:
    writer = array_record_module.ArrayRecordWriter(tmp, _WRITER_OPTIONS)
    try:
      for start in range(0, len(indices), batch_size):
        batch = indices[start:start + batch_size]
        captions = [_caption(source, i) for i in batch]
        emb, mask = text_encoder(captions + [""] * (batch_size - len(batch)))
        bits = bf16_bits(emb)
        for row, (i, caption) in enumerate(zip(batch, captions)):
          writer.write(encode_record(i, bits[row], mask[row], caption))
    finally:
      writer.close()


def _merge_parts(parts, shard_path) -> None:
  with fs.local_then_move(shard_path) as tmp:
    writer = array_record_module.ArrayRecordWriter(tmp, _WRITER_OPTIONS)
    try:
      for part in parts:
        reader = array_record_module.ArrayRecordReader(part)
        for blob in reader.read_all():
          writer.write(blob)
        reader.close()
    finally:
      writer.close()


# -------------------------------------------------------------------------------- reading


class EmbeddingCache:
  """Random access to a split's cached embeddings: cache[i] -> (emb float32 [L, d], mask).

  mask is int32 [L] (1 on the caption's tokens). `record(i)` also gives the stored caption.
  Opens shards lazily, one thread-safe reader per shard; picklable for grain workers.
  """

  def __init__(self, directory: str, split: str):
    self.directory, self.split = fs.join(directory), split
    path = manifest_path(self.directory, split)
    if not fs.path(path).exists():
      raise FileNotFoundError(
          f"no text-embedding cache for split {split!r} in {self.directory!r} (expected "
          f"{path}). Make it with: python -m launch.encode_text --captions <source> "
          f"--split {split} --out {self.directory}")
    self.manifest = _read_json(path)
    if self.manifest.get("format") != FORMAT:
      raise ValueError(f"{path} has format {self.manifest.get('format')!r}, expected "
                       f"{FORMAT!r}")
    self.process_count = self.manifest["process_count"]
    self.max_length, self.d_model = self.manifest["max_length"], self.manifest["d_model"]
    for p, name in enumerate(self.manifest["shards"]):
      if not (fs.path(self.directory) / name).exists():
        raise FileNotFoundError(
            f"text-embedding cache {self.directory!r} split {split!r} is incomplete: shard "
            f"{name} is missing. Rerun launch.encode_text for process {p} of "
            f"{self.process_count} (it resumes where it stopped).")
    self._lock = threading.Lock()
    self._readers = [None] * self.process_count

  def _reader(self, p):
    if self._readers[p] is None:
      with self._lock:
        if self._readers[p] is None:
          path = fs.join(self.directory, self.manifest["shards"][p])
          reader = array_record_module.ArrayRecordReader(path, _READER_OPTIONS)
          if reader.num_records() != self.manifest["shard_counts"][p]:
            raise ValueError(f"{path} holds {reader.num_records()} records, the manifest "
                             f"says {self.manifest['shard_counts'][p]}: re-encode it")
          self._readers[p] = reader
    return self._readers[p]

  def __len__(self) -> int:
    return self.manifest["count"]

  def record(self, i: int) -> dict:
    """{"index", "emb" float32 [L, d], "mask" int32 [L], "caption"} of example i."""
    if not 0 <= i < len(self):
      raise IndexError(f"example {i} out of range for a cache of {len(self)}")
    p, k = i % self.process_count, i // self.process_count
    rec = decode_record(self._reader(p).read([k])[0])
    if rec["index"] != i:
      raise ValueError(f"cache record {k} of shard {p} holds example {rec['index']}, "
                       f"expected {i}: the cache is corrupt")
    return rec

  def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    rec = self.record(i)
    return rec["emb"], rec["mask"]

  def __getstate__(self):
    return {"directory": self.directory, "split": self.split}

  def __setstate__(self, state):
    self.__init__(state["directory"], state["split"])

  def __repr__(self) -> str:
    model = self.manifest["model"]
    return (f"EmbeddingCache(split={self.split!r}, t5={model.get('t5')!r}, "
            f"max_length={self.max_length}, d_model={self.d_model})")


class WithTextEmbeddings:
  """A caption source whose examples also carry the cached "text_emb" and "text_mask".

  Training reads these instead of running T5. Each example's caption is compared with the
  cached one (cheap, and catches a cache made from another caption rule or data set).
  """

  def __init__(self, source, cache: EmbeddingCache, check_captions: bool = True):
    if len(source) != len(cache):
      raise ValueError(f"{source!r} has {len(source)} examples but {cache!r} holds "
                       f"{len(cache)}: the cache was made from another split or data set")
    self.source, self.cache, self.check_captions = source, cache, check_captions
    pipeline.copy_metadata(self, source)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    example = dict(self.source[i])
    rec = self.cache.record(i)
    if self.check_captions and rec["caption"] != example.get("caption"):
      raise ValueError(f"example {i}: cached caption {rec['caption']!r} differs from the "
                       f"source's {example.get('caption')!r}; re-encode the captions")
    example["text_emb"], example["text_mask"] = rec["emb"], rec["mask"]
    return example

  def __repr__(self) -> str:
    return f"WithTextEmbeddings({self.source!r}, {self.cache!r})"
