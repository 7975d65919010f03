"""Loading released T5 v1.1 / UMT5 encoder weights into `imagen.t5.T5Encoder`.

Two formats, read without pickle and without network:

* Hugging Face: a directory with `config.json` and `model.safetensors`, or shards
  `model-0000i-of-0000n.safetensors` listed by `model.safetensors.index.json`. Tensor
  names follow `transformers`' T5 / UMT5 (`encoder.block.{i}.layer.0.SelfAttention.q.weight`
  ...); torch Linear weights are [out, in] and are transposed to our [in, out] kernels.
  Decoder and LM-head tensors of a full encoder-decoder checkpoint are ignored.
* T5X (how Google publishes T5 v1.1 and UMT5): a directory with a `checkpoint` file, the
  flax-msgpack serialisation of {"version": 3, "optimizer": {"target": params, "state": ...}},
  in which each large array is replaced by the JSON spec of a zarr array that TensorStore
  wrote into a sibling directory named by the dotted parameter path
  (`target.encoder.layers_0.attention.query.kernel/`); small arrays may be inline. T5X
  kernels are already [in, out]. Two encoder layouts exist: per-layer
  (`encoder/layers_{i}/...`, T5 v1.1) and scanned (`encoder/encoder/...` with the layer axis
  second, as in the released UMT5 checkpoints); both are read.

Every tensor is checked against the shape the config implies; a missing or mismatched
tensor is an error that names it and the expected shape. The encoder is built from the
abstract module (`nnx.eval_shape`), so no random weights are materialised; pass
`shardings` (a function from the abstract `nnx.State` to a matching pytree of shardings,
e.g. `lambda s: launch.mesh.param_shardings(s, mesh, "fsdp")`) to place each weight
directly into its shards.
"""

import json
import os
import re
import struct
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from flax import serialization

from imagen.t5 import T5Config, T5Encoder

Shardings = Callable[[nnx.State], Any] | None

# Our stacked layer parameters (paths in T5Encoder's state), by role.
ATTN = {"q": "layers/attention/q/kernel", "k": "layers/attention/k/kernel",
        "v": "layers/attention/v/kernel", "o": "layers/attention/o/kernel"}
FFN = {"wi_0": "layers/mlp/wi_0/kernel", "wi_1": "layers/mlp/wi_1/kernel",
       "wo": "layers/mlp/wo/kernel"}
ATTN_NORM, MLP_NORM = "layers/attention_norm/scale", "layers/mlp_norm/scale"
LAYER_BIAS, SHARED_BIAS = "layers/attention/relative_bias", "relative_bias"
EMBEDDING, FINAL_NORM = "embedding", "final_norm/scale"


# --- building an encoder from named arrays ------------------------------------------------


