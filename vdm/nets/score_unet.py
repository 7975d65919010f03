"""The VDM score network (Kingma et al. 2021, google-research/vdm `ScoreUNet`).

A U-Net without down/up-sampling: every block runs at the input resolution, which is what
VDM uses for likelihood on CIFAR-10 (n_layer=32, 128 channels). Input conditioning:

  time:   t_in = (gamma - gamma_min) / (gamma_max - gamma_min), gamma = -logsnr,
          emb = Dense(swish(Dense(sinusoidal(1000 t_in, ch)))), width 4 ch;
          plus a learned class embedding when num_classes is set.
  pixels: concat(z, fourier_features(z, range(fourier_min, fourier_max + 1))) (VDM app. C).

With `base_measure=True` (eps-parameterization only) the output is z + h, h from a
zero-initialised conv, so at initialisation eps-hat = z exactly, as in VDM's code.

Scanned layers (vdm/nets/stack.py): the n_layer down blocks (each with its optional
attention) are one `Stack` with parameters stacked on a leading [n_layer] axis, and the
n_layer + 1 up blocks another, which consumes the skips in reverse as its scan inputs.
`scan_layers` picks lax.scan or an unrolled loop over the same parameters; `remat` the
recomputation policy. The middle blocks stay single modules.

For distillation: `out_channels=2 * channels` serves the "both" parameterization (x_tilde
and eps_tilde, Salimans & Ho 2022 sec. 4; `process.predict`), and `guidance_embedding=True`
adds an embedding of cond["guidance_w"] to the time embedding (`layers.GuidanceEmbedding`,
Meng et al. 2023 sec. 3.1), zero at init.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from vdm.nets import layers, stack
from vdm.nets.unet import ResAttention


class ScoreUNet(nnx.Module):
  """VDM score U-Net; `__call__(z, logsnr, cond=None, *, dropout_key=None)` -> [B, H, W,
  out_channels].

  Args:
    channels: image channels C of z.
    in_channels: channels of the net's input (default C; 2 C for a self-conditioned model,
      whose input is [z, x_self], vdm/model.py); the base measure adds its first C.
    out_channels: output channels (default C; 2 C for the "both" parameterization).
    ch: width n_embd of every block; the embedding is 4 * ch wide.
    n_layer: number of down ResNet blocks (n_layer + 1 up blocks consume the skips).
    dropout: dropout rate inside the ResNet blocks (active only with a dropout_key).
    with_attention: self-attention after every down/up block (the middle block always has
      one).
    num_heads: attention heads (VDM uses 1).
    fourier_min, fourier_max: inclusive exponent range of the Fourier features; set
      fourier_max < fourier_min (or use_fourier=False) to disable them.
    use_fourier: whether to append Fourier features of z.
    gamma_min, gamma_max: the range used to normalise gamma = -logsnr to t_in.
    num_classes: if set, cond["label"] (int [B]) selects a class embedding added to the
      time embedding; label -1 or num_classes, or no label at all, is the null class.
    base_measure: return z + net(z) (eps-parameterization only; needs out_channels = C).
    guidance_embedding: if True, cond["guidance_w"] (float [B]) is required and its
      embedding (zero at init) is added to the time embedding.
    scan_layers: run the down and up stacks with jax.lax.scan (one compiled block) rather
      than an unrolled loop; same parameters, values and gradients either way.
    remat: "none" | "block" | "dots": activation recomputation per block (stack.py).
    dtype: compute dtype (params stay float32; norms and embeddings are float32).
  """

  def __init__(self, *, channels: int = 3, ch: int = 128, n_layer: int = 32,
               dropout: float = 0.0, with_attention: bool = False, num_heads: int = 1,
               fourier_min: int = 6, fourier_max: int = 7, use_fourier: bool = True,
               gamma_min: float = -13.3, gamma_max: float = 5.0,
               num_classes: int | None = None, base_measure: bool = True,
               out_channels: int | None = None, guidance_embedding: bool = False,
               scan_layers: bool = True, remat: str = "none", dtype=jnp.float32,
               in_channels: int | None = None, rngs: nnx.Rngs):
    if gamma_max <= gamma_min:
      raise ValueError(f"need gamma_min < gamma_max, got {gamma_min}, {gamma_max}")
    if n_layer < 0:
      raise ValueError(f"n_layer must be >= 0, got {n_layer}")
    out_channels = channels if out_channels is None else out_channels
    if base_measure and out_channels != channels:
      raise ValueError(f"base_measure=True returns z + net(z), so it needs out_channels = "
                       f"channels = {channels}, got out_channels={out_channels}; it is for "
                       f"the eps-parameterization only: pass base_measure=False")
    self.channels, self.out_channels, self.ch, self.dtype = channels, out_channels, ch, dtype
    self.in_channels = channels if in_channels is None else in_channels
    self.gamma_min, self.gamma_max = gamma_min, gamma_max
    self.base_measure = base_measure
    self.exponents = tuple(range(fourier_min, fourier_max + 1)) if use_fourier else ()
    emb_dim = 4 * ch

    self.temb = layers.EmbeddingMLP(ch, emb_dim, dtype=dtype, rngs=rngs)
    self.class_emb = (layers.ClassEmbedding(num_classes, emb_dim, rngs=rngs)
                      if num_classes is not None else None)

    in_ch = self.in_channels * (1 + 2 * len(self.exponents))
    self.conv_in = layers.conv(in_ch, ch, dtype=dtype, rngs=rngs)

    block = lambda cin, r: layers.ResBlock(cin, ch, emb_dim, dropout=dropout, dtype=dtype,
                                           rngs=r)
    unit = lambda cin: lambda r: ResAttention(
        block(cin, r), layers.AttentionBlock(ch, num_heads=num_heads, dtype=dtype, rngs=r)
        if with_attention else None)
    scan = dict(scan=scan_layers, remat=stack.check_remat(remat), rngs=rngs)
    self.n_layer = n_layer
    self.down = stack.Stack(unit(ch), n_layer, **scan) if n_layer else None
    self.mid1 = block(ch, rngs)
    self.mid_attn = layers.AttentionBlock(ch, num_heads=num_heads, dtype=dtype, rngs=rngs)
    self.mid2 = block(ch, rngs)
    # Up blocks see the concatenation of the running state and a skip: 2 ch inputs.
    self.up = stack.Stack(unit(2 * ch), n_layer + 1, **scan)
    self.norm_out = layers.GroupNorm(ch, rngs=rngs)
    self.conv_out = layers.conv(ch, out_channels, zero_init=True, dtype=dtype, rngs=rngs)
    # Created last, so that the other weights do not depend on this flag at a given seed.
    self.guidance_emb = (layers.GuidanceEmbedding(ch, emb_dim, dtype=dtype, rngs=rngs)
                         if guidance_embedding else None)

  def embedding(self, logsnr, cond: dict):
    """The [B, 4 ch] conditioning embedding from logsnr, an optional class label and an
    optional guidance weight."""
    gamma = -logsnr
    t_in = (gamma - self.gamma_min) / (self.gamma_max - self.gamma_min)
    emb = self.temb(layers.sinusoidal_embedding(1000. * t_in, self.ch).astype(self.dtype))
    if self.class_emb is not None:
      label = cond.get("label", self.class_emb.null_labels(logsnr.shape[0]))
      emb = emb + self.class_emb(label, logsnr.shape[0]).astype(emb.dtype)
    if self.guidance_emb is not None:
      emb = emb + self.guidance_emb(cond, logsnr.shape[0], "ScoreUNet").astype(emb.dtype)
    return emb

  def __call__(self, z, logsnr, cond=None, *, dropout_key=None):
    logsnr = layers.check_inputs(z, logsnr, self.in_channels, "ScoreUNet")
    allowed = (("label",) if self.class_emb is not None else ()) + (
        ("guidance_w",) if self.guidance_emb is not None else ())
    cond = layers.check_cond_keys(cond, allowed, "ScoreUNet")
    emb = self.embedding(logsnr, cond)

    h = z
    if self.exponents:
      h = jnp.concatenate([z, layers.fourier_features(z, self.exponents)], axis=-1)
    # One dropout key per block, in the order down, mid1, mid2, up (scan inputs per stack).
    n = self.n_layer
    keys = stack.block_keys(dropout_key, 2 * n + 3)
    down_keys, mid_keys, up_keys = (None, (None, None), None) if keys is None else (
        keys[:n], keys[n:n + 2], keys[n + 2:])

    h = self.conv_in(h.astype(self.dtype))
    skips = h[None]                                     # [1 + n_layer, B, H, W, ch]
    if self.down is not None:
      def down(unit, h, key):  # the output runs on and is kept as a skip
        h = unit(h, emb, key)
        return h, h

      h, ys = self.down(down, h, down_keys)
      skips = jnp.concatenate([skips, ys])

    h = self.mid1(h, emb, dropout_key=mid_keys[0])
    h = self.mid_attn(h)
    h = self.mid2(h, emb, dropout_key=mid_keys[1])

    # The up blocks take the skips last-in first-out: scan over them reversed.
    up = lambda unit, h, x: (unit(jnp.concatenate([h, x[0]], axis=-1), emb, x[1]), None)
    h, _ = self.up(up, h, (skips[::-1], up_keys))

    h = self.conv_out(jax.nn.swish(self.norm_out(h))).astype(z.dtype)
    return z[..., :self.channels] + h if self.base_measure else h
