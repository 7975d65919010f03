"""Imagen's Efficient U-Net (Saharia et al. 2022, "Photorealistic Text-to-Image Diffusion
Models with Deep Language Understanding", appendix B.1 and figures A.27-A.31).

`EfficientUNet.__call__(z, logsnr, cond=None, *, dropout_key=None)` -> [B, H, W,
out_channels] (NHWC; out_channels = C unless set), the call signature of the other nets in
`vdm/nets`. The Efficient U-Net differs from the ADM U-Net (`vdm/nets/unet.py`) in three
ways (appendix B.1):
  * more ResBlocks at the low resolutions: `num_res_blocks` is given per level, e.g.
    (2, 4, 8, 8), which moves parameters to the cheap low-resolution levels;
  * skip connections scaled by 1/sqrt(2): every ResBlock returns (skip(x) + h) / sqrt(2)
    (as in SR3 and NCSN++'s `skip_rescale`), so the residual stream keeps its scale over
    the 8-block stacks;
  * in a down level the downsampling comes BEFORE that level's ResBlocks, and in an up
    level the upsampling comes AFTER its ResBlocks (the ADM order is the reverse), so the
    convolutions of a level run at that level's (lower) resolution.

Layout. Level i runs at image_size / 2^i with ch * ch_mult[i] channels.
  conv_in([z, lowres])                                    full resolution
  down level i: [Downsample if i > 0] -> num_res_blocks[i] ResBlocks
                -> [self-attention] -> [text cross-attention]       -> skip_i
  up level i (i = L-1 .. 0): [concat skip_i, except at the lowest level whose down
                output is h itself] -> num_res_blocks[i] ResBlocks
                -> [self-attention] -> [cross-attention] -> [Upsample if i > 0]
  GroupNorm -> swish -> conv_out (zero-initialised: the net outputs 0 at init)
Attention layers come once per level, after its ResBlocks (figures A.28/A.29: DBlock and
UBlock end with one attention layer). One skip per level, concatenated (figure A.29: the
UBlock takes the matching DBlock's output). Where the figures add the conditioning
embedding once per block ("CombineEmbs"), every ResBlock here receives it through adaptive
group norm. Level 0 runs at full resolution, as in the ADM layout. `image_size` is the
training resolution: it fixes at which levels attention sits (`attn_resolutions` are level
sizes at that resolution); the built net then runs at any H, W divisible by 2^(L-1), e.g.
the 256->1024 model is trained on 256x256 crops and applied to 1024x1024 images.

Conditioning (all enters one embedding `emb`, used by every ResBlock through adaptive group
norm, emb -> (scale, shift), ADM's scale-shift norm):
  * time: emb = MLP(sinusoidal(1000 t_in)), t_in = unet.logsnr_to_time(logsnr);
  * cond["aug_logsnr"] [B] (super-resolution stages): the noise-augmentation level of the
    low-resolution input, embedded the same way by a second MLP and added to emb;
  * cond["lowres"] [B, H, W, C]: the (noise-augmented) low-resolution image already
    upsampled to z's size, concatenated to z on channels before conv_in;
  * cond["text_emb"] [B, L, text_dim] with cond["text_mask"] [B, L] (bool/int, 1 = real
    token): Imagen's pooled text embedding (a learned query attends over the tokens,
    `AttentionPool`) is added to emb, and at `cross_attn_resolutions` a
    `CrossAttentionBlock` attends from the image positions to the tokens. Text embeddings
    go through a LayerNorm in every attention and pooling layer (Imagen appendix: "Layer
    Norm for text embeddings in attention and pooling layers");
  * cond["label"] [B] int (if num_classes): class embedding with a null class
    (`layers.ClassEmbedding`);
  * cond["guidance_w"] [B] float (if guidance_embedding): the guidance weight of a
    w-conditioned distilled student (Meng et al. 2023 sec. 3.1), Fourier-embedded by
    `layers.GuidanceEmbedding`, whose zero-initialised last layer makes it 0 at init.

Masking and "no text". A learned null token (in the text embedding space) is prepended to
every text sequence and is never masked; masked tokens are zeroed and excluded from every
softmax. So masked tokens cannot contribute, and a row whose tokens are all masked attends
to the null token only: that is the unconditional ("no text") model. Omitting
cond["text_emb"] (and "text_mask") gives the same output, as does a zero-length text
[B, 0, text_dim]. Classifier-free guidance drops the text of an example by zeroing its
mask row, at training and at sampling.

Scanned layers (vdm/nets/stack.py): a level's ResBlocks are a `stack.Chain`: the blocks
after the first (and the first too when it keeps the width) have identical shapes and are
one `Stack` with parameters stacked on a leading axis, run by jax.lax.scan (`scan_layers`)
or an unrolled loop over the same parameters; `remat` sets the recomputation per block.

The 1/sqrt(2) reading: B.1 says "scaling the skip connections by 1/sqrt(2)"; SR3 and
NCSN++ scale residual sums, (x + h) / sqrt(2), and so do we. Some re-implementations (e.g.
lucidrains/imagen-pytorch's `skip_connect_scale`) instead scale the U-Net skip before
concatenation; there the first GroupNorm of the next block cancels the scale for all but
the block's 1x1 shortcut.
"""

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vdm.nets import layers, sharding, stack
from vdm.nets.unet import logsnr_to_time