def expected_shapes(config: T5Config) -> dict[str, tuple[int, ...]]:
  """Our parameter paths ('layers/mlp/wo/kernel', ...) -> shapes, without allocating."""
  abstract = nnx.eval_shape(lambda: T5Encoder(config, rngs=nnx.Rngs(0)))
  return {"/".join(map(str, path)): tuple(v.get_value().shape)
          for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def build_encoder(config: T5Config, arrays: dict[str, np.ndarray],
                  shardings: Shardings = None) -> T5Encoder:
  """A T5Encoder whose parameters are `arrays` (our paths -> float32 numpy arrays)."""
  abstract = nnx.eval_shape(lambda: T5Encoder(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  targets = shardings(state) if shardings is not None else None
  flat = nnx.to_flat_state(state)
  placed = nnx.to_flat_state(targets) if targets is not None else None
  missing = sorted(set("/".join(map(str, p)) for p, _ in flat) - set(arrays))
  if missing:
    raise ValueError(f"no weights given for {missing}")
  leaves = []
  for i, (path, var) in enumerate(flat):
    name = "/".join(map(str, path))
    value = np.asarray(arrays[name], np.float32)
    if value.shape != var.get_value().shape:
      raise ValueError(f"weight {name!r} has shape {value.shape}; the config needs "
                       f"{var.get_value().shape}")
    value = (jax.device_put(value, placed[i][1].get_value()) if placed is not None
             else jnp.asarray(value))
    leaves.append((path, var.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


class _Collector:
  """Reads source tensors by name, checks their shape, and fills our (stacked) arrays."""

  def __init__(self, read: Callable[[str], np.ndarray | None], has: Callable[[str], bool],
               what: str):
    self.read, self.has, self.what = read, has, what
    self.arrays: dict[str, np.ndarray] = {}

  def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if not self.has(name):
      raise ValueError(f"{self.what}: missing tensor {name!r} (expected shape {shape}).")
    value = np.asarray(self.read(name))
    if value.shape != tuple(shape):
      raise ValueError(f"{self.what}: tensor {name!r} has shape {value.shape}; expected shape "
                       f"{tuple(shape)} for this config. Check that the config matches the "
                       "checkpoint.")
    return value.astype(np.float32)

  def one(self, ours: str, name: str, shape, fn=lambda x: x):
    self.arrays[ours] = fn(self.get(name, shape))

  def stack(self, ours: str, names: list[str], shape, fn=lambda x: x):
    self.arrays[ours] = np.stack([fn(self.get(n, shape)) for n in names])


# --- Hugging Face safetensors -------------------------------------------------------------

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "F64": np.float64}


def _read_safetensors_header(path: str) -> tuple[dict, int]:
  """(header dict, byte offset of the data) of a .safetensors file (u64 LE size + JSON)."""
  with open(path, "rb") as f:
    (size,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(size)), 8 + size


def _safetensors_reader(directory: str) -> tuple[dict[str, str], Callable[[str], np.ndarray]]:
  """Name -> file map and a reader for single-file or sharded safetensors checkpoints.

  Tensors are read from the file's header offsets with numpy memory maps, so bfloat16
  (which numpy's safetensors backend cannot return) is read as ml_dtypes.bfloat16.
  """
  index = os.path.join(directory, "model.safetensors.index.json")
  single = os.path.join(directory, "model.safetensors")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = {name: os.path.join(directory, fn) for name, fn in weight_map.items()}
  elif os.path.exists(single):
    header, _ = _read_safetensors_header(single)
    files = {name: single for name in header if name != "__metadata__"}
  else:
    raise FileNotFoundError(
        f"{directory} has neither model.safetensors nor model.safetensors.index.json; save "
        "the model with save_pretrained(..., safe_serialization=True). PyTorch .bin files are "
        "pickles and are not read.")
  headers: dict[str, tuple[dict, int]] = {}

  def read(name: str) -> np.ndarray:
    path = files[name]
    if path not in headers:
      headers[path] = _read_safetensors_header(path)
    header, start = headers[path]
    info = header[name]
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(f"tensor {name!r} in {path} has dtype {info['dtype']}; expected a "
                       f"float type {sorted(_ST_DTYPES)}")
    begin, end = info["data_offsets"]
    data = np.memmap(path, np.uint8, "r", offset=start + begin, shape=(end - begin,))
    return data.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])

  return files, read


def load_hf(directory: str, *, shardings: Shardings = None,
            **config_overrides) -> tuple[T5Config, T5Encoder]:
  """Loads a Hugging Face T5 / mT5 / UMT5 (encoder or encoder-decoder) checkpoint.

  `config_overrides` replace fields of the config read from config.json (e.g.
  dtype="bfloat16", scan_layers=False). Returns (config, encoder).
  """
  with open(os.path.join(directory, "config.json")) as f:
    config = T5Config.from_hf(json.load(f), **config_overrides)
  files, read = _safetensors_reader(directory)
  c = _Collector(read, lambda n: n in files, f"Hugging Face checkpoint {directory}")
  d, inner, f, n = config.d_model, config.inner_dim, config.d_ff, config.num_layers
  blk = lambda i: f"encoder.block.{i}.layer"
  layers = range(n)
  embed = "shared.weight" if "shared.weight" in files else "encoder.embed_tokens.weight"
  c.one(EMBEDDING, embed, (config.vocab_size, d))
  for x in "qkv":
    c.stack(ATTN[x], [f"{blk(i)}.0.SelfAttention.{x}.weight" for i in layers], (inner, d),
            np.transpose)
  c.stack(ATTN["o"], [f"{blk(i)}.0.SelfAttention.o.weight" for i in layers], (d, inner),
          np.transpose)
  c.stack(ATTN_NORM, [f"{blk(i)}.0.layer_norm.weight" for i in layers], (d,))
  c.stack(MLP_NORM, [f"{blk(i)}.1.layer_norm.weight" for i in layers], (d,))
  for x in ("wi_0", "wi_1"):
    c.stack(FFN[x], [f"{blk(i)}.1.DenseReluDense.{x}.weight" for i in layers], (f, d),
            np.transpose)
  c.stack(FFN["wo"], [f"{blk(i)}.1.DenseReluDense.wo.weight" for i in layers], (d, f),
          np.transpose)
  bias_shape = (config.relative_attention_num_buckets, config.num_heads)  # [buckets, heads]
  bias = lambda i: f"{blk(i)}.0.SelfAttention.relative_attention_bias.weight"
  if config.per_layer_position_bias:
    c.stack(LAYER_BIAS, [bias(i) for i in layers], bias_shape)
  else:
    c.one(SHARED_BIAS, bias(0), bias_shape)
  c.one(FINAL_NORM, "encoder.final_layer_norm.weight", (d,))
  return config, build_encoder(config, c.arrays, shardings)


# --- T5X (msgpack + TensorStore zarr) -----------------------------------------------------


def _checkpoint_file(path: str) -> str:
  """The msgpack file of a T5X checkpoint given the file or its directory."""
  for candidate in (path, os.path.join(path, "checkpoint"),
                    os.path.join(path, "state", "checkpoint")):
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(f"{path} is not a T5X checkpoint: no 'checkpoint' msgpack file in "
                          "it (give the checkpoint_<step> directory).")


def _is_ts_spec(x) -> bool:
  return isinstance(x, dict) and "driver" in x and ("kvstore" in x or "path" in x)


def _flatten(tree, prefix=()) -> dict[str, Any]:
  """'/'-joined paths -> leaves (numpy arrays, scalars or TensorStore spec dicts)."""
  if isinstance(tree, dict) and not _is_ts_spec(tree):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (str(k),)))
    return out
  return {"/".join(prefix): tree}


