"""Video U-Net: the Efficient U-Net factorized over space and time (Ho et al. 2022, "Video
Diffusion Models", sec. 3; Imagen Video, Ho et al. 2022b, "Video Diffusion Architectures":
space-time separable blocks).

`VideoUNet.__call__(z, logsnr, cond=None, *, dropout_key=None)` -> [B, F, H, W, out_channels]
for a noisy video z [B, F, H, W, C] (F frames; any F, any H, W divisible by 2^(L-1)).

Space. Every spatial layer of the Efficient U-Net (`imagen/efficient_unet.py`: its ResBlocks,
self-attention, text cross-attention, resampling, conv_in / conv_out) runs on each frame on
its own, with the frames folded into the batch ([B, F, ...] -> [B * F, ...]) and the same
weights for every frame: Ho et al.'s "space-only 3D convolution" (3x3 -> 1x3x3), and spatial
attention that "treats the first axis as a batch axis". Every normalisation is per frame
(GroupNorm statistics over one frame's H, W), so frames meet only in the temporal layers.

Time. Each ResBlock of a level is followed by that level's temporal layer (Imagen Video's
space-time separable block: spatial operations per frame, then a temporal one), chosen per
level:
  * temporal attention (`temporal_attn_resolutions`): multi-head self-attention over the F
    frames at every spatial position (H, W as batch axes), Ho et al. sec. 3, with a learned
    relative position bias B[h, bucket(k - q)] added to the logits (Shaw et al. 2018, as
    sec. 3 asks, "so that the network can distinguish ordering of frames in a way that
    does not require an absolute notion of video time");
  * temporal convolution (`temporal_conv_resolutions`): kernel 3 over frames, zero padding
    at the clip's ends; Imagen Video's super-resolution stages use these "instead of
    attention" for memory efficiency;
  * neither: that level mixes no frames (Ho et al.'s 64x64 level has no attention at all).
Both are residual with a zero-initialised output (the attention's W_o, the conv's kernel):
at init the net is the image net applied frame by frame.
Ho et al. put one temporal attention after each spatial attention, and their (ADM-layout)
net has a spatial attention after every ResBlock at the attention resolutions, i.e. one
temporal layer per ResBlock. The Efficient U-Net keeps one spatial attention per level
(after its ResBlocks); we keep the paper's density of temporal layers, one per ResBlock,
which also lets the temporal layer ride in the scanned block (`stack.Chain`). Temporal
attention is cheap next to spatial attention (F^2 = 256 logits per position for 16 frames).

Relative position bias: T5's bidirectional log-spaced buckets (`imagen.t5`), one table
[num_buckets, heads] per temporal attention layer. With the default 64 buckets every offset
|k - q| < 16 has its own bucket, so for clips of up to 16 frames (Ho et al.'s length) this
IS a plain learned bias per relative offset; longer clips (sampling longer windows than the
training clips) still get a bias, shared log-spaced for offsets >= 16, instead of offsets
the table has no row for. The table starts at zero: at init the temporal attention is
order-blind (permutation-equivariant over frames) and learns order from the data.

Joint image-video training (Ho et al. sec. 3 and 4.3.1): cond["is_image"], bool [B] or
[B, F], marks frames that are independent images. Frames q and k exchange information only
if q == k or both are video frames of the same example, the `frame_links` matrix [B, F, F]:
  * temporal attention: the links are the attention mask; an image frame's row keeps only
    its diagonal, so its attention matrix is exactly the identity (softmax of one logit),
    the paper's "fixing the attention matrix to exactly match each key and query";
  * temporal convolution: out_q = W_0 x_q + b + [link(q, q-1)] W_-1 x_(q-1)
    + [link(q, q+1)] W_+1 x_(q+1): the off-centre taps of an image frame are dropped.
[B] flags make whole examples videos or F images; [B, F] flags also express the paper's
layout (F_v video frames followed by F_i independent images in one example: the video
frames keep their relative offsets). Omitted: every example is a video. With every frame an
image the net equals itself applied to F single-frame clips (tests/test_video_unet.py).

Conditioning is the Efficient U-Net's (this class inherits `text_tokens`, `embedding`,
`_input` from `EfficientUNet`): time (logsnr), pooled T5 text added to the embedding and
cross-attention at `cross_attn_resolutions`, a learned null token ("no text" = all-masked
row, the convention of `guidance.drop_text`), optional low-resolution video for
super-resolution stages (cond["lowres"] [B, F, H, W, C] and cond["aug_logsnr"]), class
labels, guidance weight. One embedding per example, shared by its frames. New here:
  * cond["fps"] float [B] (if fps_cond): the clip's frame rate (clips are taken at a
    frame stride, so one net serves several rates, as Make-A-Video conditions on fps),
    embedded like the time, sinusoidal(fps) -> MLP, and added to emb.
    Image examples carry no frame rate; the pipeline should give them a fixed value
    (e.g. 0), which the net then learns to read as "images".
  * frame_index_cond: each video frame's index q = 0..F-1 in its clip, sinusoidal(q) -> MLP,
    added to that frame's embedding (image frames of joint training get none). Not in Ho et
    al., whose net knows order only through the relative bias: that bias says which frame
    comes first, but not where in the clip a frame sits, which a caption's motion needs (the
    digit "moving left" starts right of where it ends). On the moving digits (README
    "Video") the samples move along the captioned axis with or without it, and its gain on
    the sign (direction 0.57 -> 0.62, one run each) is inside the noise: off by default.
  * coord_cond: each pixel's (row, col) as two more input channels (CoordConv). A conv net
    knows where a pixel sits only from the zero padding, yet near pure noise the mean clip
    of "moving left" has its digit on the right in the first frame (README "Video").
    Crops of a crop-trained stage would see crop coordinates: for whole-frame stages.

Sharding. z and the activations have logical axes VIDEO_AXES = ("batch", "frames",
"height", "width", "channels"). Layers see the frames folded into the batch, so a mesh
axis may split frames as it splits the batch; the temporal layers then need the frames of a
position together, which GSPMD arranges (an all-to-all). The [B, F, H, W, C] activations
at the input, after every level and at the output go through `vdm.nets.sharding.constrain`
with these names, the one mechanism of every net (the Efficient U-Net's blocks inside
constrain their folded [B * F, H, W, C] views, whose first dim `sharding.folding_frames`
names ("batch", "frames"), so a rule splitting the frames, launch/mesh.py's "fsdp_frames",
keeps every per-frame layer on its chip's frames): the identity unless the
caller, which owns the mesh, activates a hook (launch/setup.py does, with
`launch.mesh.activation_hook`; imagen/ never imports launch/). A `shard_activations` hook
given to the constructor (or set on the net) is used for those [B, F, ...] views instead
(kept for callers written before the shared mechanism).
Parameters carry the logical names of `vdm/nets/layers.py`; new ones:
  temporal conv kernel [3, C, C]   (None, "conv_in", "conv_out"), bias ("conv_out",)
  relative bias [num_buckets, heads] (None, "heads")       (as in imagen/t5.py)
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from imagen.efficient_unet import (CrossAttentionBlock, EfficientResBlock, EfficientUNet,
                                   _per_level)
from imagen.temporal_layers import (  # noqa: F401  (the last three: video_unet.X)
    TemporalAttention, TemporalConv, frame_links, REL_BIAS, TEMPORAL_CONV_KERNEL)
from vdm.nets import layers, sharding, stack

NAME = "VideoUNet"
VIDEO_AXES = sharding.VIDEO  # ("batch", "frames", "height", "width", "channels")


def coordinate_channels(shape, dtype) -> jax.Array:
  """[..., H, W, 2]: each pixel's row and column, linearly from -1 to 1 (CoordConv, Liu et
  al. 2018), broadcast over the leading dims of `shape` = (..., H, W)."""
  rows = jnp.linspace(-1.0, 1.0, shape[-2], dtype=dtype)
  cols = jnp.linspace(-1.0, 1.0, shape[-1], dtype=dtype)
  grid = jnp.stack(jnp.meshgrid(rows, cols, indexing="ij"), axis=-1)
  return jnp.broadcast_to(grid, tuple(shape) + (2,))


class SpaceTimeBlock(nnx.Module):
  """A spatial Efficient ResBlock (per frame) followed by the level's temporal layer."""

  def __init__(self, in_ch: int, out_ch: int, emb_ch: int, *, temporal: str | None,
               num_heads: int, num_buckets: int, max_distance: int,
               rel_bias_init_std: float = 0.0,
               dropout: float, dtype, rngs: nnx.Rngs):
    self.res = EfficientResBlock(in_ch, out_ch, emb_ch, dropout=dropout, adaptive_norm=True,
                                 dtype=dtype, rngs=rngs)
    if temporal == "attention":
      self.temporal = TemporalAttention(out_ch, num_heads=num_heads, num_buckets=num_buckets,
                                        max_distance=max_distance,
                                        bias_init_std=rel_bias_init_std, dtype=dtype, rngs=rngs)
    elif temporal == "conv":
      self.temporal = TemporalConv(out_ch, dtype=dtype, rngs=rngs)
    else:
      self.temporal = None

  def __call__(self, h, emb, links, *, dropout_key=None):
    h = self.res(h, emb, dropout_key=dropout_key)
    return h if self.temporal is None else self.temporal(h, links)


