"""The layers that mix frames in the video U-Net (Ho et al. 2022, "Video Diffusion Models",
sec. 3): temporal attention with a relative position bias and a temporal convolution, and
which frames may meet (joint image-video training, sec. 3.2: an image's frames see only
themselves). Everything else in imagen/video_unet.py runs on one frame at a time.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from imagen import t5
from vdm.nets import layers

TEMPORAL_CONV_KERNEL = (None, "conv_in", "conv_out")
REL_BIAS = (None, "heads")


# --- which frames may meet -----------------------------------------------------------------


def frame_links(is_image, batch: int, frames: int) -> jax.Array:
  """[B, F, F] bool: frames q and k of an example may exchange information (Ho et al. 3.2).

  True on the diagonal, and between two video (not is_image) frames. is_image: None (all
  video), bool/int [B] (whole example) or [B, F] (per frame).
  """
  if is_image is None:
    return jnp.ones((batch, frames, frames), bool)
  flags = jnp.asarray(is_image)
  if not (jnp.issubdtype(flags.dtype, jnp.bool_) or jnp.issubdtype(flags.dtype, jnp.integer)):
    raise ValueError(f"cond['is_image'] must be bool or int (1 = independent image), got "
                     f"{flags.dtype}")
  if flags.shape == (batch,):
    flags = jnp.broadcast_to(flags[:, None], (batch, frames))
  if flags.shape != (batch, frames):
    raise ValueError(f"cond['is_image'] must have shape [B]=[{batch}] (whole examples) or "
                     f"[B, F]=[{batch}, {frames}] (per frame), got {list(flags.shape)}")
  video = ~flags.astype(bool)
  return (video[:, :, None] & video[:, None, :]) | jnp.eye(frames, dtype=bool)[None]


# --- temporal layers -----------------------------------------------------------------------


def temporal_attention(q, k, v, bias, links):
  """softmax(q k^T / sqrt(d) + bias; links) v over frames, per position and head.

  q, k, v [B, F, P, heads, d] (P positions); bias [heads, F, F]; links [B, F, F] bool
  (every row keeps its diagonal). Logits and softmax in float32; unlinked keys get
  probability exactly 0. Returns [B, F, P, heads, d].
  """
  logits = jnp.einsum("bqphd,bkphd->bphqk", q, k, preferred_element_type=jnp.float32)
  logits = logits / math.sqrt(q.shape[-1]) + bias[None, None]
  logits = jnp.where(links[:, None, None], logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bphqk,bkphd->bqphd", weights.astype(v.dtype), v)


class TemporalAttention(nnx.Module):
  """Residual multi-head attention over frames at every position, zero-init output.

  out = x + W_o Attn(W_q n, W_k n, W_v n; B[h, bucket(k - q)], links), n = GroupNorm(x)
  per frame. x is [B * F, H, W, C] (frames folded into the batch, frame-minor).
  """

  def __init__(self, channels: int, *, num_heads: int, num_buckets: int, max_distance: int,
               bias_init_std: float = 0.0, dtype=jnp.float32, rngs: nnx.Rngs):
    self.num_heads, self.num_buckets, self.max_distance = num_heads, num_buckets, max_distance
    self.norm = layers.GroupNorm(channels, rngs=rngs)
    self.q = layers.dense(channels, channels, layers.ATTN_QKV, dtype=dtype, rngs=rngs)
    self.k = layers.dense(channels, channels, layers.ATTN_QKV, dtype=dtype, rngs=rngs)
    self.v = layers.dense(channels, channels, layers.ATTN_QKV, dtype=dtype, rngs=rngs)
    self.out = layers.dense(channels, channels, layers.ATTN_OUT, zero_init=True, dtype=dtype,
                            rngs=rngs)
    init = layers.partitioned(nnx.initializers.normal(bias_init_std) if bias_init_std
                              else layers.zeros, REL_BIAS)
    self.rel_bias = nnx.Param(init(rngs.params(), (num_buckets, num_heads), jnp.float32))

  def position_bias(self, frames: int) -> jax.Array:
    """[heads, F, F] float32: B[h, bucket(k - q)] (T5 buckets, static for a given F)."""
    buckets = t5.relative_position_buckets(frames, frames, self.num_buckets,
                                           self.max_distance)
    return t5.position_bias(self.rel_bias[...], jnp.asarray(buckets))

  def __call__(self, x, links):
    b, f = links.shape[:2]
    _, hh, ww, c = x.shape
    n = self.norm(x).reshape(b, f, hh * ww, c)
    heads = lambda t: t.reshape(b, f, hh * ww, self.num_heads, c // self.num_heads)
    a = temporal_attention(heads(self.q(n)), heads(self.k(n)), heads(self.v(n)),
                           self.position_bias(f), links)
    return x + self.out(a.reshape(b, f, hh * ww, c)).reshape(x.shape)


class TemporalConv(nnx.Module):
  """Residual kernel-3 convolution over frames: out = x + Conv_t(swish(GroupNorm(x))).

  Conv_t(n)_q = W[1] n_q + bias + W[0] n_(q-1) + W[2] n_(q+1) (a 'SAME' 1D convolution over
  frames, zero beyond the clip), the side taps only where `links` joins q to its neighbour.
  The kernel starts at zero (the block starts as the identity, as Make-A-Video and Imagen
  Video start their temporal convolutions).
  """

  def __init__(self, channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.norm = layers.GroupNorm(channels, rngs=rngs)
    init = layers.partitioned(layers.zeros, TEMPORAL_CONV_KERNEL)
    self.kernel = nnx.Param(init(rngs.params(), (3, channels, channels), jnp.float32))
    self.bias = nnx.Param(layers.partitioned(layers.zeros, ("conv_out",))(
        rngs.params(), (channels,), jnp.float32))

  def __call__(self, x, links):
    b, f = links.shape[:2]
    n = jax.nn.swish(self.norm(x)).astype(self.dtype).reshape((b, f) + x.shape[1:])
    w = self.kernel[...].astype(self.dtype)
    zero = jnp.zeros_like(n[:, :1])
    prev = jnp.concatenate([zero, n[:, :-1]], axis=1)   # prev[:, q] = n[:, q - 1]
    nxt = jnp.concatenate([n[:, 1:], zero], axis=1)     # nxt[:, q] = n[:, q + 1]
    no = jnp.zeros((b, 1), bool)
    use_prev = jnp.concatenate([no, jnp.diagonal(links, -1, 1, 2)], axis=1)  # link(q, q-1)
    use_next = jnp.concatenate([jnp.diagonal(links, 1, 1, 2), no], axis=1)   # link(q, q+1)
    side = lambda use, t, wk: jnp.where(use[:, :, None, None, None], t @ wk, 0.)
    y = (n @ w[1] + self.bias[...].astype(self.dtype) + side(use_prev, prev, w[0])
         + side(use_next, nxt, w[2]))
    return x + y.reshape(x.shape).astype(x.dtype)
