"""Tests for the two network features distillation needs: the mixed "both" (x & eps)
parameterization (Salimans & Ho 2022, sec. 4) and guidance-weight conditioning of a
w-conditioned student (Meng et al. 2023, sec. 3.1), on ScoreUNet, UNet and EfficientUNet.

The merge formula is checked against a float64 numpy implementation and its closed-form
limits; the guidance embedding against its defining property: zero at init, so a student
that copies its teacher's weights outputs exactly what the teacher outputs, for every w.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.imagen import digits_base
from configs.vdm import digits
from imagen import experiment as imagen_experiment
from imagen.efficient_unet import EfficientUNet
from imagen.unet_presets import efficient_unet_config
from tests.net_helpers import perturb
from vdm import experiment, process
from vdm.nets import layers
from vdm.nets.score_unet import ScoreUNet
from vdm.nets.unet import UNet

B, H, C = 3, 8, 2


def key(seed):
  """'unsafe_rbg' keys: XLA compiles them much faster than threefry on CPU."""
  return jax.random.key(seed, impl="unsafe_rbg")


# --- the "both" parameterization -----------------------------------------------------------


def _merge_np(z, x_tilde, eps_tilde, logsnr):
  """Salimans & Ho 2022 sec. 4 in float64: x = sigma^2 x~ + alpha^2 x_from_eps(z, eps~),
  then eps from (z, x) by division and v = alpha eps - sigma x."""
  lam = logsnr.reshape(-1, *([1] * (z.ndim - 1))).astype(np.float64)
  a2, s2 = 1 / (1 + np.exp(-lam)), 1 / (1 + np.exp(lam))
  a, s = np.sqrt(a2), np.sqrt(s2)
  x_eps = (z - s * eps_tilde) / a
  x = s2 * x_tilde + a2 * x_eps
  eps = (z - a * x) / s
  return x, eps, a * eps - s * x, a, s


def _both_inputs(logsnr, seed=0):
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((len(logsnr), 4, 4, C))
  out = rng.standard_normal((len(logsnr), 4, 4, 2 * C))
  return z, out, np.asarray(logsnr, np.float64)


def test_predict_both_matches_numpy_merge():
  z, out, lam = _both_inputs([-6., -1.5, 0., 2., 6.])
  pred = process.predict(jnp.asarray(z, jnp.float32), jnp.asarray(lam, jnp.float32),
                         jnp.asarray(out, jnp.float32), "both")
  # First C channels are x_tilde, last C are eps_tilde.
  x, eps, v, a, s = _merge_np(z, out[..., :C], out[..., C:], lam)
  np.testing.assert_allclose(pred.x, x, atol=1e-5)
  np.testing.assert_allclose(pred.eps, eps, atol=1e-5)
  np.testing.assert_allclose(pred.v, v, atol=1e-5)
  # The Prediction is one consistent (x, eps) pair for this z_t.
  np.testing.assert_allclose(a * pred.x + s * pred.eps, z, atol=1e-5)
  # Swapping the halves gives a different prediction (the order is part of the contract).
  swapped = process.predict(jnp.asarray(z, jnp.float32), jnp.asarray(lam, jnp.float32),
                            jnp.asarray(np.concatenate([out[..., C:], out[..., :C]], -1),
                                        jnp.float32), "both")
  assert np.max(np.abs(np.asarray(swapped.x) - x)) > 0.1


def test_predict_both_limits():
  """Near the data (alpha ~ 1) x-hat is the eps-branch's x and eps-hat is eps_tilde; near
  pure noise (alpha ~ 0) x-hat is x_tilde and eps-hat is z. Finite at both ends."""
  z, out, _ = _both_inputs([0., 0.])
  x_tilde, eps_tilde = out[..., :C], out[..., C:]
  for lam in (25., -25.):
    lam_b = jnp.full((2,), lam)
    pred = process.predict(jnp.asarray(z, jnp.float32), lam_b, jnp.asarray(out, jnp.float32),
                           "both")
    assert all(np.all(np.isfinite(p)) for p in pred)
    if lam > 0:
      np.testing.assert_allclose(pred.x, z - np.exp(-lam / 2) * eps_tilde, atol=1e-5)
      np.testing.assert_allclose(
          pred.x, process.x_from_eps(jnp.asarray(z, jnp.float32), eps_tilde, lam_b), atol=1e-5)
      np.testing.assert_allclose(pred.eps, eps_tilde, atol=1e-4)
    else:
      np.testing.assert_allclose(pred.x, x_tilde, atol=1e-4)
      np.testing.assert_allclose(pred.eps, z, atol=1e-4)


def test_predict_output_shape_is_checked():
  z = jnp.zeros((2, 4, 4, 1))
  lam = jnp.zeros((2,))
  with pytest.raises(ValueError, match="out_channels=2\\*C"):
    process.predict(z, lam, jnp.zeros((2, 4, 4, 1)), "both")
  # A 2C output for eps would broadcast silently against a 1-channel z without the check.
  with pytest.raises(ValueError, match="needs \\(2, 4, 4, 1\\)"):
    process.predict(z, lam, jnp.zeros((2, 4, 4, 2)), "eps")
  assert "both" in process.PARAMETERIZATIONS


def test_from_x_still_uses_the_x_parameterization():
  z, out, lam = _both_inputs([-2., 3.])
  x = out[..., :C]
  pred = process.from_x(jnp.asarray(z, jnp.float32), jnp.asarray(x, jnp.float32),
                        jnp.asarray(lam, jnp.float32))
  np.testing.assert_allclose(pred.x, x, atol=1e-6)
  a, s = _merge_np(z, x, x, lam)[3:]
  np.testing.assert_allclose(pred.eps, (z - a * x) / s, atol=1e-5)


# --- nets: builders and a jitted forward ---------------------------------------------------


def make_score(**kw):
  args = dict(channels=C, ch=8, n_layer=1, with_attention=True, num_classes=4,
              base_measure=False)
  return ScoreUNet(**{**args, **kw}, rngs=nnx.Rngs(key(0)))


def make_unet(**kw):
  args = dict(channels=C, image_size=H, ch=8, ch_mult=(1, 2), num_res_blocks=1,
              attn_resolutions=(4,), num_heads=2, num_classes=4)
  return UNet(**{**args, **kw}, rngs=nnx.Rngs(key(0)))


def make_efficient(**kw):
  args = {**efficient_unet_config("tiny_base"), "channels": C, "image_size": H,
          "num_classes": 4}
  return EfficientUNet(**{**args, **kw}, rngs=nnx.Rngs(key(0)))


BUILDERS = {"score_unet": make_score, "unet": make_unet, "efficient_unet": make_efficient}


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  z = jnp.asarray(rng.standard_normal((B, H, H, C)), jnp.float32)
  logsnr = jnp.asarray(rng.uniform(-8., 8., (B,)), jnp.float32)
  cond = {"label": jnp.asarray([0, 3, -1], jnp.int32)}
  return z, logsnr, cond


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, z, logsnr, cond):
  return nnx.merge(graphdef, state)(z, logsnr, cond)


def apply(model, z, logsnr, cond):
  graphdef, state = nnx.split(model)
  return np.asarray(_apply(graphdef, state, z, logsnr, cond))


# --- nets: out_channels --------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILDERS)
def test_out_channels_doubles_the_output(name):
  z, logsnr, cond = inputs()
  model = perturb(BUILDERS[name](out_channels=2 * C))
  out = apply(model, z, logsnr, cond)
  assert out.shape == (B, H, H, 2 * C)
  assert model.conv_out.kernel.shape[-1] == 2 * C
  # Both halves carry signal (the perturbed conv_out is not zero in either).
  assert np.std(out[..., :C]) > 1e-3 and np.std(out[..., C:]) > 1e-3


def test_score_unet_base_measure_needs_matching_channels():
  with pytest.raises(ValueError, match="base_measure=False"):
    make_score(out_channels=2 * C, base_measure=True)


def _digits_config(parameterization, **model):
  cfg = digits.get_config("runlocal")
  cfg.model.parameterization = parameterization
  with cfg.unlocked():
    cfg.model.update(model)
  return cfg


def test_vdm_build_model_with_both_denoises_and_samples():
  cfg = _digits_config("both")
  model = experiment.build_model(cfg.model, 17, (8, 8, 1), nnx.Rngs(key(0)))
  assert model.net.out_channels == 2 and not model.net.base_measure
  perturb(model.net)
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.standard_normal((4, 8, 8, 1)), jnp.float32)
  lam = jnp.asarray([-4., -1., 2., 6.], jnp.float32)

  @jax.jit
  def run(state):   # one compile instead of op-by-op eager calls
    m = nnx.merge(graphdef, state)
    return m.net(z, lam), m.denoise(z, lam), experiment.sample(m, key(1), 3, num_steps=2)

  graphdef, state = nnx.split(model)
  out, pred, images = run(state)
  out = np.asarray(out)
  assert out.shape == (4, 8, 8, 2) and pred.x.shape == pred.eps.shape == (4, 8, 8, 1)
  x, eps, _, _, _ = _merge_np(np.asarray(z, np.float64), out[..., :1], out[..., 1:],
                              np.asarray(lam))
  np.testing.assert_allclose(pred.x, x, atol=1e-5)
  np.testing.assert_allclose(pred.eps, eps, atol=1e-4)
  assert images.shape == (3, 8, 8, 1)
  assert np.all((np.asarray(images) >= 0) & (np.asarray(images) < 17))


def test_vdm_build_model_reads_guidance_embedding():
  off = experiment.build_model(_digits_config("eps").model, 17, (8, 8, 1), nnx.Rngs(key(0)))
  on = experiment.build_model(_digits_config("eps", guidance_embedding=True).model, 17,
                              (8, 8, 1), nnx.Rngs(key(0)))
  assert off.net.guidance_emb is None and on.net.guidance_emb is not None
  assert on.net.out_channels == 1 and on.net.base_measure


def test_imagen_build_model_reads_both_and_guidance_embedding():
  cfg = digits_base.get_config("runlocal").model
  default = imagen_experiment.build_model(cfg, 17, (8, 8, 1), nnx.Rngs(key(0)))
  assert default.net.out_channels == 1 and default.net.guidance_emb is None
  cfg.parameterization = "both"
  with cfg.unlocked():
    cfg.guidance_embedding = True
  stage = imagen_experiment.build_model(cfg, 17, (8, 8, 1), nnx.Rngs(key(0)))
  assert stage.net.out_channels == 2 and stage.net.conv_out.kernel.shape[-1] == 2
  assert stage.net.guidance_emb is not None and "guidance_w" in stage.net.cond_keys


# --- nets: guidance-weight conditioning ----------------------------------------------------


def _student_from_teacher(build):
  """A perturbed teacher, and a guidance-conditioned student given all its weights."""
  teacher = perturb(build())
  student = build(guidance_embedding=True)
  t_paths = set(dict(nnx.to_flat_state(nnx.state(teacher, nnx.Param))))
  s_paths = set(dict(nnx.to_flat_state(nnx.state(student, nnx.Param))))
  assert t_paths < s_paths and all(p[0] == "guidance_emb" for p in s_paths - t_paths)
  nnx.update(student, nnx.state(teacher, nnx.Param))
  return teacher, student


@pytest.mark.parametrize("name", BUILDERS)
def test_guidance_student_starts_as_its_teacher_and_then_depends_on_w(name):
  z, logsnr, cond = inputs()
  teacher, student = _student_from_teacher(BUILDERS[name])
  ref = apply(teacher, z, logsnr, cond)
  w_a, w_b = jnp.zeros((B,)), jnp.asarray([0.5, 3., 7.5])
  out_a = apply(student, z, logsnr, {**cond, "guidance_w": w_a})
  out_b = apply(student, z, logsnr, {**cond, "guidance_w": w_b})
  assert np.std(ref) > 1e-3   # the teacher's output is not trivially zero
  np.testing.assert_allclose(out_a, ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out_b, ref, rtol=1e-6, atol=1e-6)
  # Only the zero-initialised last layer hid w: perturb it and w changes every example.
  perturb(student.guidance_emb.dense1, scale=0.3, seed=2)
  out_a = apply(student, z, logsnr, {**cond, "guidance_w": w_a})
  out_b = apply(student, z, logsnr, {**cond, "guidance_w": w_b})
  diff = np.abs(out_a - out_b).reshape(B, -1).max(axis=1)
  assert np.all(diff > 1e-3), diff
  # A scalar w is the same w for every example.
  out_s = apply(student, z, logsnr, {**cond, "guidance_w": jnp.float32(0.)})
  np.testing.assert_allclose(out_s, out_a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", BUILDERS)
def test_guidance_flag_leaves_other_weights_unchanged_at_a_seed(name):
  """The embedding is built last, so a student at the teacher's seed has its weights."""
  off = dict(nnx.to_flat_state(nnx.state(BUILDERS[name](), nnx.Param)))
  on = dict(nnx.to_flat_state(nnx.state(BUILDERS[name](guidance_embedding=True), nnx.Param)))
  for path, var in off.items():
    np.testing.assert_array_equal(on[path].get_value(), var.get_value(), err_msg=str(path))