def _absolute_spec(spec: dict, ckpt_dir: str) -> dict:
  """The zarr spec with its (relative) path resolved against the checkpoint directory.

  T5X writes the path relative to the checkpoint (kvstore.path, or top-level path for
  TensorStore < 0.1.14) and, for checkpoints written to GCS, a placeholder bucket; a local
  copy is read through the file driver.
  """
  spec = json.loads(json.dumps(spec))  # deep copy
  kv = spec.get("kvstore")
  if isinstance(kv, str):  # URL form: "file://<rel>" or "gs://<bucket>/<rel>"
    rel = kv[len("file://"):] if kv.startswith("file://") else re.sub(r"^\w+://[^/]*/", "", kv)
  else:
    rel = (kv or {}).get("path") or spec.get("path", "")
  spec.pop("path", None)
  if os.path.isabs(rel):
    raise ValueError(f"TensorStore spec path {rel!r} is absolute; T5X writes paths relative to "
                     "the checkpoint directory.")
  spec["kvstore"] = {"driver": "file", "path": os.path.join(ckpt_dir, rel)}
  return spec


def _t5x_reader(path: str) -> tuple[dict[str, Any], Callable[[str], np.ndarray]]:
  """Leaves of `target` ('encoder/layers_0/...' -> leaf) and a reader for them."""
  import tensorstore as ts  # imported here: only T5X loading needs it

  ckpt_file = _checkpoint_file(path)
  with open(ckpt_file, "rb") as f:
    contents = serialization.msgpack_restore(f.read())
  # version >= 2: {"version", "optimizer": {"target", "state"}}; version 0: a flax state dict.
  tree = contents.get("optimizer", contents) if contents.get("version", 0) else contents
  if "target" not in tree:
    raise ValueError(f"{ckpt_file} has no 'target' parameter tree (found keys "
                     f"{sorted(tree)}); is it a T5X checkpoint?")
  leaves = _flatten(tree["target"])
  ckpt_dir = os.path.dirname(ckpt_file)

  def read(name: str) -> np.ndarray:
    leaf = leaves[name]
    if not _is_ts_spec(leaf):
      return np.asarray(leaf)
    store = ts.open(_absolute_spec(leaf, ckpt_dir), open=True, read=True).result()
    return np.asarray(store.read().result())

  return leaves, read


