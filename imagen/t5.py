"""T5 v1.1 / UMT5 text encoder in Flax NNX (the text conditioning of Imagen).

Imagen (Saharia et al. 2022, sec. 2.1) conditions its diffusion models on the frozen
encoder of T5 v1.1 XXL. This module is that encoder, written to load the released weights
(`imagen/t5_checkpoints.py`: Hugging Face safetensors and T5X checkpoints) and reproduce
their hidden states:

  h_0   = E[input_ids]                                  token embedding, no scaling
  for each layer l (pre-norm residual blocks):
    h   = h + Attn_l(RMSNorm(h))                          no 1/sqrt(d_kv): T5 folds it into
                                                          the init of W_q (Raffel et al. 2020)
    h   = h + W_o (act(W_i0 x) * (W_i1 x)), x = RMSNorm(h)  gated-GELU FFN of v1.1
                                                          (Shazeer 2020, "GLU variants")
  out   = RMSNorm(h)                                    final norm

  logits[b, h, i, j] = q_i . k_j + B[h, bucket(j - i)] + (0 if j is a token else -1e9)

RMSNorm is T5's LayerNorm: x / sqrt(mean(x^2) + eps) * scale, with no mean subtraction and
no bias, always computed in float32. B is the learned relative position bias, indexed by
T5's bidirectional log-spaced buckets (`relative_position_buckets`). T5 v1.1 learns one
table, owned by layer 0 and shared by all layers; UMT5 (Chung et al. 2023) learns one per
layer (`per_layer_position_bias=True`).

Parameters are float32 and carry logical axis names (vdm/nets/layers.py, launch/mesh.py):
  token embedding [vocab, d_model]              ("vocab", "embed")
  q / k / v kernel [d_model, heads * d_kv]      ("embed", "heads")
  o kernel         [heads * d_kv, d_model]      ("heads", "embed")
  wi_0 / wi_1      [d_model, d_ff]              ("embed", "mlp")
  wo               [d_ff, d_model]              ("mlp", "embed")
  norm scales      [d_model]                    ("norm",)
  relative bias    [num_buckets, heads]         (None, "heads")
The layers are created once with `nnx.vmap` (`vdm.nets.stack.stacked`), so every layer
parameter is stacked with a leading [num_layers] axis whose logical name is None
(replicated: a layer's weights are sharded within the layer, not across layers).
`scan_layers=True` runs them with `jax.lax.scan` over the stacked state (one compiled layer
body: fast compiles for the 24-layer XXL); `scan_layers=False` unrolls a Python loop over
the same stacked parameters, so both modes share one checkpoint layout
(`stack.run_stacked`). `remat` wraps the layer in `jax.checkpoint`.

`dtype` is the compute dtype of the matmuls ("bfloat16" on accelerators); the residual
stream, norms, softmax and the output stay float32.
"""

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vdm.nets import stack
from vdm.nets.layers import partitioned

EMBED = ("vocab", "embed")
QKV = ("embed", "heads")
OUT = ("heads", "embed")
EXPAND = ("embed", "mlp")
PROJECT = ("mlp", "embed")
NORM = ("norm",)
REL_BIAS = (None, "heads")