SKIP_SCALE = 1.0 / math.sqrt(2.0)  # Imagen appendix B.1

NAME = "EfficientUNet"


# --- blocks --------------------------------------------------------------------------------


class EfficientResBlock(layers.ResBlock):
  """`layers.ResBlock` with the residual sum scaled: out = (skip(x) + h) / sqrt(2).

  At init conv2 is zero, so the block maps x to skip(x) / sqrt(2).
  """

  def __call__(self, x, emb=None, *, dropout_key=None):
    out = super().__call__(x, emb, dropout_key=dropout_key)
    return out * jnp.asarray(SKIP_SCALE, out.dtype)


def layer_norm(dim: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm over the last axis in float32, scale and bias with logical axis ("norm",)."""
  return nnx.LayerNorm(
      dim, epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32,
      use_fast_variance=False, scale_init=layers.partitioned(layers.ones, layers.NORM),
      bias_init=layers.partitioned(layers.zeros, layers.NORM), rngs=rngs)


def table(rows: int, dim: int, *, rngs: nnx.Rngs) -> nnx.Param:
  """A learned [rows, dim] table (standard normal init) with logical axes VOCAB."""
  init = layers.partitioned(nnx.initializers.normal(1.0), layers.VOCAB)
  return nnx.Param(init(rngs.params(), (rows, dim), jnp.float32))


def masked_attention(q, k, v, mask, num_heads: int):
  """Multi-head attention of q [B, T, C] over k, v [B, S, C]; mask [B, S] bool (True = use).

  Logits and softmax in float32 (`jax.nn.dot_product_attention`); a masked key gets
  probability exactly 0. Every row must keep one unmasked key (the null token does).
  """
  b, t, c = q.shape
  s = k.shape[1]
  heads = lambda x, n: x.reshape(b, n, num_heads, c // num_heads)
  a = jax.nn.dot_product_attention(heads(q, t), heads(k, s), heads(v, s),
                                   mask=mask[:, None, None, :])
  return a.reshape(b, t, c)


class CrossAttentionBlock(nnx.Module):
  """Residual cross-attention from image positions to text tokens, zero-init output.

  out = x + W_o MHA(W_q GroupNorm(x), W_k LN(text), W_v LN(text); mask).
  """

  def __init__(self, channels: int, text_dim: int, *, num_heads: int, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.num_heads, self.dtype = num_heads, dtype
    self.norm = layers.GroupNorm(channels, rngs=rngs)
    self.text_norm = layer_norm(text_dim, rngs=rngs)
    self.q = layers.dense(channels, channels, layers.ATTN_QKV, dtype=dtype, rngs=rngs)
    self.k = layers.dense(text_dim, channels, layers.ATTN_QKV, dtype=dtype, rngs=rngs)
    self.v = layers.dense(text_dim, channels, layers.ATTN_QKV, dtype=dtype, rngs=rngs)
    self.out = layers.dense(channels, channels, layers.ATTN_OUT, zero_init=True, dtype=dtype,
                            rngs=rngs)

  def __call__(self, x, text, mask):
    b, hh, ww, c = x.shape
    n = self.norm(x).reshape(b, hh * ww, c)
    t = self.text_norm(text).astype(self.dtype)
    a = masked_attention(self.q(n), self.k(t), self.v(t), mask, self.num_heads)
    return x + self.out(a).reshape(b, hh, ww, c)


class AttentionPool(nnx.Module):
  """Imagen's pooled text embedding: a learned query attends over LN(text) tokens.

  pooled = W_o MHA(query, W_k LN(text), W_v LN(text); mask), shape [B, emb_dim].
  """

  def __init__(self, text_dim: int, emb_dim: int, *, num_heads: int, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.num_heads, self.dtype = num_heads, dtype
    self.text_norm = layer_norm(text_dim, rngs=rngs)
    self.query = table(1, emb_dim, rngs=rngs)
    self.k = layers.dense(text_dim, emb_dim, layers.ATTN_QKV, dtype=dtype, rngs=rngs)
    self.v = layers.dense(text_dim, emb_dim, layers.ATTN_QKV, dtype=dtype, rngs=rngs)
    self.out = layers.dense(emb_dim, emb_dim, layers.ATTN_OUT, dtype=dtype, rngs=rngs)

  def __call__(self, text, mask):
    b = text.shape[0]
    t = self.text_norm(text).astype(self.dtype)
    q = jnp.broadcast_to(self.query[...].astype(self.dtype)[None], (b,) + self.query.shape)
    a = masked_attention(q, self.k(t), self.v(t), mask, self.num_heads)
    return self.out(a[:, 0])


class Level(nnx.Module):
  """The body of one resolution level: ResBlocks, then optional self- and cross-attention."""

  def __init__(self, in_ch: int, out_ch: int, num_blocks: int, *, emb_ch: int,
               self_attn: bool, cross_attn: bool, text_dim: int | None, num_heads: int,
               dropout: float, scan_layers: bool, remat: str, dtype, rngs: nnx.Rngs):
    block = lambda spec, r: EfficientResBlock(*spec, emb_ch, dropout=dropout,
                                              adaptive_norm=True, dtype=dtype, rngs=r)
    specs = [(in_ch, out_ch)] + [(out_ch, out_ch)] * (num_blocks - 1)
    self.blocks = stack.Chain(block, specs, scan=scan_layers, remat=remat, rngs=rngs)
    self.attn = (layers.AttentionBlock(out_ch, num_heads=num_heads, dtype=dtype, rngs=rngs)
                 if self_attn else None)
    self.cross = (CrossAttentionBlock(out_ch, text_dim, num_heads=num_heads, dtype=dtype,
                                      rngs=rngs) if cross_attn else None)

  def body(self, h, emb, text, dropout_key):
    step = lambda block, h, key: (block(h, emb, dropout_key=key), None)
    h, _ = self.blocks(step, h, layers.split_key(dropout_key, len(self.blocks)))
    if self.attn is not None:
      h = self.attn(h)
    if self.cross is not None:
      h = sharding.constrain(self.cross(h, *text), sharding.IMAGE)
    return h


class DownLevel(Level):
  """Efficient U-Net DBlock (figure A.28): downsample FIRST, then the level's body."""

  def __init__(self, in_ch: int, out_ch: int, num_blocks: int, *, downsample: bool,
               dtype=jnp.float32, rngs: nnx.Rngs, **kw):
    self.downsample = (layers.Downsample(in_ch, with_conv=True, dtype=dtype, rngs=rngs)
                       if downsample else None)
    super().__init__(in_ch, out_ch, num_blocks, dtype=dtype, rngs=rngs, **kw)

  def __call__(self, h, emb, text, dropout_key=None):
    if self.downsample is not None:
      h = self.downsample(h)
    return self.body(h, emb, text, dropout_key)


class UpLevel(Level):
  """Efficient U-Net UBlock (figure A.29): concat the skip, the body, upsample LAST."""

  def __init__(self, in_ch: int, out_ch: int, num_blocks: int, *, upsample: bool,
               dtype=jnp.float32, rngs: nnx.Rngs, **kw):
    super().__init__(in_ch, out_ch, num_blocks, dtype=dtype, rngs=rngs, **kw)
    self.upsample = (layers.Upsample(out_ch, with_conv=True, dtype=dtype, rngs=rngs)
                     if upsample else None)

  def __call__(self, h, skip, emb, text, dropout_key=None):
    if skip is not None:
      h = sharding.constrain(jnp.concatenate([h, skip], axis=-1), sharding.IMAGE)
    h = self.body(h, emb, text, dropout_key)
    return h if self.upsample is None else self.upsample(h)


# --- the network ---------------------------------------------------------------------------


def _per_level(value, levels: int, name: str) -> tuple[int, ...]:
  value = (value,) * levels if isinstance(value, int) else tuple(value)
  if len(value) != levels or any(v < 1 for v in value):
    raise ValueError(f"{name} must be an int >= 1 or one int >= 1 per level "
                     f"(len(ch_mult)={levels}), got {value}")
  return value


class EfficientUNet(nnx.Module):
  """Imagen's Efficient U-Net; `__call__(z, logsnr, cond=None, *, dropout_key=None)`.

  Args:
    channels: image channels C of z; cond["lowres"] has the same.
    in_channels: input channels (default C; 2 C self-conditioned: [z, x_self], vdm/model.py).
    out_channels: output channels (default C; 2 C for "both", Salimans & Ho 2022 sec. 4).
    image_size: training resolution H (= W); attention placement refers to it.
    ch: base width; level i has ch * ch_mult[i] channels.
    ch_mult: channel multiplier per level (len(ch_mult) - 1 downsamplings).
    num_res_blocks: ResBlocks per level (int or one per level), same on the up path.
    attn_resolutions: level sizes (at image_size) with a self-attention layer.
    cross_attn_resolutions: level sizes with text cross-attention (needs text_dim).
    num_heads: heads of every attention and of the text pooling.
    text_dim: width of cond["text_emb"]; None builds a net without text conditioning.
    lowres_cond: super-resolution stage: requires cond["lowres"] and cond["aug_logsnr"].
    num_classes: if set, cond["label"] adds a class embedding (-1 = null class).
    dropout: dropout rate in the ResBlocks (active only with a dropout_key).
    emb_ch: conditioning embedding width (default 4 * ch).
    guidance_embedding: if True, cond["guidance_w"] (float [B]) is required and its
      embedding (zero at init) is added to the conditioning embedding.
    scan_layers: run each level's identical ResBlocks with jax.lax.scan rather than an
      unrolled loop; same parameters, values and gradients either way.
    remat: "none" | "block" | "dots": activation recomputation per block (stack.py).
    dtype: compute dtype (params float32; norms, embeddings and softmax in float32).
  """

  def __init__(self, *, channels: int = 3, image_size: int = 64, ch: int = 128,
               ch_mult: Sequence[int] = (1, 2, 4, 8),
               num_res_blocks: int | Sequence[int] = (2, 4, 8, 8),
               attn_resolutions: Sequence[int] = (), cross_attn_resolutions: Sequence[int] = (),
               num_heads: int = 8, text_dim: int | None = None, lowres_cond: bool = False,
               num_classes: int | None = None, dropout: float = 0.0, emb_ch: int | None = None,
               out_channels: int | None = None, in_channels: int | None = None,
               guidance_embedding: bool = False, scan_layers: bool = True,
               remat: str = "none", dtype=jnp.float32, rngs: nnx.Rngs):
    levels = len(ch_mult)
    if levels < 1 or image_size % 2 ** (levels - 1):
      raise ValueError(f"image_size={image_size} must be divisible by 2^(len(ch_mult)-1)="
                       f"{2 ** (levels - 1)}; drop a level from ch_mult={tuple(ch_mult)}")
    blocks = _per_level(num_res_blocks, levels, "num_res_blocks")
    sizes = [image_size // 2 ** i for i in range(levels)]
    for name, res in (("attn_resolutions", attn_resolutions),
                      ("cross_attn_resolutions", cross_attn_resolutions)):
      if set(res) - set(sizes):
        raise ValueError(f"{name}={tuple(res)} lists sizes that no level has; the levels "
                         f"run at {sizes} for image_size={image_size}")
    if cross_attn_resolutions and text_dim is None:
      raise ValueError("cross_attn_resolutions needs text_dim (the width of "
                       "cond['text_emb']); set text_dim or drop the cross-attention")
    emb_ch = 4 * ch if emb_ch is None else emb_ch
    attn_widths = [ch * m for m, s in zip(ch_mult, sizes)
                   if s in attn_resolutions or s in cross_attn_resolutions]
    attn_widths += [emb_ch] if text_dim is not None else []
    if any(w % num_heads for w in attn_widths):
      raise ValueError(f"num_heads={num_heads} must divide the attention widths {attn_widths}")

    self.channels, self.ch, self.dtype, self.levels = channels, ch, dtype, levels
    self.out_channels = channels if out_channels is None else out_channels
    self.in_channels = channels if in_channels is None else in_channels
    self.text_dim, self.lowres_cond = text_dim, lowres_cond
    self.cond_keys = ((("text_emb", "text_mask") if text_dim is not None else ()) +
                      (("lowres", "aug_logsnr") if lowres_cond else ()) +
                      (("label",) if num_classes is not None else ()) +
                      (("guidance_w",) if guidance_embedding else ()))

    self._conditioning_modules(ch, emb_ch, text_dim=text_dim, lowres_cond=lowres_cond,
                               num_classes=num_classes, num_heads=num_heads, dtype=dtype,
                               rngs=rngs)

    common = dict(emb_ch=emb_ch, text_dim=text_dim, num_heads=num_heads, dropout=dropout,
                  scan_layers=scan_layers, remat=stack.check_remat(remat), dtype=dtype,
                  rngs=rngs)
    attn_at = lambda i: dict(self_attn=sizes[i] in attn_resolutions,
                             cross_attn=sizes[i] in cross_attn_resolutions)
    in_ch = self.in_channels + (channels if lowres_cond else 0)
    self.conv_in = layers.conv(in_ch, ch, dtype=dtype, rngs=rngs)
    down, cur = [], ch
    for i in range(levels):
      down.append(DownLevel(cur, ch * ch_mult[i], blocks[i], downsample=i > 0,
                            **attn_at(i), **common))
      cur = ch * ch_mult[i]
    up = []
    for i in reversed(range(levels)):
      skip_ch = ch * ch_mult[i] if i < levels - 1 else 0  # the lowest level has no skip
      up.append(UpLevel(cur + skip_ch, ch * ch_mult[i], blocks[i], upsample=i > 0,
                        **attn_at(i), **common))
      cur = ch * ch_mult[i]
    self.down, self.up = nnx.List(down), nnx.List(up)
    self._output_modules(cur, ch, emb_ch, guidance_embedding, dtype, rngs)

  # --- conditioning ---

  def _output_modules(self, cur, ch, emb_ch, guidance_embedding, dtype, rngs):
    """The output norm and (zero-initialised) conv, then the guidance-weight embedding,
    created last so that the other weights do not depend on that flag at a given seed."""
    self.norm_out = layers.GroupNorm(cur, rngs=rngs)
    self.conv_out = layers.conv(cur, self.out_channels, zero_init=True, dtype=dtype,
                                rngs=rngs)
    self.guidance_emb = (layers.GuidanceEmbedding(ch, emb_ch, dtype=dtype, rngs=rngs)
                         if guidance_embedding else None)

  def _conditioning_modules(self, ch, emb_ch, *, text_dim, lowres_cond, num_classes,
                            num_heads, dtype, rngs):
    """Embeddings of the noise level, the SR input's augmentation level, the class and the
    text (null token, attention pooling), named as `embedding` and `text_tokens` use them."""
    self.temb = layers.EmbeddingMLP(ch, emb_ch, dtype=dtype, rngs=rngs)
    self.aug_emb = (layers.EmbeddingMLP(ch, emb_ch, dtype=dtype, rngs=rngs)
                    if lowres_cond else None)
    self.class_emb = (layers.ClassEmbedding(num_classes, emb_ch, rngs=rngs)
                      if num_classes is not None else None)
    self.null_text = table(1, text_dim, rngs=rngs) if text_dim is not None else None
    self.text_pool = (AttentionPool(text_dim, emb_ch, num_heads=num_heads, dtype=dtype,
                                    rngs=rngs) if text_dim is not None else None)
  def text_tokens(self, cond: dict, batch: int):
    """([B, 1 + L, text_dim] float32 tokens, [B, 1 + L] bool mask), null token first.

    Masked tokens are zeroed (so even NaN padding cannot leak) and masked out. Without
    cond["text_emb"] only the null token remains: the unconditional model.
    """
    if "text_emb" in cond:
      text = jnp.asarray(cond["text_emb"])
      if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != self.text_dim:
        raise ValueError(f"cond['text_emb'] must have shape [B, L, text_dim]=[{batch}, L, "
                         f"{self.text_dim}], got {list(text.shape)}")
      if "text_mask" not in cond:
        raise ValueError("cond['text_emb'] needs cond['text_mask'] [B, L] (1 for real "
                         "tokens, 0 for padding); all-zero rows mean 'no text'")
      mask = jnp.asarray(cond["text_mask"])
      if mask.shape != text.shape[:2] or not (jnp.issubdtype(mask.dtype, jnp.bool_) or
                                              jnp.issubdtype(mask.dtype, jnp.integer)):
        raise ValueError(f"cond['text_mask'] must be bool or int of shape [B, L]="
                         f"{list(text.shape[:2])}, got {mask.dtype}{list(mask.shape)}")
      mask = mask.astype(bool)
      text = jnp.where(mask[..., None], text.astype(jnp.float32), 0.)
    elif "text_mask" in cond:
      raise ValueError("cond['text_mask'] was given without cond['text_emb']")
    else:
      text = jnp.zeros((batch, 0, self.text_dim), jnp.float32)
      mask = jnp.zeros((batch, 0), bool)
    null = jnp.broadcast_to(self.null_text[...][None], (batch, 1, self.text_dim))
    return (sharding.constrain(jnp.concatenate([null, text], axis=1), sharding.TOKENS),
            jnp.concatenate([jnp.ones((batch, 1), bool), mask], axis=1))

  def _scalar_embedding(self, mlp, logsnr):
    t_in = logsnr_to_time(logsnr)
    return mlp(layers.sinusoidal_embedding(1000. * t_in, self.ch).astype(self.dtype))

  def embedding(self, logsnr, cond: dict, text):
    """The [B, emb_ch] embedding: time + aug level + class + pooled text + guidance weight,
    as configured."""
    batch = logsnr.shape[0]
    emb = self._scalar_embedding(self.temb, logsnr)
    if self.aug_emb is not None:
      aug = jnp.asarray(cond["aug_logsnr"], jnp.float32)
      aug = jnp.broadcast_to(aug, (batch,)) if aug.ndim == 0 else aug
      if aug.shape != (batch,):
        raise ValueError(f"cond['aug_logsnr'] must have shape [B]=[{batch}] (or be a "
                         f"scalar), got {list(aug.shape)}")
      emb = emb + self._scalar_embedding(self.aug_emb, aug)
    if self.class_emb is not None:
      label = cond.get("label", self.class_emb.null_labels(batch))
      emb = emb + self.class_emb(label, batch).astype(emb.dtype)
    if text is not None:
      emb = emb + self.text_pool(*text)
    if self.guidance_emb is not None:
      emb = emb + self.guidance_emb(cond, batch, NAME).astype(emb.dtype)
    return emb

  def _input(self, z, cond: dict):
    if not self.lowres_cond:
      return z
    missing = [k for k in ("lowres", "aug_logsnr") if k not in cond]
    if missing:
      raise ValueError(f"{NAME} was built with lowres_cond=True: pass cond{missing} (the "
                       "noise-augmented low-resolution image upsampled to z's size, and "
                       "its augmentation logsnr [B])")
    lowres, shape = jnp.asarray(cond["lowres"]), z.shape[:-1] + (self.channels,)
    if lowres.shape != shape:
      raise ValueError(f"cond['lowres'] must be the low-resolution image upsampled to z's "
                       f"size, shape {list(shape)}, got {list(lowres.shape)}")
    return jnp.concatenate([z, lowres.astype(z.dtype)], axis=-1)

  # --- forward ---

  def __call__(self, z, logsnr, cond=None, *, dropout_key=None):
    logsnr = layers.check_inputs(z, logsnr, self.in_channels, NAME)
    factor = 2 ** (self.levels - 1)
    if z.shape[1] % factor or z.shape[2] % factor:
      raise ValueError(f"{NAME}: H, W = {z.shape[1:3]} must be divisible by {factor} "
                       "(2^(len(ch_mult)-1))")
    cond = layers.check_cond_keys(cond, self.cond_keys, NAME)
    h = self._input(z, cond)
    text = self.text_tokens(cond, z.shape[0]) if self.text_dim is not None else None
    emb = self.embedding(logsnr, cond, text)
    keys = layers.split_key(dropout_key, 2 * self.levels)
    h = sharding.constrain(self.conv_in(h.astype(self.dtype)), sharding.IMAGE)
    skips = []
    for level, key in zip(self.down, keys[:self.levels]):
      h = level(h, emb, text, key)
      skips.append(h)
    skips[-1] = None  # the lowest level continues without a skip
    for level, key, skip in zip(self.up, keys[self.levels:], reversed(skips)):
      h = level(h, skip, emb, text, key)
    h = self.conv_out(jax.nn.swish(self.norm_out(h))).astype(z.dtype)
    return sharding.constrain(h, sharding.IMAGE)
