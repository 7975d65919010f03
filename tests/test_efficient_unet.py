"""Tests for imagen/efficient_unet.py: shape and zero init, split/merge under jit, text
masking and the no-text (classifier-free guidance) behaviour, low-resolution and
augmentation conditioning, the 1/sqrt(2) residual scale, the Efficient U-Net's resampling
order, batch independence, logical partition specs, and a hand count of parameters."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen import efficient_unet as eu
from imagen.efficient_unet import EfficientUNet
from imagen.unet_presets import efficient_unet_config, param_count
from tests.net_helpers import perturb
from vdm.nets import layers

B, H, C, L, T = 3, 16, 2, 5, 8  # batch, image size, channels, text length, text width
MASK = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.int32)


def key(seed):
  """'unsafe_rbg' keys: XLA compiles them much faster than threefry on CPU."""
  return jax.random.key(seed, impl="unsafe_rbg")


def make(name="tiny_sr", **kw):
  """tiny_sr (16x16, ch 16, mult (1, 2), blocks (1, 2), cross-attention at 8, lowres)
  plus self-attention at 8, 4 classes and dropout: every kind of layer."""
  args = {**efficient_unet_config(name), "channels": C, "attn_resolutions": (8,),
          "num_classes": 4, "dropout": 0.3, **kw}
  return EfficientUNet(**args, rngs=nnx.Rngs(key(0)))


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  z, logsnr = f(B, H, H, C), jnp.asarray(rng.uniform(-8., 8., B), jnp.float32)
  cond = {"lowres": f(B, H, H, C), "aug_logsnr": jnp.asarray([6., 2., -1.], jnp.float32),
          "text_emb": f(B, L, T), "text_mask": jnp.asarray(MASK),
          "label": jnp.asarray([0, 3, -1], jnp.int32)}
  return z, logsnr, cond


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, z, logsnr, cond, dkey):
  return nnx.merge(graphdef, state)(z, logsnr, cond, dropout_key=dkey)


def apply(model, z, logsnr, cond, dkey=None):
  """The functional path: nnx.split outside, nnx.merge inside jax.jit."""
  graphdef, state = nnx.split(model)
  return np.asarray(_apply(graphdef, state, z, logsnr, cond, dkey))


@pytest.fixture(scope="module")
def fresh():
  """The net as initialised, built as DESIGN.md prescribes (eval_shape, then a jitted
  init): one compile instead of one per eager initialiser op."""
  graphdef, _ = nnx.split(nnx.eval_shape(make))
  return nnx.merge(graphdef, jax.jit(lambda: nnx.state(make()))())


@pytest.fixture(scope="module")
def model(fresh):
  return perturb(nnx.clone(fresh))


# --- shape, zero init, functional path -----------------------------------------------------


def test_output_shape_and_zero_at_init(fresh):
  z, logsnr, cond = inputs()
  out = apply(fresh, z, logsnr, cond)
  assert out.shape == z.shape and out.dtype == np.float32
  np.testing.assert_array_equal(out, 0.)  # conv_out has zero kernel and bias


def test_split_merge_under_jit_matches_eager(model):
  z, logsnr, cond = inputs()
  dkey = key(7)
  eager = np.asarray(model(z, logsnr, cond, dropout_key=dkey))
  jitted = apply(model, z, logsnr, cond, dkey)
  np.testing.assert_allclose(jitted, eager, rtol=0, atol=1e-4 * np.abs(eager).max())
  no_dropout = apply(model, z, logsnr, cond)
  assert np.abs(no_dropout - jitted).max() > 1e-3  # dropout (rate 0.3) was active
  assert np.abs(no_dropout).max() > 1e-2  # the perturbed net is not trivially zero


# --- text conditioning -----------------------------------------------------------------------


def test_masked_tokens_do_not_contribute_and_unmasked_do(model):
  z, logsnr, cond = inputs()
  base = apply(model, z, logsnr, cond)
  # Masked positions replaced by large values and NaN: bit-for-bit the same output.
  text = np.array(cond["text_emb"])
  junk = np.where(MASK[..., None] == 0, 1e3 * np.random.default_rng(5).normal(size=text.shape),
                  text)
  junk[2, 3] = np.nan
  np.testing.assert_array_equal(apply(model, z, logsnr, {**cond, "text_emb": jnp.asarray(junk)}),
                                base)
  # An unmasked token of example 0 changes example 0 only. (A new direction: adding a
  # constant to every feature would vanish in the text LayerNorm.)
  text[0, 1] = np.random.default_rng(6).normal(size=T)
  moved = apply(model, z, logsnr, {**cond, "text_emb": jnp.asarray(text)})
  assert np.abs(moved[0] - base[0]).max() > 1e-3
  np.testing.assert_array_equal(moved[1:], base[1:])


def test_all_masked_row_is_the_no_text_model(model):
  z, logsnr, cond = inputs()
  dropped = {**cond, "text_mask": jnp.asarray(MASK * np.array([[1], [0], [1]]))}
  out_dropped = apply(model, z, logsnr, dropped)
  no_text = {k: v for k, v in cond.items() if not k.startswith("text")}
  out_none = apply(model, z, logsnr, no_text)
  empty = {**cond, "text_emb": jnp.zeros((B, 0, T)), "text_mask": jnp.zeros((B, 0), bool)}
  out_empty = apply(model, z, logsnr, empty)
  tol = 1e-5 * np.abs(out_none).max()
  # Example 1 lost all its tokens: it equals the unconditional net (no text at all, or a
  # zero-length text); examples 0 and 2 keep their text and differ from it.
  np.testing.assert_allclose(out_dropped[1], out_none[1], rtol=0, atol=tol)
  np.testing.assert_allclose(out_empty, out_none, rtol=0, atol=tol)
  assert np.abs(out_dropped[[0, 2]] - out_none[[0, 2]]).max() > 1e-3
  full = apply(model, z, logsnr, cond)
  assert np.abs(full[1] - out_dropped[1]).max() > 1e-3  # its text mattered before


# --- low-resolution and augmentation conditioning ----------------------------------------------


def test_lowres_aug_logsnr_and_logsnr_change_output(model):
  z, logsnr, cond = inputs()
  base = apply(model, z, logsnr, cond)
  for changed in ({**cond, "lowres": cond["lowres"] + 1.},
                  {**cond, "aug_logsnr": cond["aug_logsnr"] - 3.}):
    out = apply(model, z, logsnr, changed)
    assert np.abs(out - base).max() > 1e-3
  assert np.abs(apply(model, z, logsnr + 1., cond) - base).max() > 1e-3


def test_bad_conditioning_raises_clear_errors(model):
  z, logsnr, cond = inputs()
  for missing in ("lowres", "aug_logsnr"):
    with pytest.raises(ValueError, match=f"lowres_cond=True.*{missing}"):
      model(z, logsnr, {k: v for k, v in cond.items() if k != missing})
  with pytest.raises(ValueError, match="unsupported cond keys \\['vector'\\]"):
    model(z, logsnr, {**cond, "vector": jnp.zeros((B, 4))})
  with pytest.raises(ValueError, match="text_mask"):
    model(z, logsnr, {k: v for k, v in cond.items() if k != "text_mask"})
  with pytest.raises(ValueError, match="text_mask"):
    model(z, logsnr, {**cond, "text_mask": jnp.ones((B, L), jnp.float32)})
  with pytest.raises(ValueError, match="text_emb"):
    model(z, logsnr, {**cond, "text_emb": jnp.zeros((B, L, T + 1))})
  with pytest.raises(ValueError, match="lowres"):
    model(z, logsnr, {**cond, "lowres": cond["lowres"][:, ::2, ::2]})
  # Only the keys a net was built for are accepted. (Inputs are checked before any
  # parameter is used, so an abstract net from eval_shape suffices here.)
  plain = nnx.eval_shape(lambda: make("tiny_base", channels=C, cross_attn_resolutions=(),
                                      text_dim=None, num_classes=None))
  for extra in ({"text_emb": cond["text_emb"], "text_mask": MASK}, {"label": cond["label"]},
                {"lowres": z[:, :8, :8], "aug_logsnr": logsnr}):
    with pytest.raises(ValueError, match="unsupported cond keys"):
      plain(z[:, :8, :8], logsnr, extra)


def test_bad_config_raises_clear_errors():
  with pytest.raises(ValueError, match="needs text_dim"):
    make(text_dim=None)
  with pytest.raises(ValueError, match="no level has"):
    make(cross_attn_resolutions=(4,))
  with pytest.raises(ValueError, match="num_res_blocks"):
    make(num_res_blocks=(1, 2, 3))
  with pytest.raises(ValueError, match="unknown Efficient U-Net preset"):
    efficient_unet_config("sr512")


# --- the Efficient U-Net specifics -----------------------------------------------------------


def test_residual_sum_is_scaled_by_inverse_sqrt2(model):
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 4, 4)), jnp.float32)
  emb = jnp.asarray(np.random.default_rng(3).normal(size=(2, 6)), jnp.float32)
  args = dict(emb_dim=6, adaptive_norm=True, rngs=nnx.Rngs(key(0)))
  run = lambda block: np.asarray(jax.jit(lambda x, e: block(x, e))(x, emb))
  # At init conv2 is zero: an identity-shortcut block maps x to x / sqrt(2) exactly.
  np.testing.assert_allclose(run(eu.EfficientResBlock(4, 4, **args)), np.asarray(x) / np.sqrt(2.),
                             rtol=1e-6)
  # With trained-like weights it is the plain ResBlock (skip(x) + h) divided by sqrt(2).
  plain = perturb(layers.ResBlock(4, 8, **args))
  scaled = eu.EfficientResBlock(4, 8, **args)
  nnx.update(scaled, nnx.state(plain, nnx.Param))
  np.testing.assert_allclose(run(scaled), run(plain) / np.sqrt(2.), rtol=1e-5, atol=1e-6)
  # The network is built from these blocks only. (A stack of n identical blocks is one
  # module whose parameters have a leading [n] axis: it counts n times.)
  blocks = [m for _, m in nnx.iter_graph(model) if isinstance(m, layers.ResBlock)]
  count = sum(b.conv1.kernel.shape[0] if b.conv1.kernel.ndim == 5 else 1 for b in blocks)
  assert count == 2 * (1 + 2) and all(isinstance(b, eu.EfficientResBlock) for b in blocks)


def test_downsampling_before_and_upsampling_after_the_level_blocks(monkeypatch):
  """Records the input shape of every ResBlock and attention layer in call order (shape
  only, under jax.eval_shape): level 1's blocks already see 8x8 on the way down, and on
  the way up they still run at 8x8, the upsampling following them. Built with
  scan_layers=False: a scanned stack traces its block body once for all its blocks."""
  model = make(scan_layers=False)
  seen = []
  for cls in (eu.EfficientResBlock, layers.AttentionBlock, eu.CrossAttentionBlock):
    original = cls.__call__

    def record(self, x, *args, _original=original, _name=cls.__name__, **kw):
      seen.append((_name, tuple(x.shape[1:])))
      return _original(self, x, *args, **kw)
    monkeypatch.setattr(cls, "__call__", record)
  z, logsnr, cond = inputs()
  jax.eval_shape(lambda *a: model(*a), z, logsnr, cond)
  res, attn, cross = "EfficientResBlock", "AttentionBlock", "CrossAttentionBlock"
  assert seen == [
      (res, (16, 16, 16)),                           # down level 0: full resolution
      (res, (8, 8, 16)), (res, (8, 8, 32)),          # down level 1: downsampled FIRST
      (attn, (8, 8, 32)), (cross, (8, 8, 32)),       # attention once, after the blocks
      (res, (8, 8, 32)), (res, (8, 8, 32)),          # up level 1: no skip at the bottom
      (attn, (8, 8, 32)), (cross, (8, 8, 32)),
      (res, (16, 16, 32 + 16)),                      # up level 0: upsampled, + skip_0
  ]
  assert model.down[0].downsample is None and model.up[-1].upsample is None
  assert model.down[1].downsample.conv.kernel.shape == (3, 3, 16, 16)


# --- batch independence ------------------------------------------------------------------------


def test_examples_do_not_leak_into_each_other(model):
  z, logsnr, cond = inputs()
  full = apply(model, z, logsnr, cond)
  other = {**cond, "text_emb": cond["text_emb"].at[1:].multiply(-2.),
           "lowres": cond["lowres"].at[1:].multiply(-1.)}
  changed = apply(model, z.at[1:].multiply(3.), logsnr, other)
  np.testing.assert_array_equal(changed[0], full[0])
  assert np.abs(changed[1:] - full[1:]).max() > 1e-3
  # One example alone agrees with its row of the batch up to float32 summation order.
  tol = 1e-5 * np.abs(full).max()
  for i in (0, 2):
    one = apply(model, z[i:i + 1], logsnr[i:i + 1],
                jax.tree.map(lambda a, i=i: a[i:i + 1], cond))
    np.testing.assert_allclose(one[0], full[i], rtol=0, atol=tol)


# --- parameters ---------------------------------------------------------------------------------


ALLOWED_2D = {layers.EXPAND, layers.PROJECT, layers.ATTN_QKV, layers.ATTN_OUT, layers.VOCAB}


def test_every_param_has_a_contract_partition_spec(fresh):
  params = nnx.state(fresh, nnx.Param)
  flat = dict(nnx.to_flat_state(params))
  specs = dict(nnx.to_flat_state(nnx.get_partition_spec(params)))
  assert flat.keys() == specs.keys()
  for path, var in flat.items():
    shape, spec = var.get_value().shape, tuple(specs[path].get_value())
    assert var.get_value().dtype == jnp.float32 and len(spec) == len(shape), path
    if "layers" in path:  # a stacked block (vdm/nets/stack.py): leading axis unnamed
      assert spec[0] is None, (path, spec)
      spec, shape = spec[1:], shape[1:]
    names = [n for n in spec if n is not None]
    assert set(names) <= set(layers.LOGICAL_AXES) and len(names) == len(set(names)), path
    if len(shape) == 4:
      assert spec == layers.CONV_KERNEL, path
    elif len(shape) == 2:
      assert spec in ALLOWED_2D, (path, spec)
    else:
      assert len(names) == 1, (path, spec)
      if path[-1] == "bias" and path[-2] not in ("norm", "text_norm"):
        assert spec == (tuple(specs[path[:-1] + ("kernel",)].get_value())[-1],), path
      if path[-2] in ("norm", "text_norm"):
        assert spec == layers.NORM, path


def hand_count(c, t, attn, classes):
  """tiny_sr's parameters, written out layer by layer (ch 16, mult (1, 2), blocks (1, 2),
  emb 64, cross-attention (and self-attention if attn) at level 1, lowres input)."""
  conv = lambda i, o, k=3: k * k * i * o + o
  dense = lambda i, o: i * o + o
  norm = lambda n: 2 * n  # GroupNorm / LayerNorm scale and bias

  def res(i, o, e=64):  # norm1, conv1, AdaGN projection (scale, shift), norm2, conv2, 1x1
    return norm(i) + conv(i, o) + dense(e, 2 * o) + norm(o) + conv(o, o) + (
        conv(i, o, 1) if i != o else 0)

  self_attn = lambda n: norm(n) + 4 * dense(n, n)
  cross = lambda n: norm(n) + norm(t) + 2 * dense(n, n) + 2 * dense(t, n)
  total = 2 * (dense(16, 64) + dense(64, 64))                   # time and aug-level MLPs
  total += t + norm(t) + 64 + 2 * dense(t, 64) + dense(64, 64)  # null token, text pool
  total += (classes + 1) * 64 if classes else 0                 # class table (+ null)
  total += conv(2 * c, 16)                                      # conv_in on [z, lowres]
  total += res(16, 16)                                          # down level 0
  total += conv(16, 16) + res(16, 32) + res(32, 32) + cross(32)  # down level 1
  total += 2 * res(32, 32) + cross(32) + conv(32, 32)           # up level 1 + upsample
  total += res(48, 16)                                          # up level 0 (with skip)
  total += norm(16) + conv(16, c)                               # output
  return total + (2 * self_attn(32) if attn else 0)


def test_param_count_matches_hand_count(fresh):
  assert param_count("tiny_sr", channels=C) == hand_count(C, T, attn=False, classes=None)
  assert param_count("tiny_sr", channels=1, text_dim=12, attn_resolutions=(8,),
                     num_classes=4) == hand_count(1, 12, attn=True, classes=4)
  # eval_shape counts what a real build allocates.
  real = sum(p.size for p in jax.tree.leaves(nnx.state(fresh, nnx.Param)))
  assert real == hand_count(C, T, attn=True, classes=4)
