"""Building blocks shared by the U-Nets (VDM score U-Net, ADM U-Net, Imagen's Efficient U-Net).

Logical axis names (the contract that the mesh rules in `launch/` map to mesh axes)
---------------------------------------------------------------------------------
Every parameter is created through `partitioned(init, names)` and carries one of these
logical partition specs; no other names are used:

  conv kernel  [kh, kw, in, out]       (None, None, "conv_in", "conv_out")
  conv bias    [out]                   ("conv_out",)
  dense kernel [in, out], expansion    ("embed", "mlp")   e.g. time-MLP first layer,
                                                           embedding -> block projection
  dense kernel [in, out], projection   ("mlp", "embed")   back into the embedding width
  attention q/k/v kernel [C, heads*d]  ("embed", "heads")
  attention out kernel   [heads*d, C]  ("heads", "embed")
  dense bias   [out]                   (<the kernel's output name>,)
  norm scale / bias [C]                ("norm",)
  embedding table [vocab, dim]         ("vocab", "embed")

`LOGICAL_AXES` lists the names. No spec repeats a name, so any rule set that maps each
name to at most one mesh axis gives a valid PartitionSpec.

Parameters are created with `eager_sharding=False`: building a module needs no mesh, and
sharding is applied by the caller (`nnx.get_partition_spec(state)` under logical-axis rules,
then a jitted init with those out_shardings), as shared/DESIGN.md prescribes. Activations
are named at block boundaries (a ResBlock's input, embedding and output, an attention
block's and a resampling's output) through `vdm.nets.sharding.constrain`, the identity
unless the launch side activates a hook with its mesh (that module says why FSDP needs
it); between those points XLA propagates shardings under a mesh with Auto axis types. With
Explicit axes a dot over a sharded contracting dimension fails (it would need an
out_sharding), so use Auto axes for these nets.

Dtypes: parameters are float32 (`param_dtype`); convs, dense layers and attention compute
in `dtype` (e.g. bfloat16); group norms, embeddings of scalars and attention softmax are
computed in float32.
"""

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vdm.nets import sharding
from vdm.nets.sharding import IMAGE

LOGICAL_AXES = ("conv_in", "conv_out", "embed", "mlp", "heads", "norm", "vocab")

CONV_KERNEL = (None, None, "conv_in", "conv_out")
EXPAND = ("embed", "mlp")
PROJECT = ("mlp", "embed")
ATTN_QKV = ("embed", "heads")
ATTN_OUT = ("heads", "embed")
NORM = ("norm",)
VOCAB = ("vocab", "embed")

default_kernel_init = nnx.initializers.lecun_normal()
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def partitioned(init, names: Sequence[str | None]):
  """Wraps an initializer so the created Param carries logical axis `names`."""
  for n in names:
    if n is not None and n not in LOGICAL_AXES:
      raise ValueError(f"logical axis name {n!r} is not in the contract {LOGICAL_AXES}")
  return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def split_key(key: jax.Array | None, n: int) -> list[jax.Array | None]:
  """n independent keys from `key`, or n Nones when `key` is None (deterministic)."""
  if key is None:
    return [None] * n
  return list(jax.random.split(key, n))


# --- parameterized layers ------------------------------------------------------------------