@pytest.mark.parametrize("name", BUILDERS)
def test_guidance_params_have_logical_axes(name):
  student = BUILDERS[name](guidance_embedding=True)
  specs = nnx.to_flat_state(nnx.get_partition_spec(
      nnx.state(student.guidance_emb, nnx.Param)))
  got = {path: tuple(v.get_value()) for path, v in specs}
  assert got == {("dense0", "kernel"): layers.EXPAND, ("dense0", "bias"): ("mlp",),
                 ("dense1", "kernel"): layers.PROJECT, ("dense1", "bias"): ("embed",)}


@pytest.mark.parametrize("name", BUILDERS)
def test_guidance_w_errors(name):
  z, logsnr, cond = inputs()
  student, teacher = BUILDERS[name](guidance_embedding=True), BUILDERS[name]()
  with pytest.raises(ValueError, match="guidance_embedding=True: pass cond\\['guidance_w'\\]"):
    student(z, logsnr, cond)
  with pytest.raises(ValueError, match="shape \\[B\\]=\\[3\\]"):
    student(z, logsnr, {**cond, "guidance_w": jnp.zeros((B, 1))})
  with pytest.raises(ValueError, match="unsupported cond keys \\['guidance_w'\\].*"
                                       "'guidance_w' needs guidance_embedding=True"):
    teacher(z, logsnr, {**cond, "guidance_w": jnp.zeros((B,))})
