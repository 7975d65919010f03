"""T5 v1.1 / UMT5 encoder and its loaders against PyTorch `transformers` (test-only).

The reference is `transformers.T5EncoderModel` / `UMT5EncoderModel` with tiny random
weights. Every weight (norms and biases included) is perturbed away from its init and
rounded to bfloat16-representable values, so bf16 checkpoints hold exactly the same numbers
and a swapped or skipped tensor changes the output. T5X checkpoints are written here in the
layout T5X writes (flax msgpack with TensorStore zarr arrays), from the same weights.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from flax import nnx
from flax import serialization

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from imagen import t5_checkpoints as ck  # noqa: E402
from imagen.t5 import T5Config, T5Encoder, encode, relative_position_buckets  # noqa: E402
from launch import mesh as M  # noqa: E402

TINY = dict(feed_forward_proj="gated-gelu", d_model=32, d_kv=8, d_ff=64, num_layers=2,
            num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
            vocab_size=100, is_gated_act=True, dense_act_fn="gelu_new")
TOL = dict(atol=1e-5, rtol=1e-5)


def _inputs():
  """Short unpadded batch, and L=40 (> max_distance 16) with row 1 padded after 25 tokens."""
  rng = np.random.RandomState(0)
  short = rng.randint(1, 100, (2, 12)), np.ones((2, 12), np.int32)
  ids = rng.randint(1, 100, (2, 40))
  mask = np.ones((2, 40), np.int32)
  mask[1, 25:] = 0
  ids[1, 25:] = 0
  return [short, (ids, mask)]


def _torch_model(kind: str):
  torch.manual_seed(0 if kind == "t5" else 1)
  if kind == "t5":
    model = transformers.T5EncoderModel(transformers.T5Config(**TINY))
  else:
    model = transformers.UMT5EncoderModel(transformers.UMT5Config(**TINY))
  with torch.no_grad():
    for p in model.parameters():  # move off the init (norms are ones), round to bf16 values
      p.mul_(1 + 0.2 * torch.randn_like(p)).add_(0.05 * torch.randn_like(p))
      p.copy_(p.to(torch.bfloat16).to(torch.float32))
  return model.eval()


def _torch_outputs(model, inputs):
  """Reference hidden states, computed in float64 (the float32 torch run is itself ~1e-5 off)."""
  model = model.to(torch.float64)
  with torch.no_grad():
    out = [model(input_ids=torch.tensor(i), attention_mask=torch.tensor(m))
           .last_hidden_state.numpy() for i, m in inputs]
  model.to(torch.float32)
  return out


@pytest.fixture(scope="module", params=["t5", "umt5"])
def hf(request, tmp_path_factory):
  """(kind, torch model, saved directory, reference outputs on _inputs())."""
  model = _torch_model(request.param)
  directory = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(directory, safe_serialization=True)
  return request.param, model, directory, _torch_outputs(model, _inputs())


def _apply(encoder, ids, mask):
  graphdef, state = nnx.split(encoder)
  fn = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))
  return np.asarray(fn(state, jnp.asarray(ids), jnp.asarray(mask)))


def _assert_matches(encoder, refs, **tol):
  for (ids, mask), ref in zip(_inputs(), refs):
    out = _apply(encoder, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(out[valid], ref[valid], **(tol or TOL))


# --- Hugging Face safetensors --------------------------------------------------------------


def test_hf_matches_transformers(hf):
  """No padding, padding (valid positions), and L=40 beyond the max relative distance."""
  kind, _, directory, refs = hf
  config, encoder = ck.load_hf(directory)
  assert config.per_layer_position_bias == (kind == "umt5")
  assert (config.d_model, config.num_layers, config.relative_attention_max_distance) == (32, 2, 16)
  _assert_matches(encoder, refs)


def test_hf_sharded_and_bf16_safetensors_load_identically(hf, tmp_path):
  kind, model, directory, refs = hf
  _, encoder = ck.load_hf(directory)
  want = nnx.state(encoder, nnx.Param)
  sharded = str(tmp_path / "sharded")
  model.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
  assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
  assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 2
  bf16 = str(tmp_path / "bf16")
  model.to(torch.bfloat16).save_pretrained(bf16, safe_serialization=True)
  model.to(torch.float32)
  for path in (sharded, bf16):
    _, other = ck.load_hf(path)
    got = nnx.state(other, nnx.Param)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 want, got)
  _assert_matches(other, refs)


def _rewrite_safetensors(src, dst, edit):
  from safetensors.numpy import load_file, save_file
  shutil.copytree(src, dst)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  edit(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})


def test_hf_missing_or_misshapen_tensor_is_named(hf, tmp_path):
  _, _, directory, _ = hf
  name = "encoder.block.1.layer.1.DenseReluDense.wi_0.weight"
  _rewrite_safetensors(directory, tmp_path / "missing", lambda t: t.pop(name))
  with pytest.raises(ValueError, match=rf"missing tensor '{name}' \(expected shape \(64, 32\)\)"):
    ck.load_hf(str(tmp_path / "missing"))

  def shrink(t):
    t[name] = t[name][:60]
  _rewrite_safetensors(directory, tmp_path / "shape", shrink)
  with pytest.raises(ValueError, match=rf"'{name}' has shape \(60, 32\); expected shape "
                                       r"\(64, 32\)"):
    ck.load_hf(str(tmp_path / "shape"))


# --- T5X (msgpack + TensorStore zarr), written here as T5X writes it ------------------------


def _t5x_target(model, kind: str, scanned: bool) -> dict[str, np.ndarray]:
  """The T5X parameter names of `model`'s weights ('encoder/layers_0/...' -> [in, out])."""
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  n, h, dk = TINY["num_layers"], TINY["num_heads"], TINY["d_kv"]
  blk = lambda i, rest: sd[f"encoder.block.{i}.layer.{rest}"]
  per_layer = {}  # name -> list over layers, T5X [in, out] orientation
  for x, t5x in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
    per_layer[f"attention/{t5x}/kernel"] = [blk(i, f"0.SelfAttention.{x}.weight").T
                                            for i in range(n)]
  per_layer["pre_attention_layer_norm/scale"] = [blk(i, "0.layer_norm.weight") for i in range(n)]
  per_layer["pre_mlp_layer_norm/scale"] = [blk(i, "1.layer_norm.weight") for i in range(n)]
  for x in ("wi_0", "wi_1", "wo"):
    per_layer[f"mlp/{x}/kernel"] = [blk(i, f"1.DenseReluDense.{x}.weight").T for i in range(n)]
  rel = lambda i: blk(i, "0.SelfAttention.relative_attention_bias.weight").T  # [heads, buckets]
  out = {"token_embedder/embedding": sd["shared.weight"],
         "encoder/encoder_norm/scale": sd["encoder.final_layer_norm.weight"],
         # decoder tensors of a full checkpoint must be ignored
         "decoder/decoder_norm/scale": np.full(32, np.nan, np.float32),
         "decoder/layers_0/self_attention/query/kernel": np.full((32, 32), np.nan, np.float32)}
  if kind == "umt5":
    per_layer["relpos_bias/rel_embedding"] = [rel(i) for i in range(n)]
  if kind == "t5":
    out["encoder/relpos_bias/rel_embedding"] = rel(0)
  if not scanned:
    for name, values in per_layer.items():
      for i, v in enumerate(values):
        out[f"encoder/layers_{i}/{name}"] = v
    return out
  # Scanned (flaxformer / released UMT5): layer axis second; attention kernels split heads.
  for name, values in per_layer.items():
    if name.endswith(("query/kernel", "key/kernel", "value/kernel")):
      values = [v.reshape(v.shape[0], h, dk) for v in values]  # [D, H, dk]
    elif name.endswith("out/kernel"):
      values = [v.reshape(h, dk, v.shape[1]) for v in values]  # [H, dk, D]
    out[f"encoder/encoder/{name}"] = np.stack(values, axis=1)
  return out