# FFN activations of T5-family checkpoints ("gelu_new" is the tanh approximation of GELU,
# the one T5 v1.1, mT5, UMT5 and Flan-T5 use).
ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}
DTYPES = ("float32", "bfloat16")
MASK_BIAS = -1e9  # added to the logits of padded keys; finite so all-padding rows stay finite


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Shape and numerics of a T5 v1.1-style encoder (field names follow HF's T5Config)."""
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 1024
  num_layers: int = 8
  num_heads: int = 6
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dense_act_fn: str = "gelu_new"  # gated: act(wi_0 x) * wi_1 x
  per_layer_position_bias: bool = False  # True for UMT5
  scan_layers: bool = True
  remat: bool = False
  dtype: str = "float32"  # compute dtype; parameters stay float32

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"T5Config.{name} must be >= 1, got {getattr(self, name)}")
    if self.dense_act_fn not in ACTIVATIONS:
      raise ValueError(f"T5Config.dense_act_fn={self.dense_act_fn!r} is not supported; choose "
                       f"one of {sorted(ACTIVATIONS)} (T5 v1.1 uses 'gelu_new').")
    if self.dtype not in DTYPES:
      raise ValueError(f"T5Config.dtype={self.dtype!r}; choose one of {DTYPES}.")
    half = self.relative_attention_num_buckets // 2
    if half < 2 or self.relative_attention_max_distance <= half // 2:
      raise ValueError(
          f"relative_attention_num_buckets={self.relative_attention_num_buckets} and "
          f"relative_attention_max_distance={self.relative_attention_max_distance}: need at "
          "least 4 buckets and max_distance > num_buckets // 4 (T5 uses 32 and 128).")

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  @classmethod
  def preset(cls, name: str, **overrides) -> "T5Config":
    """T5 v1.1 sizes ("small" ... "xxl"), or "tiny": a random-weight model for offline tests.

    Sizes from the released T5 v1.1 configs (google/t5-v1_1-*). "tiny" matches no
    checkpoint; it only exercises the code path.
    """
    if name not in PRESETS:
      raise ValueError(f"unknown T5 preset {name!r}; choose one of {sorted(PRESETS)}.")
    return cls(**{**PRESETS[name], **overrides})

  @classmethod
  def from_hf(cls, config: Mapping[str, Any], **overrides) -> "T5Config":
    """Reads a Hugging Face T5 / mT5 / UMT5 `config.json` dict (encoder side)."""
    proj = config.get("feed_forward_proj", "relu")
    gated, _, act = proj.rpartition("-")
    if gated != "gated":
      raise ValueError(
          f"feed_forward_proj={proj!r}: only gated FFNs (T5 v1.1, mT5, UMT5, Flan-T5: "
          "'gated-gelu') are supported; the original T5 (v1.0) uses a non-gated ReLU FFN.")
    act = "gelu_new" if act == "gelu" else act  # as HF: "gated-gelu" means the tanh GELU
    missing = [k for k in ("d_model", "d_kv", "d_ff", "num_layers", "num_heads")
               if k not in config]
    if missing:
      raise ValueError(f"config.json lacks {missing}; is this a T5 config?")
    fields = dict(
        vocab_size=config.get("vocab_size", 32128), d_model=config["d_model"],
        d_kv=config["d_kv"], d_ff=config["d_ff"], num_layers=config["num_layers"],
        num_heads=config["num_heads"],
        relative_attention_num_buckets=config.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=config.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=config.get("layer_norm_epsilon", 1e-6), dense_act_fn=act,
        per_layer_position_bias=config.get("model_type") == "umt5")
    return cls(**{**fields, **overrides})


PRESETS = {
    "tiny": dict(vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    "small": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6),
    "base": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12),
    "large": dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16),
    "xl": dict(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32),
    "xxl": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
}


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """T5's bidirectional relative-position buckets, [q_len, k_len] int32 (static numpy).

  For relative position r = j - i (key minus query): half of the buckets are for r > 0,
  half for r <= 0. Within a half (n = |r|, H = num_buckets // 2, m = H // 2), n < m has its
  own bucket; m <= n is binned logarithmically up to max_distance:
    bucket = m + floor(log(n / m) / log(max_distance / m) * (H - m)), capped at H - 1
  (Raffel et al. 2020, sec. 2.1; mesh-tensorflow `_relative_position_bucket`). The floor is
  taken in float64 with a 1e-6 guard, so exact boundaries (n = 16, 32, 64 for 32 buckets and
  max distance 128) land in the upper bucket whatever the rounding of the log, as in the
  reference implementations (tests compare with transformers'). Computed from static shapes.
  """
  rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
  half = num_buckets // 2
  exact = half // 2
  n = np.abs(rel)
  log_bin = np.log(np.maximum(n, 1) / exact) / np.log(max_distance / exact) * (half - exact)
  large = np.minimum(exact + np.floor(log_bin + 1e-6).astype(np.int64), half - 1)
  return ((rel > 0) * half + np.where(n < exact, n, large)).astype(np.int32)


def _param(init, names, shape, rngs: nnx.Rngs) -> nnx.Param:
  return nnx.Param(partitioned(init, names)(rngs.params(), shape, jnp.float32))


def _linear(d_in: int, d_out: int, names, std: float, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  """A bias-free dense layer; `std` is T5X's init scale (only used for random weights)."""
  return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=partitioned(nnx.initializers.normal(std), names), rngs=rngs)


class RMSNorm(nnx.Module):
  """T5 LayerNorm: x * rsqrt(mean(x^2) + eps) * scale in float32 (no mean, no bias)."""

  def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = _param(nnx.initializers.ones_init(), NORM, (dim,), rngs)

  def __call__(self, x):
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return x * self.scale[...]


def position_bias(table: jax.Array, buckets: jax.Array) -> jax.Array:
  """Bias [heads, q, k] (float32) from a [num_buckets, heads] table and [q, k] buckets."""
  return jnp.transpose(jnp.take(table, buckets, axis=0), (2, 0, 1)).astype(jnp.float32)


