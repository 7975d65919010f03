"""Tests for vdm/nets: shapes, zero-init identities, logical partition specs, per-example
independence, dropout, split/merge under jit, Fourier/sinusoidal features vs numpy,
attention vs numpy, class and vector conditioning."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.net_helpers import perturb
from vdm.nets import layers
from vdm.nets.score_unet import ScoreUNet
from vdm.nets.unet import UNet, logsnr_to_time

B, H, C = 3, 8, 2


def key(seed):
  """Test keys use the 'unsafe_rbg' PRNG: XLA compiles it several times faster than
  threefry on CPU, and the modules only split and consume keys, whatever their impl."""
  return jax.random.key(seed, impl="unsafe_rbg")


def build(cls, **kw):
  return cls(**kw, rngs=nnx.Rngs(key(0)))


def make_score(**kw):
  args = dict(channels=C, ch=8, n_layer=1, with_attention=True, num_classes=4, dropout=0.3)
  args.update(kw)
  return build(ScoreUNet, **args)


def make_unet(**kw):
  args = dict(channels=C, image_size=H, ch=8, ch_mult=(1, 2), num_res_blocks=1,
              attn_resolutions=(4,), num_heads=2, num_classes=4, cond_dim=5, dropout=0.3)
  args.update(kw)
  return build(UNet, **args)


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((B, H, H, C), np.float32)
  logsnr = rng.uniform(-10., 10., (B,)).astype(np.float32)
  return jnp.asarray(z), jnp.asarray(logsnr), jnp.asarray(rng.standard_normal((B, 5), np.float32))


def cond_for(model, labels, vector):
  cond = {"label": jnp.asarray(labels, jnp.int32)}
  if isinstance(model, UNet):
    cond["vector"] = vector
  return cond


BUILDERS = [make_score, make_unet]


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, z, logsnr, cond, key):
  return nnx.merge(graphdef, state)(z, logsnr, cond, dropout_key=key)


def apply(model, z, logsnr, cond=None, key=None):
  """Jitted forward pass through split/merge (eager NNX calls compile op by op: slow)."""
  graphdef, state = nnx.split(model)
  return _apply(graphdef, state, z, logsnr, cond, key)


# --- shapes and zero-init identities -------------------------------------------------------


@pytest.mark.parametrize("build", BUILDERS)
def test_output_shape_and_init_output(build):
  z, logsnr, vec = inputs()
  model = build()
  out = apply(model, z, logsnr, cond_for(model, [0, 1, -1], vec))
  assert out.shape == z.shape and out.dtype == jnp.float32
  # conv_out has zero kernel and zero bias, so the net's residual h is exactly 0:
  # ScoreUNet with base_measure returns z, the U-Net returns 0.
  expected = z if isinstance(model, ScoreUNet) else jnp.zeros_like(z)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_score_unet_without_base_measure_is_zero_at_init():
  z, logsnr, _ = inputs()
  out = apply(make_score(base_measure=False, num_classes=None), z, logsnr)
  np.testing.assert_array_equal(np.asarray(out), 0.)


def test_score_unet_block_count():
  model = make_score(n_layer=2)
  assert len(model.down) == 2 and len(model.up) == 3
  # Up blocks see the concatenation of the running state and a skip: 2 * ch inputs.
  # (The up blocks are one stack: their parameters carry a leading [n_layer + 1] axis.)
  assert model.up.layers.block.conv1.kernel.shape[1:] == (3, 3, 16, 8)


# --- logical partition specs ----------------------------------------------------------------


ALLOWED_2D = {layers.EXPAND, layers.PROJECT, layers.ATTN_QKV, layers.ATTN_OUT, layers.VOCAB}


@pytest.mark.parametrize("build", BUILDERS)
def test_every_param_has_contract_partition_spec(build):
  model = build()
  params = nnx.state(model, nnx.Param)
  specs = nnx.get_partition_spec(params)
  flat_params = dict(nnx.to_flat_state(params))
  flat_specs = dict(nnx.to_flat_state(specs))
  assert flat_params.keys() == flat_specs.keys() and len(flat_params) > 20
  for path, spec_var in flat_specs.items():
    spec = tuple(spec_var.get_value())
    shape = flat_params[path].get_value().shape
    assert flat_params[path].get_value().dtype == jnp.float32, path
    assert len(spec) == len(shape), (path, spec, shape)
    if "layers" in path:  # a stacked block (vdm/nets/stack.py): leading axis unnamed
      assert spec[0] is None, (path, spec)
      spec, shape = spec[1:], shape[1:]
    names = [n for n in spec if n is not None]
    assert set(names) <= set(layers.LOGICAL_AXES), (path, spec)
    assert len(names) == len(set(names)), (path, spec)  # a name twice is an invalid spec
    if len(shape) == 4:
      assert spec == layers.CONV_KERNEL, (path, spec)
    elif len(shape) == 2:
      assert spec in ALLOWED_2D, (path, spec)
    else:
      assert len(shape) == 1 and len(names) == 1, (path, spec)
      if path[-2] == "norm":
        assert spec == layers.NORM, (path, spec)
      if path[-1] == "bias" and path[-2] != "norm":
        kernel_spec = tuple(flat_specs[path[:-1] + ("kernel",)].get_value())
        assert spec == (kernel_spec[-1],), (path, spec, kernel_spec)


def test_partition_spec_maps_through_logical_rules():
  """Under logical-axis rules the specs become mesh-axis specs (what launch/ will do)."""
  model = make_score()
  rules = (("conv_in", None), ("conv_out", "tensor"), ("embed", "fsdp"), ("mlp", "tensor"),
           ("heads", "tensor"), ("norm", None), ("vocab", None))
  with nnx.logical_axis_rules(rules):
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(nnx.state(model, nnx.Param))))
  assert tuple(specs[("conv_in", "kernel")].get_value()) == (None, None, None, "tensor")
  assert tuple(specs[("temb", "dense1", "kernel")].get_value()) == ("tensor", "fsdp")


# --- per-example independence ---------------------------------------------------------------


@pytest.mark.parametrize("build", BUILDERS)
def test_batch_equals_examples_run_separately(build):
  z, logsnr, vec = inputs()
  model = perturb(build())
  labels = jnp.array([0, 3, -1], jnp.int32)
  full = apply(model, z, logsnr, cond_for(model, labels, vec))
  assert float(jnp.abs(full - z).max()) > 1e-2  # the perturbed net is not the identity
  # Changing the other examples leaves example 0 bit-for-bit unchanged (same batch shape).
  z_other = z.at[1:].multiply(5.)
  other = apply(model, z_other, logsnr, cond_for(model, labels, vec))
  np.testing.assert_array_equal(np.asarray(full[0]), np.asarray(other[0]))
  assert float(jnp.abs(full[1:] - other[1:]).max()) > 1e-2
  # Running each example alone agrees up to float32 summation order (batch-size dependent
  # conv algorithms), i.e. relative to the output scale.
  tol = 1e-5 * float(jnp.abs(full).max())
  for i in range(B):
    one = apply(model, z[i:i + 1], logsnr[i:i + 1],
                cond_for(model, labels[i:i + 1], vec[i:i + 1]))
    np.testing.assert_allclose(np.asarray(full[i:i + 1]), np.asarray(one), rtol=0, atol=tol)


# --- dropout --------------------------------------------------------------------------------


@pytest.mark.parametrize("build", BUILDERS)
def test_dropout(build):
  z, logsnr, vec = inputs()
  model = perturb(build())  # dropout 0.3
  cond = cond_for(model, [0, 1, 2], vec)
  a, b = apply(model, z, logsnr, cond), apply(model, z, logsnr, cond)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  k1, k2 = key(1), key(2)
  d1, d1_again = apply(model, z, logsnr, cond, k1), apply(model, z, logsnr, cond, k1)
  d2 = apply(model, z, logsnr, cond, k2)
  np.testing.assert_array_equal(np.asarray(d1), np.asarray(d1_again))
  assert float(jnp.abs(d1 - d2).max()) > 1e-3
  assert float(jnp.abs(d1 - a).max()) > 1e-3


# --- functional split / merge under jit -----------------------------------------------------


@pytest.mark.parametrize("build", BUILDERS)
def test_split_merge_under_jit_matches_eager(build):
  z, logsnr, vec = inputs()
  model = perturb(build())  # dropout 0.3
  cond = cond_for(model, [0, 1, -1], vec)
  dkey = key(7)
  eager_drop = model(z, logsnr, cond, dropout_key=dkey)
  eager = model(z, logsnr, cond)
  assert float(jnp.abs(eager_drop - eager).max()) > 1e-3  # dropout was active
  # `apply` is graphdef, state = nnx.split(model) outside, nnx.merge inside jax.jit.
  # XLA fuses differently than op-by-op dispatch: equal up to float32 rounding.
  tol = 1e-4 * float(jnp.abs(eager).max())
  np.testing.assert_allclose(np.asarray(apply(model, z, logsnr, cond, dkey)),
                             np.asarray(eager_drop), rtol=0, atol=tol)
  np.testing.assert_allclose(np.asarray(apply(model, z, logsnr, cond)),
                             np.asarray(eager), rtol=0, atol=tol)


def test_bfloat16_compute_keeps_float32_params_and_output():
  z, logsnr, vec = inputs()
  f32 = perturb(make_unet(), scale=0.1)
  bf16 = make_unet(dtype=jnp.bfloat16)
  nnx.update(bf16, nnx.state(f32, nnx.Param))
  cond = cond_for(f32, [0, 1, 2], vec)
  out32, out16 = apply(f32, z, logsnr, cond), apply(bf16, z, logsnr, cond)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  assert out16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  assert 0 < rel < 0.05, rel  # bf16 rounding, not a different function


# --- features vs numpy ----------------------------------------------------------------------


def np_fourier(z, exponents):
  """Independent loop implementation: channel c*N+k is sin/cos(2 pi 2^n_k z_c)."""
  z = np.asarray(z, np.float64)
  nc, n = z.shape[-1], len(exponents)
  sin = np.zeros(z.shape[:-1] + (nc * n,))
  cos = np.zeros_like(sin)
  for c in range(nc):
    for k, e in enumerate(exponents):
      sin[..., c * n + k] = np.sin(2 * np.pi * 2.0 ** e * z[..., c])
      cos[..., c * n + k] = np.cos(2 * np.pi * 2.0 ** e * z[..., c])
  return np.concatenate([sin, cos], axis=-1)


def test_fourier_features_match_numpy():
  z = jnp.asarray(np.random.default_rng(0).uniform(-1., 1., (2, 4, 4, 3)), jnp.float32)
  got = layers.fourier_features(z, (6, 7))
  assert got.shape == (2, 4, 4, 12)
  # Angles reach 2 pi 128 = 804 rad: float32 angle rounding allows ~1e-4 error.
  np.testing.assert_allclose(np.asarray(got), np_fourier(z, (6, 7)), atol=2e-4)
  # Closed form: z = 2^-(n+2) gives angle pi/2, so sin = 1 and cos = 0.
  quarter = layers.fourier_features(jnp.full((1, 1, 1, 1), 2.0 ** -8), (6,))
  np.testing.assert_allclose(np.asarray(quarter).ravel(), [1., 0.], atol=1e-6)


def test_score_unet_input_width_follows_fourier_range():
  assert make_score(fourier_min=5, fourier_max=7).conv_in.kernel.shape == (3, 3, C * 7, 8)
  assert make_score(use_fourier=False).conv_in.kernel.shape == (3, 3, C, 8)


def test_sinusoidal_embedding_matches_numpy():
  x = np.array([0., 3.5, 1000.], np.float32)
  dim = 9
  half = dim // 2
  freqs = np.exp(-math.log(10000.) * np.arange(half) / (half - 1))
  want = np.concatenate([np.sin(x[:, None] * freqs), np.cos(x[:, None] * freqs),
                         np.zeros((3, 1))], axis=1)
  np.testing.assert_allclose(np.asarray(layers.sinusoidal_embedding(jnp.asarray(x), dim)),
                             want, atol=2e-4)


def test_resampling_matches_numpy():
  x = np.random.default_rng(0).normal(size=(2, 4, 6, 3)).astype(np.float32)
  pooled = x.reshape(2, 2, 2, 3, 2, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(np.asarray(layers.avg_pool2(jnp.asarray(x))), pooled, atol=1e-6)
  up = np.asarray(layers.nearest_upsample2(jnp.asarray(x)))
  assert up.shape == (2, 8, 12, 3)
  for i, j in [(0, 0), (3, 5), (7, 11), (4, 1)]:
    np.testing.assert_array_equal(up[:, i, j], x[:, i // 2, j // 2])


def test_logsnr_to_time_inverts_cosine_schedule():
  t = np.linspace(0.05, 0.95, 7)
  logsnr = -2 * np.log(np.tan(np.pi * t / 2))  # cosine schedule
  np.testing.assert_allclose(np.asarray(logsnr_to_time(jnp.asarray(logsnr))), t, atol=1e-6)


def test_group_norm_matches_numpy():
  x = jnp.asarray(np.random.default_rng(0).normal(1., 3., (2, 4, 4, 8)), jnp.float32)
  got = build(layers.GroupNorm, channels=8, groups=4)(x)
  xn = np.asarray(x, np.float64).reshape(2, 4, 4, 4, 2)
  mean = xn.mean(axis=(1, 2, 4), keepdims=True)
  var = xn.var(axis=(1, 2, 4), keepdims=True)
  want = ((xn - mean) / np.sqrt(var + 1e-6)).reshape(2, 4, 4, 8)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_attention_block_matches_numpy():
  heads, ch = 2, 8
  block = perturb(build(layers.AttentionBlock, channels=ch, num_heads=heads))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 3, ch)), jnp.float32)
  got = block(x)

  p = lambda lin: (np.asarray(lin.kernel.get_value(), np.float64),
                   np.asarray(lin.bias.get_value(), np.float64))
  n = np.asarray(block.norm(x), np.float64).reshape(2, 9, ch)
  (wq, bq), (wk, bk), (wv, bv), (wo, bo) = p(block.q), p(block.k), p(block.v), p(block.out)
  q, k, v = n @ wq + bq, n @ wk + bk, n @ wv + bv
  d = ch // heads
  out = np.zeros_like(q)
  for h in range(heads):
    s = slice(h * d, (h + 1) * d)
    logits = q[..., s] @ k[..., s].transpose(0, 2, 1) / np.sqrt(d)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    out[..., s] = (w / w.sum(-1, keepdims=True)) @ v[..., s]
  want = np.asarray(x, np.float64) + (out @ wo + bo).reshape(x.shape)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_adaptive_resblock_applies_scale_and_shift():
  """ADM's AdaGN: out = skip(x) + conv2(swish(norm2(conv1(swish(norm1 x))) (1 + s) + b))."""
  block = perturb(build(layers.ResBlock, in_ch=4, out_ch=8, emb_dim=6, adaptive_norm=True))
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 4, 4)), jnp.float32)
  emb = jnp.asarray(np.random.default_rng(3).normal(size=(2, 6)), jnp.float32)
  e = np.asarray(jax.nn.swish(emb)) @ np.asarray(block.emb_proj.kernel.get_value()) + \
      np.asarray(block.emb_proj.bias.get_value())
  scale, shift = e[:, None, None, :8], e[:, None, None, 8:]
  h = block.norm2(block.conv1(jax.nn.swish(block.norm1(x)))) * (1 + scale) + shift
  want = block.skip(x) + block.conv2(jax.nn.swish(h))
  np.testing.assert_allclose(np.asarray(block(x, emb)), np.asarray(want), atol=1e-5)


