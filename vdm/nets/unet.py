"""A multi-resolution U-Net in the style of ADM (Dhariwal & Nichol 2021, "Diffusion Models
Beat GANs") as used by progressive distillation (Salimans & Ho 2022).

Conditioning: the noise level enters as logsnr, mapped to a time in [0, 1] by the inverse
of the cosine schedule, t_in = arctan(exp(-logsnr / 2)) / (pi / 2) with logsnr clipped to
[-20, 20] (google-research/diffusion_distillation, `logsnr_input_type='inv_cos'`), then
emb = Dense(swish(Dense(sinusoidal(1000 t_in, ch)))) of width emb_ch (default 4 ch).
Optional extras are added to emb: a learned class embedding (cond["label"], with a null
class for classifier-free guidance) and a projected conditioning vector (cond["vector"],
[B, cond_dim], e.g. pooled text embeddings). Each ResBlock uses adaptive group norm
(scale-shift from emb) unless adaptive_norm=False.

Layout: conv_in; per resolution level `num_res_blocks` ResBlocks (+ attention where the
current spatial size is in attn_resolutions), then a Downsample except at the last level;
middle ResBlock-Attention-ResBlock; the up path mirrors it with num_res_blocks + 1 blocks
per level, each consuming one skip by concatenation, and an Upsample except at level 0;
GroupNorm, swish, zero-initialised conv_out. The blocks live in `layers` so Imagen's
Efficient U-Net can reuse them.

Scanned layers (vdm/nets/stack.py): each level's down blocks and each level's up blocks
are a `stack.Chain` in which consecutive blocks of identical shape (input, skip and output
channels, attention or not) share one stacked, scanned `Stack`; a block whose neighbours
differ (the first down block of a level that changes the width, the up blocks that take
the previous level's skip) stays a single module. `scan_layers` picks lax.scan or an
unrolled loop over the same parameters; `remat` the recomputation policy.

For distillation: `out_channels=2 * channels` serves the "both" parameterization (x_tilde
and eps_tilde, Salimans & Ho 2022 sec. 4), and `guidance_embedding=True` adds an embedding
of cond["guidance_w"] to emb (`layers.GuidanceEmbedding`, Meng et al. 2023 sec. 3.1).
"""

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vdm.nets import layers, stack


def logsnr_to_time(logsnr):
  """Inverse cosine schedule: t in [0, 1] with logsnr = -2 log tan(pi t / 2)."""
  return jnp.arctan(jnp.exp(-0.5 * jnp.clip(logsnr, -20., 20.))) / (0.5 * jnp.pi)


class ResAttention(nnx.Module):
  """A ResBlock followed by an optional self-attention block: one unit of a block stack."""

  def __init__(self, block: layers.ResBlock, attn: layers.AttentionBlock | None):
    self.block, self.attn = block, attn

  def __call__(self, x, emb, dropout_key=None):
    h = self.block(x, emb, dropout_key=dropout_key)
    return h if self.attn is None else self.attn(h)