def conv(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, *, zero_init=False,
         dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
  """A 'SAME'-padded NHWC conv with kernel (None, None, conv_in, conv_out)."""
  return nnx.Conv(
      in_ch, out_ch, (kernel, kernel), strides=stride, padding="SAME",
      dtype=dtype, param_dtype=jnp.float32,
      kernel_init=partitioned(zeros if zero_init else default_kernel_init, CONV_KERNEL),
      bias_init=partitioned(zeros, ("conv_out",)), rngs=rngs)


def dense(in_dim: int, out_dim: int, names=EXPAND, *, zero_init=False, use_bias=True,
          dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
  """A dense layer whose kernel carries `names` (EXPAND, PROJECT, ATTN_QKV or ATTN_OUT)."""
  return nnx.Linear(
      in_dim, out_dim, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=partitioned(zeros if zero_init else default_kernel_init, names),
      bias_init=partitioned(zeros, (names[1],)), rngs=rngs)


def num_groups(channels: int, max_groups: int = 32) -> int:
  """Group count for GroupNorm: 32 as in VDM/ADM when channels allow, else fewer.

  The largest divisor of `channels` that is <= max_groups and leaves >= 2 channels per
  group. One channel per group would subtract any per-channel constant, so an embedding
  added before the norm (VDM's ResNet block) would be cancelled exactly in narrow nets.
  """
  fits = [g for g in range(1, min(max_groups, channels // 2) + 1) if channels % g == 0]
  return max(fits, default=1)


class GroupNorm(nnx.Module):
  """GroupNorm over (H, W, channels-in-group) per example, computed in float32.

  Statistics never mix examples of a batch. The output is cast back to the input dtype.
  """

  def __init__(self, channels: int, *, groups: int | None = None, epsilon: float = 1e-6,
               rngs: nnx.Rngs):
    groups = num_groups(channels) if groups is None else groups
    if channels % groups:
      raise ValueError(f"GroupNorm: {channels} channels do not split into {groups} groups; "
                       "pick a channel count divisible by the group count")
    self.norm = nnx.GroupNorm(
        channels, num_groups=groups, epsilon=epsilon, dtype=jnp.float32,
        param_dtype=jnp.float32, use_fast_variance=False,
        scale_init=partitioned(ones, NORM), bias_init=partitioned(zeros, NORM), rngs=rngs)

  def __call__(self, x):
    return self.norm(x.astype(jnp.float32)).astype(x.dtype)


# --- parameter-free features ---------------------------------------------------------------


def sinusoidal_embedding(x: jax.Array, dim: int, max_period: float = 10_000.) -> jax.Array:
  """Sinusoidal embedding of a scalar per example (Transformer / Fairseq, as in VDM & ADM).

  For x of shape [B]: emb[:, i] = sin(x * f_i), emb[:, half + i] = cos(x * f_i) with
  f_i = max_period^(-i / (half - 1)), half = dim // 2; zero-padded if dim is odd. Callers
  scale x first (VDM and ADM feed a [0, 1] time times 1000). Computed in float32.
  """
  if x.ndim != 1:
    raise ValueError(f"sinusoidal_embedding expects shape [B], got {x.shape}")
  half = dim // 2
  if half < 2:
    raise ValueError(f"sinusoidal_embedding needs dim >= 4, got {dim}")
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
  args = x.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def fourier_features(z: jax.Array, exponents: Sequence[int]) -> jax.Array:
  """Base-2 Fourier features of the input (VDM, Kingma et al. 2021, appendix C).

  For each input channel c and exponent n (in the order given), the angle is
  a[..., c * N + k] = 2 * pi * 2^(n_k) * z[..., c]   (N = len(exponents)),
  and the output is concat([sin(a), cos(a)], -1), 2 * C * N channels. This matches the
  released VDM code (`Base2FourierFeatures`, frequencies 2^n * 2 pi); the paper's text
  writes sin(2^n pi z), i.e. the same features with n shifted by one.
  """
  w = 2.0 * jnp.pi * 2.0 ** jnp.asarray(exponents, dtype=jnp.float32)
  a = z.astype(jnp.float32)[..., :, None] * w  # [..., C, N]
  a = a.reshape(*z.shape[:-1], z.shape[-1] * len(exponents))
  return jnp.concatenate([jnp.sin(a), jnp.cos(a)], axis=-1).astype(z.dtype)


def avg_pool2(x):
  """2x2 average pooling with stride 2 (NHWC)."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def nearest_upsample2(x):
  """Nearest-neighbour upsampling by 2 (NHWC)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


# --- blocks --------------------------------------------------------------------------------


class EmbeddingMLP(nnx.Module):
  """Dense -> swish -> Dense: sinusoidal features to the conditioning embedding (ADM)."""

  def __init__(self, in_dim: int, emb_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.dense0 = dense(in_dim, emb_dim, EXPAND, dtype=dtype, rngs=rngs)
    self.dense1 = dense(emb_dim, emb_dim, PROJECT, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.dense1(jax.nn.swish(self.dense0(x)))


class GuidanceEmbedding(nnx.Module):
  """Embedding of the guidance weight w for a w-conditioned student (Meng et al. 2023, "On
  Distillation of Guided Diffusion Models", sec. 3.1: w gets a Fourier embedding and enters
  the net like the time step).

    emb_w = Dense_1(swish(Dense_0(sinusoidal(w_scale * w, feature_dim))))

  added to the time embedding. Dense_1 (kernel and bias) is zero-initialised, so emb_w = 0
  for every w at init: a student that takes every other weight from its teacher outputs
  exactly what the teacher outputs. w_scale = 100 maps the usual w in [0, 10] onto the
  argument range [0, 1000] that the time input spans (1000 t_in).
  """

  def __init__(self, feature_dim: int, emb_dim: int, *, w_scale: float = 100.,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.feature_dim, self.w_scale, self.dtype = feature_dim, w_scale, dtype
    self.dense0 = dense(feature_dim, emb_dim, EXPAND, dtype=dtype, rngs=rngs)
    self.dense1 = dense(emb_dim, emb_dim, PROJECT, zero_init=True, dtype=dtype, rngs=rngs)

  def __call__(self, cond: dict, batch: int, name: str):
    """The [B, emb_dim] embedding of cond["guidance_w"] (float [B], or a scalar for all)."""
    if "guidance_w" not in cond:
      raise ValueError(f"{name} was built with guidance_embedding=True: pass "
                       f"cond['guidance_w'] (float [B], the guidance weight w the student "
                       f"imitates; 0 for the conditional teacher)")
    w = jnp.asarray(cond["guidance_w"])
    if not jnp.issubdtype(w.dtype, jnp.floating) and not jnp.issubdtype(w.dtype, jnp.integer):
      raise ValueError(f"cond['guidance_w'] must be a float array [B], got dtype {w.dtype}")
    w = w.astype(jnp.float32)
    w = jnp.broadcast_to(w, (batch,)) if w.ndim == 0 else w
    if w.shape != (batch,):
      raise ValueError(f"cond['guidance_w'] must have shape [B]=[{batch}] (or be a scalar), "
                       f"got {list(w.shape)}")
    feats = sinusoidal_embedding(self.w_scale * w, self.feature_dim).astype(self.dtype)
    return self.dense1(jax.nn.swish(self.dense0(feats)))


class ClassEmbedding(nnx.Module):
  """Learned class embedding with an extra null class for classifier-free guidance.

  Rows 0..num_classes-1 are the classes, row num_classes is "no label"; the label -1 also
  selects the null row. Labels outside [-1, num_classes] give NaN (take with fill), so a bad
  label cannot pass silently.
  """

  def __init__(self, num_classes: int, dim: int, *, rngs: nnx.Rngs):
    if num_classes < 1:
      raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    self.num_classes = num_classes
    init = partitioned(nnx.initializers.normal(1.0), VOCAB)
    self.table = nnx.Param(init(rngs.params(), (num_classes + 1, dim), jnp.float32))

  def null_labels(self, batch: int):
    return jnp.full((batch,), self.num_classes, jnp.int32)

  def __call__(self, label, batch: int):
    label = jnp.asarray(label)
    if not jnp.issubdtype(label.dtype, jnp.integer) or label.shape != (batch,):
      raise ValueError(f"cond['label'] must be an integer array of shape [B]=[{batch}], got "
                       f"{label.dtype}{list(label.shape)}")
    # -1 -> the null row; other negatives -> an out-of-bounds row (they would otherwise
    # wrap around to a real class).
    idx = jnp.where(label == -1, self.num_classes, label)
    idx = jnp.where(idx < 0, self.num_classes + 1, idx)
    return jnp.take(self.table[...], idx, axis=0, mode="fill", fill_value=jnp.nan)


class ResBlock(nnx.Module):
  """Residual conv block conditioned on an embedding (VDM `ResnetBlock` / ADM `ResBlock`).

    h = conv1(swish(norm1(x)))
    additive (VDM):        h = swish(norm2(h + Dense(swish(emb))))
    adaptive (ADM AdaGN):  scale, shift = Dense(swish(emb))
                           h = swish(norm2(h) (1 + scale) + shift)
    out = skip(x) + conv2(dropout(h))      conv2 zero-initialised: the block starts as identity

  skip is the identity, or a 1x1 conv when in_ch != out_ch. Unlike VDM's code the embedding
  projection has a bias and a default (non-zero) init, as in ADM; with conv2 at zero the
  block still starts as the identity.
  """

  def __init__(self, in_ch: int, out_ch: int, emb_dim: int | None, *, dropout: float = 0.0,
               adaptive_norm: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
    self.adaptive_norm = adaptive_norm
    self.norm1 = GroupNorm(in_ch, rngs=rngs)
    self.conv1 = conv(in_ch, out_ch, dtype=dtype, rngs=rngs)
    width = 2 * out_ch if adaptive_norm else out_ch
    self.emb_proj = (dense(emb_dim, width, EXPAND, dtype=dtype, rngs=rngs)
                     if emb_dim is not None else None)
    self.norm2 = GroupNorm(out_ch, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)
    self.conv2 = conv(out_ch, out_ch, zero_init=True, dtype=dtype, rngs=rngs)
    self.skip = conv(in_ch, out_ch, 1, dtype=dtype, rngs=rngs) if in_ch != out_ch else None

  def __call__(self, x, emb=None, *, dropout_key=None):
    x = sharding.constrain(x, IMAGE)
    h = self.conv1(jax.nn.swish(self.norm1(x)))
    if self.emb_proj is not None:
      if emb is None:
        raise ValueError("this ResBlock was built with emb_dim; pass an embedding")
      emb = sharding.constrain(emb, sharding.VECTOR)
      e = self.emb_proj(jax.nn.swish(emb))[:, None, None, :]
      if self.adaptive_norm:
        scale, shift = jnp.split(e, 2, axis=-1)
        h = self.norm2(h) * (1 + scale) + shift
      else:
        h = self.norm2(h + e)
    else:
      h = self.norm2(h)
    h = jax.nn.swish(h)
    h = self.dropout(h, deterministic=dropout_key is None, rngs=dropout_key)
    h = self.conv2(h)
    skip = x if self.skip is None else self.skip(x)
    return sharding.constrain(skip + h, IMAGE)


class AttentionBlock(nnx.Module):
  """Multi-head self-attention over the H*W positions, residual, zero-init output.

  out = x + W_o MHA(W_q n, W_k n, W_v n), n = GroupNorm(x); logits and softmax in float32.
  """

  def __init__(self, channels: int, *, num_heads: int = 1, dtype=jnp.float32,
               rngs: nnx.Rngs):
    if channels % num_heads:
      raise ValueError(f"AttentionBlock: {channels} channels not divisible by "
                       f"num_heads={num_heads}")
    self.num_heads = num_heads
    self.norm = GroupNorm(channels, rngs=rngs)
    self.q = dense(channels, channels, ATTN_QKV, dtype=dtype, rngs=rngs)
    self.k = dense(channels, channels, ATTN_QKV, dtype=dtype, rngs=rngs)
    self.v = dense(channels, channels, ATTN_QKV, dtype=dtype, rngs=rngs)
    self.out = dense(channels, channels, ATTN_OUT, zero_init=True, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    b, hh, ww, c = x.shape
    n = self.norm(x).reshape(b, hh * ww, c)
    heads = lambda t: t.reshape(b, hh * ww, self.num_heads, c // self.num_heads)
    a = jax.nn.dot_product_attention(heads(self.q(n)), heads(self.k(n)), heads(self.v(n)))
    return sharding.constrain(x + self.out(a.reshape(b, hh * ww, c)).reshape(b, hh, ww, c),
                              IMAGE)


class Downsample(nnx.Module):
  """Halves H and W: a stride-2 3x3 conv (with_conv) or 2x2 average pooling."""

  def __init__(self, channels: int, *, with_conv: bool = True, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, 2, dtype=dtype, rngs=rngs) if with_conv else None

  def __call__(self, x):
    if x.shape[1] % 2 or x.shape[2] % 2:
      raise ValueError(f"Downsample needs even H and W, got {x.shape[1:3]}")
    return sharding.constrain(avg_pool2(x) if self.conv is None else self.conv(x), IMAGE)


class Upsample(nnx.Module):
  """Doubles H and W: nearest-neighbour upsampling, then a 3x3 conv if with_conv."""

  def __init__(self, channels: int, *, with_conv: bool = True, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.conv = conv(channels, channels, dtype=dtype, rngs=rngs) if with_conv else None

  def __call__(self, x):
    x = nearest_upsample2(x)
    return sharding.constrain(x if self.conv is None else self.conv(x), IMAGE)


def check_inputs(z, logsnr, channels: int, name: str):
  """Validates the shared network inputs; returns logsnr as float32 of shape [B]."""
  if z.ndim != 4:
    raise ValueError(f"{name}: z must be NHWC [B, H, W, C], got shape {z.shape}")
  if z.shape[-1] != channels:
    raise ValueError(f"{name}: z has {z.shape[-1]} channels but the net was built for "
                     f"channels={channels}")
  logsnr = jnp.asarray(logsnr, jnp.float32)
  if logsnr.ndim == 0:
    logsnr = jnp.broadcast_to(logsnr, z.shape[:1])
  if logsnr.shape != z.shape[:1]:
    raise ValueError(f"{name}: logsnr must have shape [B]={z.shape[:1]}, got {logsnr.shape}")
  return logsnr


# Constructor options, common to every net, that make it accept a cond key.
_COND_KEY_OPTIONS = {"label": "num_classes", "guidance_w": "guidance_embedding=True"}


def check_cond_keys(cond, allowed: Sequence[str], name: str) -> dict:
  """Returns cond as a dict; unknown keys are an error (never ignore conditioning)."""
  cond = {} if cond is None else dict(cond)
  unknown = sorted(set(cond) - set(allowed))
  if unknown:
    needs = [f"{k!r} needs {_COND_KEY_OPTIONS[k]}" for k in unknown if k in _COND_KEY_OPTIONS]
    if len(needs) < len(unknown):
      needs.append("check its constructor options")
    hint = "; ".join(needs)
    raise ValueError(f"{name}: unsupported cond keys {unknown}; this net accepts "
                     f"{sorted(allowed)} ({hint})")
  return cond