def load_t5x(path: str, config: T5Config, *, shardings: Shardings = None) -> T5Encoder:
  """Loads the encoder of a T5X checkpoint directory (T5X stores no config: pass it).

  Reads the per-layer layout (`encoder/layers_{i}/...`) or the scanned one
  (`encoder/encoder/...`, layer axis second). Kernels are [in, out] as ours; attention
  kernels of the scanned layout are [in, layers, heads, d_kv] / [heads, layers, d_kv, out];
  relative-bias tables are [heads, buckets] (transposed to our [buckets, heads]).
  """
  leaves, read = _t5x_reader(path)
  c = _Collector(read, lambda n: n in leaves, f"T5X checkpoint {path}")
  d, inner, f, n = config.d_model, config.inner_dim, config.d_ff, config.num_layers
  h, dk, nb = config.num_heads, config.d_kv, config.relative_attention_num_buckets
  c.one(EMBEDDING, "token_embedder/embedding", (config.vocab_size, d))
  c.one(FINAL_NORM, "encoder/encoder_norm/scale", (d,))
  names = {"q": "query", "k": "key", "v": "value", "o": "out"}
  shared = "encoder/relpos_bias/rel_embedding"  # T5 v1.1's one table, [heads, buckets]
  if "encoder/encoder/attention/query/kernel" in leaves:  # scanned: layer axis is axis 1
    s = "encoder/encoder"
    for x in "qkv":
      c.one(ATTN[x], f"{s}/attention/{names[x]}/kernel", (d, n, h, dk),
            lambda w: w.transpose(1, 0, 2, 3).reshape(n, d, inner))
    c.one(ATTN["o"], f"{s}/attention/out/kernel", (h, n, dk, d),
          lambda w: w.transpose(1, 0, 2, 3).reshape(n, inner, d))
    c.one(ATTN_NORM, f"{s}/pre_attention_layer_norm/scale", (d, n), np.transpose)
    c.one(MLP_NORM, f"{s}/pre_mlp_layer_norm/scale", (d, n), np.transpose)
    for x, shape in (("wi_0", (d, n, f)), ("wi_1", (d, n, f)), ("wo", (f, n, d))):
      c.one(FFN[x], f"{s}/mlp/{x}/kernel", shape, lambda w: w.transpose(1, 0, 2))
    per_layer = lambda w: w.transpose(1, 2, 0)  # [heads, layers, buckets] -> [L, nb, h]
    if config.per_layer_position_bias:
      c.one(LAYER_BIAS, f"{s}/relpos_bias/rel_embedding", (h, n, nb), per_layer)
    elif shared not in leaves and f"{s}/relpos_bias/rel_embedding" in leaves:
      # one table per scanned layer, of which T5 v1.1 uses layer 0's
      c.one(SHARED_BIAS, f"{s}/relpos_bias/rel_embedding", (h, n, nb),
            lambda w: per_layer(w)[0])
    else:
      c.one(SHARED_BIAS, shared, (h, nb), np.transpose)
  else:
    lyr = lambda i: f"encoder/layers_{i}"
    for x in "qkv":
      c.stack(ATTN[x], [f"{lyr(i)}/attention/{names[x]}/kernel" for i in range(n)],
              (d, inner))
    c.stack(ATTN["o"], [f"{lyr(i)}/attention/out/kernel" for i in range(n)], (inner, d))
    c.stack(ATTN_NORM, [f"{lyr(i)}/pre_attention_layer_norm/scale" for i in range(n)], (d,))
    c.stack(MLP_NORM, [f"{lyr(i)}/pre_mlp_layer_norm/scale" for i in range(n)], (d,))
    for x, shape in (("wi_0", (d, f)), ("wi_1", (d, f)), ("wo", (f, d))):
      c.stack(FFN[x], [f"{lyr(i)}/mlp/{x}/kernel" for i in range(n)], shape)
    if config.per_layer_position_bias:
      c.stack(LAYER_BIAS, [f"{lyr(i)}/relpos_bias/rel_embedding" for i in range(n)], (h, nb),
              np.transpose)
    else:
      c.one(SHARED_BIAS, shared, (h, nb), np.transpose)
  return build_encoder(config, c.arrays, shardings)