class SelfAttention(nnx.Module):
  """Multi-head self-attention without logit scaling, plus relative position bias."""

  def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
    d, inner, dtype = config.d_model, config.inner_dim, jnp.dtype(config.dtype)
    self.num_heads, self.d_kv = config.num_heads, config.d_kv
    self.q = _linear(d, inner, QKV, (d * config.d_kv) ** -0.5, dtype, rngs)
    self.k = _linear(d, inner, QKV, d ** -0.5, dtype, rngs)
    self.v = _linear(d, inner, QKV, d ** -0.5, dtype, rngs)
    self.o = _linear(inner, d, OUT, inner ** -0.5, dtype, rngs)
    if config.per_layer_position_bias:  # UMT5: this layer's own table
      self.relative_bias = _param(nnx.initializers.normal(0.5), REL_BIAS,
                                  (config.relative_attention_num_buckets, config.num_heads),
                                  rngs)

  def __call__(self, x, mask_bias, shared_bias, buckets):
    """x [B, L, D] (compute dtype); mask_bias [B, 1, 1, L]; shared_bias [H, L, L] or None."""
    b, n, _ = x.shape
    split = lambda y: y.reshape(b, n, self.num_heads, self.d_kv)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    bias = (position_bias(self.relative_bias[...], buckets)
            if hasattr(self, "relative_bias") else shared_bias)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits + bias[None] + mask_bias, axis=-1).astype(x.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, -1)
    return self.o(out)


class GatedFFN(nnx.Module):
  """T5 v1.1 feed-forward: wo(act(wi_0 x) * wi_1 x), the activation in float32."""

  def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
    d, f, dtype = config.d_model, config.d_ff, jnp.dtype(config.dtype)
    self.act = ACTIVATIONS[config.dense_act_fn]
    self.wi_0 = _linear(d, f, EXPAND, d ** -0.5, dtype, rngs)
    self.wi_1 = _linear(d, f, EXPAND, d ** -0.5, dtype, rngs)
    self.wo = _linear(f, d, PROJECT, f ** -0.5, dtype, rngs)

  def __call__(self, x):
    gate = self.act(self.wi_0(x).astype(jnp.float32))
    return self.wo((gate * self.wi_1(x).astype(jnp.float32)).astype(x.dtype))


class T5Block(nnx.Module):
  """One pre-norm encoder layer on a float32 residual stream."""

  def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(config.dtype)
    eps = config.layer_norm_epsilon
    self.attention_norm = RMSNorm(config.d_model, eps, rngs=rngs)
    self.attention = SelfAttention(config, rngs=rngs)
    self.mlp_norm = RMSNorm(config.d_model, eps, rngs=rngs)
    self.mlp = GatedFFN(config, rngs=rngs)

  def __call__(self, h, mask_bias, shared_bias, buckets):
    x = self.attention_norm(h).astype(self.dtype)
    h = h + self.attention(x, mask_bias, shared_bias, buckets).astype(jnp.float32)
    x = self.mlp_norm(h).astype(self.dtype)
    return h + self.mlp(x).astype(jnp.float32)


class T5Encoder(nnx.Module):
  """The T5 v1.1 (or UMT5) encoder: token ids -> final-normed hidden states [B, L, D]."""

  def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
    self.config = config
    self.embedding = _param(nnx.initializers.normal(1.0), EMBED,
                            (config.vocab_size, config.d_model), rngs)
    if not config.per_layer_position_bias:  # T5 v1.1: one table (layer 0's), all layers
      self.relative_bias = _param(nnx.initializers.normal(0.5), REL_BIAS,
                                  (config.relative_attention_num_buckets, config.num_heads),
                                  rngs)
    self.layers = stack.stacked(lambda r: T5Block(config, rngs=r), config.num_layers, rngs)
    self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, rngs=rngs)

  def __call__(self, input_ids, attention_mask) -> jax.Array:
    """input_ids [B, L] int, attention_mask [B, L] (1/True = token, 0 = padding).

    Returns float32 [B, L, d_model]. Padded positions are excluded as keys; their own rows
    are computed but meaningless (`encode` zeroes them).
    """
    cfg = self.config
    input_ids = jnp.asarray(input_ids)
    attention_mask = jnp.asarray(attention_mask)
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
      raise ValueError(f"input_ids and attention_mask must both be [B, L]; got "
                       f"{input_ids.shape} and {attention_mask.shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    n = input_ids.shape[1]
    buckets = jnp.asarray(relative_position_buckets(
        n, n, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance))
    shared_bias = (None if cfg.per_layer_position_bias
                   else position_bias(self.relative_bias[...], buckets))
    mask_bias = jnp.where(attention_mask.astype(bool), 0.0, MASK_BIAS)[:, None, None, :]
    h = jnp.take(self.embedding[...], input_ids, axis=0)

    # remat: recompute activations in the backward pass (fine-tuning large encoders).
    layer = lambda block, h, _: (block(h, mask_bias, shared_bias, buckets), None)
    h, _ = stack.run_stacked(self.layers, layer, h, scan=cfg.scan_layers,
                             remat="block" if cfg.remat else "none")
    return self.final_norm(h)


def encode(encoder: T5Encoder, input_ids, attention_mask) -> tuple[jax.Array, jax.Array]:
  """(embeddings [B, L, D] float32 zeroed at padding, mask [B, L] bool)."""
  mask = jnp.asarray(attention_mask).astype(bool)
  emb = encoder(input_ids, mask)
  return jnp.where(mask[..., None], emb, 0.0), mask