class UNet(nnx.Module):
  """ADM-style U-Net; `__call__(z, logsnr, cond=None, *, dropout_key=None)` -> [B, H, W,
  out_channels].

  Args:
    channels: image channels C of z.
    in_channels: channels of the net's input (default C; 2 C for a self-conditioned model,
      whose input is [z, x_self], vdm/model.py).
    out_channels: output channels (default C; 2 C for the "both" parameterization).
    image_size: spatial size H (= W) the net is built for; attention placement refers to it.
    ch: base width; level i has ch * ch_mult[i] channels.
    ch_mult: channel multiplier per resolution level (len(ch_mult) - 1 downsamplings).
    num_res_blocks: ResBlocks per level on the down path (num_res_blocks + 1 on the up path).
    attn_resolutions: spatial sizes at which a self-attention block follows each ResBlock.
    num_heads: attention heads.
    dropout: dropout rate in the ResBlocks (active only with a dropout_key).
    emb_ch: embedding width (default 4 * ch).
    adaptive_norm: scale-shift group norm (ADM's use_scale_shift_norm) vs additive emb.
    resample_with_conv: strided conv / nearest+conv (True) or avg pool / nearest (False).
    num_classes: if set, cond["label"] (int [B]) adds a class embedding; -1 or
      num_classes (or no label) is the null class.
    cond_dim: if set, cond["vector"] ([B, cond_dim]) is projected and added to emb.
    guidance_embedding: if True, cond["guidance_w"] (float [B]) is required and its
      embedding (zero at init) is added to emb.
    scan_layers: run runs of identical blocks with jax.lax.scan rather than an unrolled
      loop; same parameters, values and gradients either way.
    remat: "none" | "block" | "dots": activation recomputation per block (stack.py).
    dtype: compute dtype (params float32; norms and embeddings float32).
  """

  def __init__(self, *, channels: int = 3, image_size: int = 32, ch: int = 128,
               ch_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
               attn_resolutions: Sequence[int] = (16,), num_heads: int = 1,
               dropout: float = 0.0, emb_ch: int | None = None, adaptive_norm: bool = True,
               resample_with_conv: bool = True, num_classes: int | None = None,
               cond_dim: int | None = None, out_channels: int | None = None,
               guidance_embedding: bool = False, scan_layers: bool = True,
               remat: str = "none", dtype=jnp.float32, in_channels: int | None = None,
               rngs: nnx.Rngs):
    levels = len(ch_mult)
    if levels < 1 or image_size % 2 ** (levels - 1):
      raise ValueError(f"image_size={image_size} must be divisible by 2^(len(ch_mult)-1)="
                       f"{2 ** (levels - 1)}; drop a level from ch_mult={tuple(ch_mult)}")
    self.channels, self.ch, self.dtype = channels, ch, dtype
    self.out_channels = channels if out_channels is None else out_channels
    self.in_channels = channels if in_channels is None else in_channels
    self.levels = levels
    emb_ch = 4 * ch if emb_ch is None else emb_ch
    block = lambda cin, cout, r: layers.ResBlock(cin, cout, emb_ch, dropout=dropout,
                                                 adaptive_norm=adaptive_norm, dtype=dtype,
                                                 rngs=r)

    def unit(spec, r):
      """spec = (running channels, skip channels, out channels, with attention)."""
      cur, skip, cout, with_attn = spec
      return ResAttention(block(cur + skip, cout, r), layers.AttentionBlock(
          cout, num_heads=num_heads, dtype=dtype, rngs=r) if with_attn else None)

    chain = lambda specs: stack.Chain(unit, specs, scan=scan_layers, remat=remat, rngs=rngs)
    stack.check_remat(remat)

    self.temb = layers.EmbeddingMLP(ch, emb_ch, dtype=dtype, rngs=rngs)
    self.class_emb = (layers.ClassEmbedding(num_classes, emb_ch, rngs=rngs)
                      if num_classes is not None else None)
    self.vector_proj = (layers.dense(cond_dim, emb_ch, layers.PROJECT, dtype=dtype, rngs=rngs)
                        if cond_dim is not None else None)
    self.cond_dim = cond_dim

    # Down path: record the channel count of every skip it produces.
    self.conv_in = layers.conv(self.in_channels, ch, dtype=dtype, rngs=rngs)
    skip_ch, cur, size = [ch], ch, image_size
    down, downsamples = [], []
    for level, mult in enumerate(ch_mult):
      specs = []
      for _ in range(num_res_blocks):
        specs.append((cur, 0, ch * mult, size in attn_resolutions))
        cur = ch * mult
        skip_ch.append(cur)
      down.append(chain(specs))
      if level != levels - 1:
        downsamples.append(layers.Downsample(cur, with_conv=resample_with_conv, dtype=dtype,
                                             rngs=rngs))
        skip_ch.append(cur)
        size //= 2
    self.down = nnx.List(down)                       # one Chain per level
    self.downsample = nnx.List(downsamples)

    self.mid1 = block(cur, cur, rngs)
    self.mid_attn = layers.AttentionBlock(cur, num_heads=num_heads, dtype=dtype, rngs=rngs)
    self.mid2 = block(cur, cur, rngs)

    up, upsamples = [], []
    for level in reversed(range(levels)):
      specs = []
      for _ in range(num_res_blocks + 1):
        specs.append((cur, skip_ch.pop(), ch * ch_mult[level], size in attn_resolutions))
        cur = ch * ch_mult[level]
      up.append(chain(specs))
      if level != 0:
        upsamples.append(layers.Upsample(cur, with_conv=resample_with_conv, dtype=dtype,
                                         rngs=rngs))
        size *= 2
    assert not skip_ch
    self.up = nnx.List(up)                           # one Chain per level, lowest first
    self.upsample = nnx.List(upsamples)
    self.num_res_blocks = num_res_blocks

    self.norm_out = layers.GroupNorm(cur, rngs=rngs)
    self.conv_out = layers.conv(cur, self.out_channels, zero_init=True, dtype=dtype,
                                rngs=rngs)
    # Created last, so that the other weights do not depend on this flag at a given seed.
    self.guidance_emb = (layers.GuidanceEmbedding(ch, emb_ch, dtype=dtype, rngs=rngs)
                         if guidance_embedding else None)

  def embedding(self, logsnr, cond: dict):
    """The [B, emb_ch] conditioning embedding: time, plus class, vector and guidance weight
    if configured."""
    t_in = logsnr_to_time(logsnr)
    emb = self.temb(layers.sinusoidal_embedding(1000. * t_in, self.ch).astype(self.dtype))
    if self.class_emb is not None:
      label = cond.get("label", self.class_emb.null_labels(logsnr.shape[0]))
      emb = emb + self.class_emb(label, logsnr.shape[0]).astype(emb.dtype)
    if self.vector_proj is not None:
      if "vector" not in cond:
        raise ValueError("UNet was built with cond_dim; pass cond['vector'] [B, cond_dim]")
      vec = jnp.asarray(cond["vector"])
      if vec.shape != (logsnr.shape[0], self.cond_dim):
        raise ValueError(f"cond['vector'] must have shape [B, cond_dim]="
                         f"{[logsnr.shape[0], self.cond_dim]}, got {list(vec.shape)}")
      emb = emb + self.vector_proj(vec.astype(self.dtype))
    if self.guidance_emb is not None:
      emb = emb + self.guidance_emb(cond, logsnr.shape[0], "UNet").astype(emb.dtype)
    return emb

  def __call__(self, z, logsnr, cond=None, *, dropout_key=None):
    logsnr = layers.check_inputs(z, logsnr, self.in_channels, "UNet")
    factor = 2 ** (self.levels - 1)
    if z.shape[1] % factor or z.shape[2] % factor:
      raise ValueError(f"UNet: H, W = {z.shape[1:3]} must be divisible by {factor} "
                       f"(2^(len(ch_mult)-1))")
    allowed = (("label",) if self.class_emb is not None else ()) + (
        ("vector",) if self.vector_proj is not None else ()) + (
        ("guidance_w",) if self.guidance_emb is not None else ())
    cond = layers.check_cond_keys(cond, allowed, "UNet")
    emb = self.embedding(logsnr, cond)
    # One dropout key per ResBlock, in the order down, mid1, mid2, up.
    n_down, n_up = (sum(len(c) for c in chains) for chains in (self.down, self.up))
    keys = iter(layers.split_key(dropout_key, n_down + 2 + n_up))
    take = lambda n: [next(keys) for _ in range(n)]

    def down(unit, h, key):  # the output runs on and is kept as a skip
      h = unit(h, emb, key)
      return h, h

    hs = [self.conv_in(z.astype(self.dtype))]
    for level, chain in enumerate(self.down):
      h, ys = chain(down, hs[-1], take(len(chain)))
      hs += ys
      if level != self.levels - 1:
        hs.append(self.downsample[level](hs[-1]))

    h = self.mid1(hs[-1], emb, dropout_key=next(keys))
    h = self.mid_attn(h)
    h = self.mid2(h, emb, dropout_key=next(keys))

    up = lambda unit, h, x: (unit(jnp.concatenate([h, x[0]], axis=-1), emb, x[1]), None)
    for i, chain in enumerate(self.up):
      skips = [hs.pop() for _ in range(len(chain))]
      h, _ = chain(up, h, list(zip(skips, take(len(chain)))))
      if i != self.levels - 1:
        h = self.upsample[i](h)
    assert not hs

    return self.conv_out(jax.nn.swish(self.norm_out(h))).astype(z.dtype)
