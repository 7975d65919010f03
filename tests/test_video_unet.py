"""Tests for imagen/video_unet.py (Ho et al. 2022, "Video Diffusion Models", sec. 3): image
frames equal single-frame clips (joint training mask), temporal mixing of video frames, the
temporal attention and convolution against numpy references (relative position bias, image
mask, permutation equivariance without the bias), zero temporal layers at init, text and fps
conditioning, logical axis names and the frame-axis hook, scanned == unrolled, parameter
count, bad inputs.

Compiles dominate the time: every net call shares one shape (B=3 clips of F=4 frames), so it
compiles once, and conditions vary by value, not by structure. Parameters come from numpy
(`random_params`): the tests check what may depend on what, which holds for any values."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen import video_unet as vu
from imagen.efficient_unet import EfficientUNet
from imagen.unet_presets import video_unet_config
from launch import mesh as mesh_lib
from vdm.nets import layers

B, F, H, C, L, T = 3, 4, 8, 2, 3, 6  # clips, frames, image size, channels, text length, width
# Clip 0 is a video, clip 1 four independent images, clip 2 the paper's joint layout
# (sec. 4.3.1): two video frames followed by two independent images.
IS_IMAGE = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1]], bool)
MASK = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0]], np.int32)

# Temporal convolutions at 8x8 (level 0), temporal attention at 4x4 (level 1, whose two
# up-path blocks are one scanned stack), self- and cross-attention at 4x4, fps input.
KW = dict(channels=C, image_size=H, ch=8, ch_mult=(1, 2), num_res_blocks=(1, 2),
          attn_resolutions=(4,), cross_attn_resolutions=(4,), temporal_attn_resolutions=(4,),
          temporal_conv_resolutions=(8,), num_heads=2, text_dim=T, fps_cond=True)


def key(seed):
  return jax.random.key(seed, impl="unsafe_rbg")  # compiles faster than threefry on CPU


def make(**kw):
  return vu.VideoUNet(**{**KW, **kw}, rngs=nnx.Rngs(key(0)))


def random_params(abstract, seed=1, scale=0.2):
  """A copy of an (abstract) module with numpy parameters: N(1, scale^2) for norm scales,
  N(0, scale^2) for everything else, so no layer sits at a zero init."""
  rng = np.random.default_rng(seed)
  draw = lambda path, v: v.replace(jnp.asarray(
      rng.normal(1. if path[-1] == "scale" else 0., scale, v.get_value().shape), jnp.float32))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  params = nnx.from_flat_state([(path, draw(path, v))
                                for path, v in nnx.to_flat_state(params)])
  return nnx.merge(graphdef, params, rest)


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  z, logsnr = f(B, F, H, H, C), jnp.asarray([4., -1., 2.], jnp.float32)
  cond = {"text_emb": f(B, L, T), "text_mask": jnp.asarray(MASK),
          "fps": jnp.asarray([8., 24., 0.]), "is_image": jnp.asarray(IS_IMAGE)}
  return z, logsnr, cond


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, z, logsnr, cond):
  return nnx.merge(graphdef, state)(z, logsnr, cond)


def apply(model, z, logsnr, cond):
  """The functional path: nnx.split outside, nnx.merge inside jax.jit."""
  return np.asarray(_apply(*nnx.split(model), z, logsnr, cond))


@pytest.fixture(scope="module")
def abstract():
  return nnx.eval_shape(make)


@pytest.fixture(scope="module")
def model(abstract):
  return random_params(abstract)


@pytest.fixture(scope="module")
def base(model):
  return apply(model, *inputs())


def as_single_frames(model, z, logsnr, cond):
  """The net on every frame alone, as B * F one-frame clips with their clip's conditions,
  reshaped back to [B, F, ...]."""
  per_frame = lambda a: jnp.repeat(a, F, axis=0)
  return apply(model, z.reshape(B * F, 1, H, H, C), per_frame(logsnr),
               {"text_emb": per_frame(cond["text_emb"]),
                "text_mask": per_frame(cond["text_mask"]), "fps": per_frame(cond["fps"]),
                "is_image": jnp.zeros((B * F, 1), bool)}).reshape(z.shape[:2] + (H, H, C))


def differ(a, b):
  return np.abs(a - b).max() > 1e-3


# --- joint image-video training (Ho et al. sec. 3.2) ----------------------------------------


def test_image_frames_equal_single_frame_clips(model, base):
  """Each image frame's output is the net on that frame alone, as a one-frame clip (whose
  temporal layers have nothing to mix); video frames differ from it."""
  z, logsnr, cond = inputs()
  single = as_single_frames(model, z, logsnr, cond)
  np.testing.assert_allclose(base[IS_IMAGE], single[IS_IMAGE], rtol=0,
                             atol=1e-5 * np.abs(base).max())
  for b, f in zip(*np.nonzero(~IS_IMAGE)):
    assert differ(base[b, f], single[b, f]), (b, f)


def test_video_frames_mix_and_image_frames_do_not(model, base):
  """Changing frame 1 changes every frame linked to it and, bit for bit, no other frame:
  the image mask removes the paths exactly (Ho et al.: "fixing the attention matrix")."""
  z, logsnr, cond = inputs()
  moved = apply(model, z.at[:, 1].add(1.), logsnr, cond)
  for b in range(B):
    for f in range(F):
      if f == 1 or not (IS_IMAGE[b, 1] or IS_IMAGE[b, f]):
        assert differ(moved[b, f], base[b, f]), (b, f)
      else:
        np.testing.assert_array_equal(moved[b, f], base[b, f])


def test_frame_links():
  links = np.asarray(vu.frame_links(jnp.asarray([False, True]), 2, 3))  # per clip [B]
  np.testing.assert_array_equal(links[0], np.ones((3, 3), bool))
  np.testing.assert_array_equal(links[1], np.eye(3, dtype=bool))
  paper = np.asarray(vu.frame_links(jnp.asarray([[0, 0, 1]]), 1, 3))[0]  # per frame [B, F]
  np.testing.assert_array_equal(paper, [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
  np.testing.assert_array_equal(vu.frame_links(None, 2, 3), np.ones((2, 3, 3), bool))


# --- the temporal layers against numpy ------------------------------------------------------


def group_norm(x, scale, bias, eps=1e-6):
  """numpy GroupNorm of [N, H, W, C] per example (groups as layers.num_groups)."""
  n, h, w, c = x.shape
  g = layers.num_groups(c)
  xg = x.reshape(n, h, w, g, c // g)
  mean, var = xg.mean(axis=(1, 2, 4), keepdims=True), xg.var(axis=(1, 2, 4), keepdims=True)
  return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def links_np(flags):
  video = ~flags
  return (video[:, :, None] & video[:, None, :]) | np.eye(flags.shape[1], dtype=bool)


def value(module, *path):
  for name in path:
    module = getattr(module, name)
  return np.asarray(module[...], np.float64)


def temporal_attention_np(layer, x, flags, heads):
  """x + W_o softmax(q k^T / sqrt(d) + bias[bucket(k - q)]; links) v at every position.
  With 64 buckets and |k - q| < 16 the T5 bucket is |k - q|, plus 32 when k > q."""
  _, hh, ww, c = x.shape
  b, f = flags.shape
  n = group_norm(x, value(layer, "norm", "norm", "scale"), value(layer, "norm", "norm", "bias"))
  n = n.reshape(b, f, hh * ww, c)
  proj = lambda name: (n @ value(layer, name, "kernel") + value(layer, name, "bias")).reshape(
      b, f, hh * ww, heads, c // heads)
  q, k, v = proj("q"), proj("k"), proj("v")
  rel = np.arange(f)[None, :] - np.arange(f)[:, None]  # [q, k] = k - q
  bias = value(layer, "rel_bias")[np.abs(rel) + 32 * (rel > 0)]  # [q, k, heads]
  logits = np.einsum("bqphd,bkphd->bphqk", q, k) / np.sqrt(c // heads)
  logits = logits + bias.transpose(2, 0, 1)[None, None]
  logits = np.where(links_np(flags)[:, None, None], logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  a = np.einsum("bphqk,bkphd->bqphd", w, v).reshape(b, f, hh * ww, c)
  return x + (a @ value(layer, "out", "kernel") + value(layer, "out", "bias")).reshape(x.shape)


def temporal_conv_np(layer, x, flags):
  """x_q + bias + sum over j in {-1, 0, 1}, q + j inside the clip and linked to q, of
  W[j + 1] n_(q+j), with n = swish(GroupNorm(x))."""
  b, f = flags.shape
  n = group_norm(x, value(layer, "norm", "norm", "scale"), value(layer, "norm", "norm", "bias"))
  n = (n / (1 + np.exp(-n))).reshape((b, f) + x.shape[1:])
  w, links = value(layer, "kernel"), links_np(flags)
  out = np.zeros_like(n) + value(layer, "bias")
  for q in range(f):
    for j in (-1, 0, 1):
      if 0 <= q + j < f:
        linked = links[:, q, q + j, None, None, None]
        out[:, q] += np.where(linked, n[:, q + j] @ w[j + 1], 0.)
  return x + out.reshape(x.shape)


@functools.partial(jax.jit, static_argnums=0)
def _run_layer(graphdef, state, x, links):
  return nnx.merge(graphdef, state)(x, links)


def run_layer(layer, x, flags):
  links = vu.frame_links(jnp.asarray(flags), *flags.shape)
  return np.asarray(_run_layer(*nnx.split(layer), jnp.asarray(x), links), np.float64)


def initialised(make_layer):
  """The layer at its real init (one jitted init) and with numpy random parameters."""
  graphdef, _ = nnx.split(nnx.eval_shape(make_layer))
  fresh = nnx.merge(graphdef, jax.jit(lambda: nnx.state(make_layer()))())
  return fresh, random_params(fresh, seed=2, scale=0.4)


def test_temporal_attention_matches_numpy_and_is_equivariant_but_for_the_bias():
  heads, c = 2, 8
  fresh, layer = initialised(lambda: vu.TemporalAttention(
      c, num_heads=heads, num_buckets=64, max_distance=128, rngs=nnx.Rngs(key(1))))
  x = np.random.default_rng(3).standard_normal((B * F, 2, 2, c)).astype(np.float32)
  np.testing.assert_array_equal(run_layer(fresh, x, IS_IMAGE), x)  # zero W_o: identity
  np.testing.assert_allclose(run_layer(layer, x, IS_IMAGE),
                             temporal_attention_np(layer, x.astype(np.float64), IS_IMAGE, heads),
                             rtol=1e-4, atol=1e-4)
  # Frame order enters only through the bias: without it, permuting the frames of a video
  # permutes the output; with it, it does not.
  video, perm = np.zeros((B, F), bool), np.array([2, 0, 3, 1])
  permute = lambda a: a.reshape((B, F) + a.shape[1:])[:, perm].reshape(a.shape)
  assert differ(run_layer(layer, permute(x), video), permute(run_layer(layer, x, video)))
  layer.rel_bias[...] = jnp.zeros_like(layer.rel_bias[...])
  np.testing.assert_allclose(run_layer(layer, permute(x), video),
                             permute(run_layer(layer, x, video)), rtol=0, atol=1e-5)


def test_temporal_conv_matches_numpy():
  fresh, layer = initialised(lambda: vu.TemporalConv(4, rngs=nnx.Rngs(key(2))))
  x = np.random.default_rng(4).standard_normal((B * F, 3, 3, 4)).astype(np.float32)
  np.testing.assert_array_equal(run_layer(fresh, x, IS_IMAGE), x)  # zero kernel: identity
  np.testing.assert_allclose(run_layer(layer, x, IS_IMAGE),
                             temporal_conv_np(layer, x.astype(np.float64), IS_IMAGE),
                             rtol=1e-4, atol=1e-4)


# --- conditioning ----------------------------------------------------------------------------


def test_text_and_fps_reach_the_output(model, base):
  z, logsnr, cond = inputs()
  text = np.array(cond["text_emb"])
  text[0, 1] = np.random.default_rng(9).normal(size=T)   # an unmasked token of clip 0
  out = apply(model, z, logsnr, {**cond, "text_emb": jnp.asarray(text)})
  assert differ(out[0], base[0])
  np.testing.assert_array_equal(out[1:], base[1:])
  out = apply(model, z, logsnr, {**cond, "fps": cond["fps"].at[1].set(12.)})
  assert differ(out[1], base[1])
  np.testing.assert_array_equal(out[[0, 2]], base[[0, 2]])
  # Dropped text (an all-masked row, guidance.drop_text): the clip sees the null token
  # only, whatever its embeddings hold; with its text it differed.
  dropped = {**cond, "text_mask": cond["text_mask"].at[2].set(0)}
  junk = {**dropped, "text_emb": cond["text_emb"].at[2].set(7.)}
  out_dropped = apply(model, z, logsnr, dropped)
  np.testing.assert_array_equal(apply(model, z, logsnr, junk)[2], out_dropped[2])
  assert differ(out_dropped[2], base[2])


def test_frame_index_embedding_tells_video_frames_apart_and_leaves_images_alone():
  """A clip of one frame repeated, with every temporal layer zeroed (frames cannot mix):
  without frame_index_cond every frame gives the same output; with it each video frame
  differs (it knows its index) while image frames stay equal to each other and to the
  single-frame net, as joint training needs."""
  z, logsnr, cond = inputs()
  same = jnp.repeat(z[:, :1], F, axis=1)

  def frozen_time(net):   # zero the temporal attention and convolution weights
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    flat = [(p, v.replace(jnp.zeros_like(v.get_value()))
             if any(str(k).startswith("temporal") for k in p) else v)
            for p, v in nnx.to_flat_state(params)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)

  plain = apply(frozen_time(random_params(nnx.eval_shape(make))), same, logsnr, cond)
  for b in range(B):
    np.testing.assert_allclose(plain[b], np.broadcast_to(plain[b, :1], plain[b].shape),
                               atol=1e-5 * np.abs(plain).max())
  net = frozen_time(random_params(nnx.eval_shape(lambda: make(frame_index_cond=True))))
  out = apply(net, same, logsnr, cond)
  for b in range(B):
    video = np.flatnonzero(~IS_IMAGE[b])
    images = np.flatnonzero(IS_IMAGE[b])
    for i in video:
      for j in range(F):
        if j != i:
          assert differ(out[b, i], out[b, j]), (b, i, j)
    for i in images[1:]:
      np.testing.assert_allclose(out[b, i], out[b, images[0]], atol=1e-5 * np.abs(out).max())
  single = as_single_frames(net, same, logsnr, cond)
  np.testing.assert_allclose(out[IS_IMAGE], single[IS_IMAGE], rtol=0,
                             atol=1e-5 * np.abs(out).max())


# --- parameters, sharding, scanning -----------------------------------------------------------


def test_every_param_has_logical_axis_names(abstract):
  flat = dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
  for path, var in flat.items():
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == len(var.get_value().shape), (path, names)
    for rules in ("fsdp", "tensor"):  # the mesh's rule sets map every name
      mesh_lib.logical_to_mesh_spec(names, rules)
    if "layers" in path:  # a scanned stack: the leading layer axis is unnamed
      assert names[0] is None, (path, names)
      names = names[1:]
    named = [n for n in names if n is not None]
    assert named and set(named) <= set(layers.LOGICAL_AXES), (path, names)
    if path[-1] == "rel_bias":
      assert tuple(names) == vu.REL_BIAS == (None, "heads")
    if path[-2:] == ("temporal", "kernel"):
      assert tuple(names) == vu.TEMPORAL_CONV_KERNEL == (None, "conv_in", "conv_out")
  leaves = {path[-1] for path in flat}
  assert "rel_bias" in leaves and any(p[-2:] == ("temporal", "kernel") for p in flat)


def test_activation_hook_sees_the_frame_axis(abstract):
  seen = []
  net = nnx.clone(abstract)
  net.shard_activations = lambda x, names: seen.append((names, x.shape)) or x
  graphdef, state = nnx.split(net)
  jax.eval_shape(lambda s: nnx.merge(graphdef, s)(*inputs()), state)
  assert len(seen) == 1 + 2 * 2 + 1  # input, after each of the 4 levels, output
  assert all(names == vu.VIDEO_AXES == ("batch", "frames", "height", "width", "channels")
             for names, _ in seen)
  assert all(shape[:2] == (B, F) for _, shape in seen)
  assert [shape[2] for _, shape in seen] == [H, H, H // 2, H, H, H]  # up level 1 upsamples


def test_scanned_equals_unrolled_with_remat():
  """One parameter layout (a level of 2 equal space-time blocks with temporal attention: one
  scanned stack): an unrolled loop with per-block recomputation gives the scanned level's
  values, dropout on (the per-block dropout keys reach the same blocks)."""
  kw = dict(down=False, up=False, temporal="attention", self_attn=False, cross_attn=False,
            text_dim=None, num_heads=2, num_buckets=64, max_distance=128, emb_ch=8,
            dropout=0.5, dtype=jnp.float32)
  build = lambda **k: vu.VideoLevel(8, 8, 2, **kw, **k, rngs=nnx.Rngs(key(0)))
  scanned = random_params(nnx.eval_shape(lambda: build(scan_layers=True, remat="none")))
  unrolled = nnx.eval_shape(lambda: build(scan_layers=False, remat="block"))
  unrolled = nnx.merge(nnx.split(unrolled)[0], nnx.state(scanned))
  rng = np.random.default_rng(6)
  args = (jnp.asarray(rng.standard_normal((B * F, 2, 2, 8)), jnp.float32),
          jnp.asarray(rng.standard_normal((B * F, 8)), jnp.float32),
          vu.frame_links(jnp.asarray(IS_IMAGE), B, F), None, key(5))
  run = jax.jit(lambda graphdef, state, *a: nnx.merge(graphdef, state)(*a),
                static_argnums=0)
  out_s = np.asarray(run(*nnx.split(scanned), *args))
  out_u = np.asarray(run(*nnx.split(unrolled), *args))
  np.testing.assert_allclose(out_u, out_s, rtol=0, atol=1e-5 * np.abs(out_s).max())
  other_key = np.asarray(run(*nnx.split(scanned), *args[:-1], key(6)))
  assert differ(other_key, out_s)  # dropout was active


def test_param_count_is_the_image_net_plus_the_temporal_layers(abstract):
  """The test net = the Efficient U-Net of the same config + 2 temporal convolutions (8
  channels: one per ResBlock of level 0, down and up) + 4 temporal attentions (16 channels,
  2 heads, 64 buckets: level 1) + the fps MLP (8 -> 32 -> 32)."""
  image_kw = {k: v for k, v in KW.items() if k not in (
      "temporal_attn_resolutions", "temporal_conv_resolutions", "fps_cond")}
  image_net = nnx.eval_shape(lambda: EfficientUNet(**image_kw, rngs=nnx.Rngs(0)))
  count = lambda net: sum(x.size for x in jax.tree.leaves(nnx.state(net, nnx.Param)))
  dense = lambda i, o: i * o + o
  conv_t = lambda c: 2 * c + 3 * c * c + c                # norm, kernel [3, c, c], bias
  attn_t = lambda c, heads: 2 * c + 4 * dense(c, c) + 64 * heads  # norm, q/k/v/out, bias
  expected = (count(image_net) + 2 * conv_t(8) + 4 * attn_t(16, 2) + dense(8, 32)
              + dense(32, 32))
  assert count(abstract) == expected


# --- bad input ---------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(abstract):
  graphdef, state = nnx.split(abstract)
  net = lambda *args: jax.eval_shape(lambda s: nnx.merge(graphdef, s)(*args), state)
  z, logsnr, cond = inputs()
  with pytest.raises(ValueError, match=r"\[B, F, H, W, C\].*z\[:, None\]"):
    net(z[:, 0], logsnr, cond)
  with pytest.raises(ValueError, match=r"is_image.*\[B, F\]"):
    net(z, logsnr, {**cond, "is_image": jnp.zeros((B, F + 1), bool)})
  with pytest.raises(ValueError, match="is_image.*bool"):
    net(z, logsnr, {**cond, "is_image": jnp.zeros((B,), jnp.float32)})
  with pytest.raises(ValueError, match=r"fps_cond=True.*cond\['fps'\]"):
    net(z, logsnr, {k: v for k, v in cond.items() if k != "fps"})
  with pytest.raises(ValueError, match="both temporal_attn_resolutions and temporal_conv"):
    make(temporal_conv_resolutions=(4,))
  with pytest.raises(ValueError, match=r"temporal_conv_resolutions=\(16,\).*no level"):
    make(temporal_conv_resolutions=(16,))
  with pytest.raises(ValueError, match="head_dim=3"):
    make(head_dim=3)
  with pytest.raises(ValueError, match="unknown video U-Net preset"):
    video_unet_config("ho_16x128x128")


# --- the arrow of time ------------------------------------------------------------------------


def mirrored(net):
  """`net` with every temporal layer made blind to the direction of time: the relative bias
  B[h, r] set to B[h, -r] (T5's bidirectional buckets: bucket(r) = half * [r > 0] + g(|r|),
  so the upper half of the table copies the lower) and the temporal conv's tap on the
  next frame set to its tap on the previous one."""
  graphdef, params, rest = nnx.split(net, nnx.Param, ...)

  def mirror(path, v):
    a = np.array(v.get_value())
    if path[-1] == "rel_bias":
      half = a.shape[-2] // 2
      a[..., half:, :] = a[..., :half, :]
    elif path[-2:] == ("temporal", "kernel"):
      a[..., 2, :, :] = a[..., 0, :, :]
    return v.replace(jnp.asarray(a))

  flat = [(p, mirror(p, v)) for p, v in nnx.to_flat_state(params)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def test_mirror_symmetric_temporal_layers_cannot_tell_forwards_from_backwards():
  """Played backwards, a clip gives the backwards output exactly when the temporal layers are
  mirror-symmetric: a zero-initialised bias starts the net there, where a caption's "left"
  and "right" give the same distribution of motion signs. The random init
  (rel_bias_init_std) starts it off that point."""
  z, logsnr, cond = inputs()
  cond = {**cond, "is_image": jnp.zeros((B, F), bool)}
  backwards = lambda a: np.asarray(a)[:, ::-1]
  net = random_params(nnx.eval_shape(make))
  assert differ(apply(net, backwards(z), logsnr, cond), backwards(apply(net, z, logsnr, cond)))
  sym = mirrored(net)
  np.testing.assert_allclose(apply(sym, backwards(z), logsnr, cond),
                             backwards(apply(sym, z, logsnr, cond)), rtol=0, atol=1e-4)

  def init_bias(std):
    layer = jax.jit(lambda: nnx.state(vu.TemporalAttention(
        8, num_heads=2, num_buckets=64, max_distance=128, bias_init_std=std,
        rngs=nnx.Rngs(key(5)))))()
    return np.asarray(layer["rel_bias"].get_value())

  np.testing.assert_array_equal(init_bias(0.0), 0.0)
  bias = init_bias(1.0)
  assert np.abs(bias[33:40] - bias[1:8]).min() > 1e-3   # B[h, r] != B[h, -r], r = 1..7
  assert 0.7 < bias.std() < 1.3


def test_coordinate_channels_are_the_pixel_grid_given_as_two_more_inputs():
  """coord_cond: the net is the plain net whose input has two more channels, holding each
  pixel's row and column from -1 to 1 (CoordConv)."""
  grid = np.asarray(vu.coordinate_channels((2, 3, 5, 4), jnp.float32))
  assert grid.shape == (2, 3, 5, 4, 2)
  np.testing.assert_allclose(grid[1, 2, :, 0, 0], np.linspace(-1, 1, 5), atol=1e-6)
  np.testing.assert_allclose(grid[0, 1, 3, :, 1], np.linspace(-1, 1, 4), atol=1e-6)
  np.testing.assert_array_equal(grid[..., 0], np.broadcast_to(grid[:1, :1, :, :1, 0],
                                                              grid.shape[:-1]))
  z, logsnr, cond = inputs()
  coords = random_params(nnx.eval_shape(lambda: make(coord_cond=True)))
  plain = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: make(in_channels=C + 2))),
                    nnx.state(coords))
  rows, cols = np.meshgrid(np.linspace(-1, 1, H), np.linspace(-1, 1, H), indexing="ij")
  extra = np.broadcast_to(np.stack([rows, cols], -1), (B, F, H, H, 2)).astype(np.float32)
  np.testing.assert_allclose(apply(coords, z, logsnr, cond),
                             apply(plain, jnp.concatenate([z, extra], -1), logsnr, cond),
                             rtol=1e-5, atol=1e-5)