class VideoLevel(nnx.Module):
  """One resolution level: [Downsample] -> SpaceTimeBlocks -> [self-attn] -> [cross-attn]
  -> [Upsample], the Efficient U-Net's order (figures A.28 / A.29), frames folded."""

  def __init__(self, in_ch: int, out_ch: int, num_blocks: int, *, down: bool, up: bool,
               temporal: str | None, self_attn: bool, cross_attn: bool, text_dim, num_heads,
               scan_layers: bool, remat: str, dtype, rngs: nnx.Rngs, **block_kw):
    self.downsample = (layers.Downsample(in_ch, with_conv=True, dtype=dtype, rngs=rngs)
                       if down else None)
    block = lambda spec, r: SpaceTimeBlock(*spec, temporal=temporal, num_heads=num_heads,
                                           dtype=dtype, rngs=r, **block_kw)
    specs = [(in_ch, out_ch)] + [(out_ch, out_ch)] * (num_blocks - 1)
    self.blocks = stack.Chain(block, specs, scan=scan_layers, remat=remat, rngs=rngs)
    self.attn = (layers.AttentionBlock(out_ch, num_heads=num_heads, dtype=dtype, rngs=rngs)
                 if self_attn else None)
    self.cross = (CrossAttentionBlock(out_ch, text_dim, num_heads=num_heads, dtype=dtype,
                                      rngs=rngs) if cross_attn else None)
    self.upsample = (layers.Upsample(out_ch, with_conv=True, dtype=dtype, rngs=rngs)
                     if up else None)

  def __call__(self, h, emb, links, text, dropout_key=None):
    if self.downsample is not None:
      h = self.downsample(h)
    step = lambda block, h, key: (block(h, emb, links, dropout_key=key), None)
    h, _ = self.blocks(step, h, layers.split_key(dropout_key, len(self.blocks)))
    if self.attn is not None:
      h = self.attn(h)
    if self.cross is not None:
      h = self.cross(h, *text)
    return h if self.upsample is None else self.upsample(h)