def _write_t5x(directory, target: dict[str, np.ndarray], bf16=(), inline=()):
  """A T5X checkpoint: zarr arrays + msgpack {'version': 3, 'optimizer': {...}}."""
  os.makedirs(directory)
  tree = {}
  for name, value in target.items():
    dotted = "target." + name.replace("/", ".")
    if name in inline:  # small arrays live in the msgpack itself
      leaf = np.asarray(value)
    else:
      dtype = "bfloat16" if name in bf16 else "float32"
      metadata = {"compressor": {"id": "gzip"}, "shape": list(value.shape),
                  "chunks": list(value.shape)}
      spec = {"driver": "zarr", "dtype": dtype, "metadata": metadata,
              "kvstore": {"driver": "file", "path": os.path.join(str(directory), dotted)}}
      store = ts.open(spec, create=True).result()
      store.write(np.asarray(value).astype(store.dtype.numpy_dtype)).result()
      spec["kvstore"] = ({"driver": "gcs", "bucket": "t5x-dummy-bucket", "path": dotted}
                         if name.endswith("encoder_norm/scale") else
                         {"driver": "file", "path": dotted})  # relative, as T5X writes
      leaf = spec
    node = tree
    for part in name.split("/")[:-1]:
      node = node.setdefault(part, {})
    node[name.split("/")[-1]] = leaf
  state = {"step": np.asarray(1000, np.int32),
           "param_states": {"encoder": {"encoder_norm": {"scale": {"v": np.ones(32, np.float32)}}}}}
  payload = {"version": 3, "optimizer": {"target": tree, "state": state}}
  with open(os.path.join(directory, "checkpoint"), "wb") as f:
    f.write(serialization.msgpack_serialize(payload))