# --- conditioning ---------------------------------------------------------------------------


@pytest.mark.parametrize("build", BUILDERS)
def test_class_label_and_null_label(build):
  z, logsnr, vec = inputs()
  model = perturb(build())
  run = lambda labels: np.asarray(apply(model, z, logsnr, cond_for(model, labels, vec)))
  out0, out1 = run([0, 0, 0]), run([1, 1, 1])
  assert np.abs(out0 - out1).max() > 1e-3
  # -1 and num_classes both select the null row; omitting the label does too.
  null_a, null_b = run([-1, -1, -1]), run([4, 4, 4])
  np.testing.assert_array_equal(null_a, null_b)
  no_label = {} if isinstance(model, ScoreUNet) else {"vector": vec}
  np.testing.assert_array_equal(null_a, np.asarray(apply(model, z, logsnr, no_label)))
  assert np.abs(null_a - out0).max() > 1e-3
  # A label outside [-1, num_classes] must not pass silently (nor wrap around).
  bad = run([5, -2, 0])
  assert np.isnan(bad[:2]).all() and not np.isnan(bad[2]).any()


def test_unet_vector_conditioning_changes_output():
  z, logsnr, vec = inputs()
  model = perturb(make_unet())
  a = apply(model, z, logsnr, {"label": jnp.zeros(B, jnp.int32), "vector": vec})
  b = apply(model, z, logsnr, {"label": jnp.zeros(B, jnp.int32), "vector": vec + 1.})
  assert float(jnp.abs(a - b).max()) > 1e-3
  with pytest.raises(ValueError, match="vector"):
    model(z, logsnr, {"label": jnp.zeros(B, jnp.int32), "vector": vec[:, :3]})


def test_logsnr_changes_output():
  z, logsnr, vec = inputs()
  for model in (perturb(make_score()), perturb(make_unet())):
    cond = cond_for(model, [0, 1, 2], vec)
    delta = apply(model, z, logsnr, cond) - apply(model, z, logsnr + 1., cond)
    assert float(jnp.abs(delta).max()) > 1e-3


def test_bad_inputs_raise_clear_errors():
  z, logsnr, _ = inputs()
  score = make_score(num_classes=None)
  with pytest.raises(ValueError, match="unsupported cond keys"):
    score(z, logsnr, {"label": jnp.zeros(B, jnp.int32)})
  with pytest.raises(ValueError, match="channels"):
    score(z[..., :1], logsnr)
  with pytest.raises(ValueError, match="logsnr"):
    score(z, logsnr[:2])
  with pytest.raises(ValueError, match="integer"):
    make_score()(z, logsnr, {"label": jnp.zeros(B)})
  with pytest.raises(ValueError, match="divisible"):
    make_unet(ch_mult=(1, 1, 1, 1, 1))  # 8 is not divisible by 2^4