# --- the network ---------------------------------------------------------------------------


def _check_video_inputs(z, logsnr, channels: int):
  """Validates z [B, F, H, W, C] and logsnr ([B] or scalar); returns logsnr float32 [B]."""
  if z.ndim != 5:
    raise ValueError(f"{NAME}: z must be a video [B, F, H, W, C], got shape {z.shape} (an "
                     "image batch [B, H, W, C] is a batch of one-frame clips: z[:, None])")
  if z.shape[-1] != channels:
    raise ValueError(f"{NAME}: z has {z.shape[-1]} channels but the net was built for "
                     f"channels={channels}")
  logsnr = jnp.asarray(logsnr, jnp.float32)
  logsnr = jnp.broadcast_to(logsnr, z.shape[:1]) if logsnr.ndim == 0 else logsnr
  if logsnr.shape != z.shape[:1]:
    raise ValueError(f"{NAME}: logsnr must have shape [B]={z.shape[:1]}, got {logsnr.shape}")
  return logsnr


class VideoUNet(EfficientUNet):
  """Space-time factorized Efficient U-Net; `__call__(z, logsnr, cond=None, *, dropout_key)`.

  Args (those shared with EfficientUNet mean the same; see imagen/efficient_unet.py):
    channels, out_channels, image_size, ch, ch_mult, num_res_blocks, attn_resolutions,
    cross_attn_resolutions, num_heads, text_dim, lowres_cond, num_classes, dropout, emb_ch,
    guidance_embedding, scan_layers, remat, dtype, in_channels (2 C for a self-conditioned
    model, whose input is [z, x_self]: vdm/model.py).
    temporal_attn_resolutions: level sizes (at image_size) whose ResBlocks are each followed
      by temporal attention; None = every level not in temporal_conv_resolutions.
    temporal_conv_resolutions: level sizes with a temporal convolution after each ResBlock.
    head_dim: if set, each attention layer has width // head_dim heads (Ho et al. give a
      head dimension, 64); else num_heads everywhere. The text pooling uses num_heads.
    num_buckets, max_distance: T5 relative-position buckets of the temporal attention.
    fps_cond: require cond["fps"] (float [B]) and add its embedding.
    frame_index_cond: add an embedding of each video frame's index to its embedding.
    coord_cond: give the net each pixel's (row, col) in [-1, 1] as two input channels.
    shard_activations: optional hook fn(x, VIDEO_AXES) -> x for the [B, F, H, W, C]
      activations, used instead of `vdm.nets.sharding`'s active hook (module docstring).
  cond keys: text_emb/text_mask (if text_dim), lowres/aug_logsnr (if lowres_cond), label,
  guidance_w, fps (if fps_cond), is_image (always optional).
  """

  def __init__(self, *, channels: int = 3, image_size: int = 64, ch: int = 128,
               ch_mult: Sequence[int] = (1, 2, 4, 8),
               num_res_blocks: int | Sequence[int] = 2,
               attn_resolutions: Sequence[int] = (), cross_attn_resolutions: Sequence[int] = (),
               temporal_attn_resolutions: Sequence[int] | None = None,
               temporal_conv_resolutions: Sequence[int] = (), num_heads: int = 8,
               head_dim: int | None = None, num_buckets: int = 64, max_distance: int = 128,
               rel_bias_init_std: float = 0.0,
               text_dim: int | None = None, lowres_cond: bool = False,
               num_classes: int | None = None, fps_cond: bool = False,
               frame_index_cond: bool = False, coord_cond: bool = False,
               dropout: float = 0.0,
               emb_ch: int | None = None, out_channels: int | None = None,
               guidance_embedding: bool = False, scan_layers: bool = True,
               remat: str = "none", dtype=jnp.float32, in_channels: int | None = None,
               shard_activations: Callable | None = None, rngs: nnx.Rngs):
    levels = len(ch_mult)
    if levels < 1 or image_size % 2 ** (levels - 1):
      raise ValueError(f"image_size={image_size} must be divisible by 2^(len(ch_mult)-1)="
                       f"{2 ** (levels - 1)}; drop a level from ch_mult={tuple(ch_mult)}")
    blocks = _per_level(num_res_blocks, levels, "num_res_blocks")
    sizes = [image_size // 2 ** i for i in range(levels)]
    conv_at = set(temporal_conv_resolutions)
    attn_t_at = (set(sizes) - conv_at if temporal_attn_resolutions is None
                 else set(temporal_attn_resolutions))
    for name, res in (("attn_resolutions", attn_resolutions),
                      ("cross_attn_resolutions", cross_attn_resolutions),
                      ("temporal_attn_resolutions", attn_t_at),
                      ("temporal_conv_resolutions", conv_at)):
      if set(res) - set(sizes):
        raise ValueError(f"{name}={tuple(sorted(res))} lists sizes that no level has; the "
                         f"levels run at {sizes} for image_size={image_size}")
    if attn_t_at & conv_at:
      raise ValueError(f"levels {sorted(attn_t_at & conv_at)} are in both "
                       "temporal_attn_resolutions and temporal_conv_resolutions; a level has "
                       "one temporal layer kind: drop them from one of the two")
    if cross_attn_resolutions and text_dim is None:
      raise ValueError("cross_attn_resolutions needs text_dim (the width of "
                       "cond['text_emb']); set text_dim or drop the cross-attention")
    half = num_buckets // 2
    if half < 2 or max_distance <= half // 2:
      raise ValueError(f"num_buckets={num_buckets}, max_distance={max_distance}: need at "
                       "least 4 buckets and max_distance > num_buckets // 4 (T5 buckets)")
    emb_ch = 4 * ch if emb_ch is None else emb_ch
    widths = [ch * m for m in ch_mult]
    uses_attn = [s in attn_resolutions or s in cross_attn_resolutions or s in attn_t_at
                 for s in sizes]
    if head_dim is not None:
      bad = [w for w, used in zip(widths, uses_attn) if used and w % head_dim]
      if bad:
        raise ValueError(f"head_dim={head_dim} must divide the attention widths {bad}")
      heads = [w // head_dim for w in widths]
    else:
      heads = [num_heads] * levels
    bad = [w for w, h, used in zip(widths, heads, uses_attn) if used and w % h]
    bad += [emb_ch] if text_dim is not None and emb_ch % num_heads else []
    if bad:
      raise ValueError(f"num_heads={num_heads} must divide the attention widths {bad}")

    self.channels, self.ch, self.dtype, self.levels = channels, ch, dtype, levels
    self.out_channels = channels if out_channels is None else out_channels
    self.in_channels = channels if in_channels is None else in_channels
    self.text_dim, self.lowres_cond = text_dim, lowres_cond
    self.shard_activations = shard_activations
    self.cond_keys = ((("text_emb", "text_mask") if text_dim is not None else ()) +
                      (("lowres", "aug_logsnr") if lowres_cond else ()) +
                      (("label",) if num_classes is not None else ()) +
                      (("guidance_w",) if guidance_embedding else ()) +
                      (("fps",) if fps_cond else ()) + ("is_image",))

    # Conditioning modules under the names EfficientUNet's methods use.
    self._conditioning_modules(ch, emb_ch, text_dim=text_dim, lowres_cond=lowres_cond,
                               num_classes=num_classes, num_heads=num_heads, dtype=dtype,
                               rngs=rngs)

    def level_kw(i):
      temporal = ("attention" if sizes[i] in attn_t_at else
                  "conv" if sizes[i] in conv_at else None)
      return dict(emb_ch=emb_ch, temporal=temporal, self_attn=sizes[i] in attn_resolutions,
                  cross_attn=sizes[i] in cross_attn_resolutions, text_dim=text_dim,
                  num_heads=heads[i], num_buckets=num_buckets, max_distance=max_distance,
                  rel_bias_init_std=rel_bias_init_std,
                  dropout=dropout, scan_layers=scan_layers, remat=stack.check_remat(remat),
                  dtype=dtype, rngs=rngs)

    self.coord_cond = coord_cond
    in_ch = self.in_channels + (channels if lowres_cond else 0) + (2 if coord_cond else 0)
    self.conv_in = layers.conv(in_ch, ch, dtype=dtype, rngs=rngs)
    down, cur = [], ch
    for i in range(levels):
      down.append(VideoLevel(cur, widths[i], blocks[i], down=i > 0, up=False, **level_kw(i)))
      cur = widths[i]
    up = []
    for i in reversed(range(levels)):
      skip_ch = widths[i] if i < levels - 1 else 0  # the lowest level has no skip
      up.append(VideoLevel(cur + skip_ch, widths[i], blocks[i], down=False, up=i > 0,
                           **level_kw(i)))
      cur = widths[i]
    self.down, self.up = nnx.List(down), nnx.List(up)
    self._output_modules(cur, ch, emb_ch, guidance_embedding, dtype, rngs)
    # Created last, so that the other weights do not depend on this flag at a given seed.
    self.fps_emb = layers.EmbeddingMLP(ch, emb_ch, dtype=dtype, rngs=rngs) if fps_cond else None
    self.frame_emb = (layers.EmbeddingMLP(ch, emb_ch, dtype=dtype, rngs=rngs)
                      if frame_index_cond else None)

  # --- conditioning ---

  def embedding(self, logsnr, cond: dict, text):
    """The Efficient U-Net's [B, emb_ch] embedding, plus the frame-rate embedding."""
    emb = super().embedding(logsnr, cond, text)
    if self.fps_emb is None:
      return emb
    if "fps" not in cond:
      raise ValueError(f"{NAME} was built with fps_cond=True: pass cond['fps'] (float [B], "
                       "the clip's frames per second; a fixed value such as 0 for images)")
    fps = jnp.asarray(cond["fps"], jnp.float32)
    fps = jnp.broadcast_to(fps, logsnr.shape) if fps.ndim == 0 else fps
    if fps.shape != logsnr.shape:
      raise ValueError(f"cond['fps'] must have shape [B]={list(logsnr.shape)} (or be a "
                       f"scalar), got {list(fps.shape)}")
    feats = layers.sinusoidal_embedding(fps, self.ch).astype(self.dtype)
    return emb + self.fps_emb(feats).astype(emb.dtype)

  def frame_index_embedding(self, links) -> jax.Array:
    """[B, F, emb_ch]: MLP(sinusoidal(q)) for video frame q; zero for a frame linked to no
    other (an image of joint training, or the frame of a one-frame clip), so image frames
    stay the image net's."""
    feats = layers.sinusoidal_embedding(jnp.arange(links.shape[1], dtype=jnp.float32), self.ch)
    table = self.frame_emb(feats.astype(self.dtype))              # [F, emb_ch]
    video = links.sum(axis=-1) > 1
    return jnp.where(video[..., None], table[None], 0)

  def _constrain(self, h, batch: int, frames: int):
    """Constrains the [B, F, H, W, C] view of folded activations (vdm/nets/sharding.py, or
    the net's own `shard_activations` hook when it has one)."""
    hook = self.shard_activations
    if hook is None and sharding.active() is None:
      return h
    video = h.reshape((batch, frames) + h.shape[1:])
    video = sharding.constrain(video, VIDEO_AXES) if hook is None else hook(video, VIDEO_AXES)
    return video.reshape(h.shape)

  # --- forward ---

  def __call__(self, z, logsnr, cond=None, *, dropout_key=None):
    logsnr = _check_video_inputs(z, logsnr, self.in_channels)
    b, f, hh, ww, _ = z.shape
    factor = 2 ** (self.levels - 1)
    if hh % factor or ww % factor:
      raise ValueError(f"{NAME}: H, W = {(hh, ww)} must be divisible by {factor} "
                       "(2^(len(ch_mult)-1))")
    cond = layers.check_cond_keys(cond, self.cond_keys, NAME)
    links = frame_links(cond.get("is_image"), b, f)
    h = self._input(z, cond)
    if self.coord_cond:
      h = jnp.concatenate([h, coordinate_channels(h.shape[:-1], h.dtype)], axis=-1)
    text = self.text_tokens(cond, b) if self.text_dim is not None else None
    emb = self.embedding(logsnr, cond, text)
    # Fold the frames into the batch (frame-minor): one embedding and text per example.
    per_frame = lambda a: jnp.repeat(a, f, axis=0)
    emb = per_frame(emb)
    if self.frame_emb is not None:
      emb = emb + self.frame_index_embedding(links).reshape(b * f, -1).astype(emb.dtype)
    text = None if text is None else tuple(per_frame(a) for a in text)
    keys = layers.split_key(dropout_key, 2 * self.levels)

    h = h.reshape((b * f,) + h.shape[2:]).astype(self.dtype)
    with sharding.use(sharding.folding_frames(sharding.active())):  # [B * F, ...] below
      h = self._constrain(self.conv_in(h), b, f)
      skips = []
      for level, key in zip(self.down, keys[:self.levels]):
        h = self._constrain(level(h, emb, links, text, key), b, f)
        skips.append(h)
      skips[-1] = None  # the lowest level continues without a skip
      for level, key, skip in zip(self.up, keys[self.levels:], reversed(skips)):
        h = h if skip is None else jnp.concatenate([h, skip], axis=-1)
        h = self._constrain(level(h, emb, links, text, key), b, f)
      out = self.conv_out(jax.nn.swish(self.norm_out(h))).astype(z.dtype)
      return self._constrain(out, b, f).reshape(b, f, hh, ww, self.out_channels)