@pytest.mark.parametrize("scanned", [False, True], ids=["layers_i", "scanned"])
def test_t5x_checkpoint_matches_hf(hf, tmp_path, scanned):
  kind, model, directory, refs = hf
  config, from_hf = ck.load_hf(directory)
  target = _t5x_target(model, kind, scanned)
  names = sorted(target)
  _write_t5x(tmp_path / "checkpoint_1000", target, bf16=set(names[::2]),
             inline={n for n in names if n.endswith("pre_mlp_layer_norm/scale")})
  encoder = ck.load_t5x(str(tmp_path / "checkpoint_1000"), config)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               nnx.state(from_hf, nnx.Param), nnx.state(encoder, nnx.Param))
  _assert_matches(encoder, refs)


def test_t5x_missing_or_misshapen_tensor_is_named(hf, tmp_path):
  kind, model, directory, _ = hf
  config, _ = ck.load_hf(directory)
  target = _t5x_target(model, kind, scanned=False)
  gone = "encoder/layers_1/mlp/wo/kernel"
  _write_t5x(tmp_path / "a", {k: v for k, v in target.items() if k != gone})
  with pytest.raises(ValueError, match=rf"missing tensor '{gone}' \(expected shape \(64, 32\)\)"):
    ck.load_t5x(str(tmp_path / "a"), config)
  _write_t5x(tmp_path / "b", {**target, gone: target[gone][:, :30]})
  with pytest.raises(ValueError, match=r"has shape \(64, 30\); expected shape \(64, 32\)"):
    ck.load_t5x(str(tmp_path / "b"), config)
  with pytest.raises(FileNotFoundError, match="not a T5X checkpoint"):
    ck.load_t5x(str(tmp_path), config)


# --- sharding, scan, remat, dtype --------------------------------------------------------


def test_sharded_encoder_equals_one_device(hf):
  """T5 under the "fsdp" preset on a (2, 2, 2) mesh, UMT5 under "tensor" on (1, 2, 4)."""
  kind, _, directory, refs = hf
  preset, ici = {"t5": ("fsdp", (2, 2, 2)), "umt5": ("tensor", (1, 2, 4))}[kind]
  mesh = M.make_mesh(ici)
  _, encoder = ck.load_hf(directory, shardings=lambda s: M.param_shardings(s, mesh, preset))
  for w in (encoder.layers.mlp.wi_0.kernel[...], encoder.layers.attention.o.kernel[...]):
    assert len(w.sharding.device_set) == 8 and w.sharding.spec != M.P()
    assert w.addressable_shards[0].data.size < w.size  # really split, not replicated
  (ids, mask), ref = _inputs()[1], refs[1]
  valid = mask.astype(bool)
  np.testing.assert_allclose(_apply(encoder, ids, mask)[valid], ref[valid], **TOL)


def test_scan_unrolled_remat_and_bf16(hf):
  kind, _, directory, refs = hf
  _, scanned = ck.load_hf(directory)
  ids, mask = _inputs()[1]
  valid = mask.astype(bool)
  want = _apply(scanned, ids, mask)
  for overrides in (dict(scan_layers=False), dict(remat=True)):
    _, other = ck.load_hf(directory, **overrides)
    np.testing.assert_allclose(_apply(other, ids, mask)[valid], want[valid], atol=1e-6, rtol=0)
  _, half = ck.load_hf(directory, dtype="bfloat16")
  err = np.abs(_apply(half, ids, mask) - want)[valid]
  assert 0 < err.max() < 0.1 * np.abs(want).max(), err.max()  # bf16 ran, and is close


def test_encode_zeroes_padding():
  config = T5Config.preset("tiny")
  rng = np.random.RandomState(0)
  weights = {k: 0.3 * rng.normal(size=v) for k, v in ck.expected_shapes(config).items()}
  graphdef, state = nnx.split(ck.build_encoder(config, weights))
  run = jax.jit(lambda i, m: encode(nnx.merge(graphdef, state), i, m))
  ids, mask = _inputs()[1]
  emb, out_mask = map(np.asarray, run(ids, mask))
  assert emb.dtype == np.float32 and emb.shape == (2, 40, 32)
  np.testing.assert_array_equal(out_mask, mask.astype(bool))
  assert np.all(emb[1, 25:] == 0) and np.all(np.abs(emb[1, :25]).sum(-1) > 0)
  # Padding is masked as keys: changing padded tokens does not change the valid outputs.
  ids2 = ids.copy()
  ids2[1, 25:] = 7
  emb2 = np.asarray(run(ids2, mask)[0])
  np.testing.assert_allclose(emb2[1, :25], emb[1, :25], atol=1e-6)


# --- config and buckets ------------------------------------------------------------------


def test_relative_position_buckets_match_transformers():
  """T5's default 32 buckets / distance 128 at L=300, incl. exact log boundaries 16, 32, 64."""
  from transformers.models.t5.modeling_t5 import T5Attention
  n = 300
  rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
  for buckets, distance in ((32, 128), (8, 16), (32, 256)):
    want = T5Attention._relative_position_bucket(rel, True, buckets, distance).numpy()
    np.testing.assert_array_equal(relative_position_buckets(n, n, buckets, distance), want)


def test_config_presets_and_from_hf():
  xxl = T5Config.preset("xxl")
  assert (xxl.d_model, xxl.num_heads, xxl.num_layers, xxl.d_ff, xxl.d_kv) == (4096, 64, 24,
                                                                             10240, 64)
  small = T5Config.preset("small")
  assert (small.d_model, small.num_heads, small.num_layers, small.d_ff) == (512, 6, 8, 1024)
  umt5 = T5Config.from_hf(transformers.UMT5Config(**TINY).to_dict())
  assert umt5.per_layer_position_bias and umt5.dense_act_fn == "gelu_new"
  assert not T5Config.from_hf(transformers.T5Config(**TINY).to_dict()).per_layer_position_bias
  with pytest.raises(ValueError, match="non-gated"):
    T5Config.from_hf({**TINY, "feed_forward_proj": "relu"})
  with pytest.raises(ValueError, match="dtype"):
    T5Config.preset("tiny", dtype="float16")
  # Stacked layer params carry a leading None axis; every name is in the mesh contract.
  shapes = ck.expected_shapes(xxl)
  assert shapes["layers/mlp/wi_0/kernel"] == (24, 4096, 10240)
  abstract = nnx.eval_shape(lambda: T5Encoder(T5Config.preset("tiny"), rngs=nnx.Rngs(0)))
  for _, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    names = var.get_metadata()["out_sharding"]
    assert len(names) == var.get_value().ndim
    assert all(n is None or n in M.PARAM_NAMES for n in names)
