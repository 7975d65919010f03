"""Progressive and guided distillation: targets, losses, samplers, and learning on a small
problem. Reference values come from closed forms and from numpy re-derivations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs.vdm import digits_cond
from distill import guided, progressive, sampling
from launch import families
from vdm import experiment, guidance, process, samplers, schedules


def _logsnrs(n, t):
  schedule = schedules.CosineLogSNR(-15.0, 15.0)
  return schedule(jnp.asarray(t)), schedule(jnp.asarray(t - 0.5 / n)), schedule(
      jnp.asarray(t - 1.0 / n))


def _nonlinear_teacher(z, logsnr, cond):
  """Any smooth denoiser: its x-hat depends on z and logsnr non-linearly."""
  del cond
  x = jnp.tanh(1.7 * z + 0.3 * process.per_example(logsnr, z) / 10.0) * 0.9
  return process.from_x(z, x, logsnr)


def test_exact_teacher_of_a_point_mass_gives_the_point_as_target():
  point = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, size=(1, 4, 4, 2)), jnp.float32)
  x = jnp.broadcast_to(point, (6, 4, 4, 2))
  teacher = lambda z, lam, c: process.from_x(z, x, lam)   # the exact posterior mean
  n = 8
  t = jnp.asarray([1.0, 0.75, 0.5, 0.25, 0.125, 2 / n])
  lam_t, lam_mid, lam_s = _logsnrs(n, t)
  z = process.diffuse(x, lam_t, jax.random.normal(jax.random.key(1), x.shape))
  for last in (False, True):
    target = progressive.distillation_target(teacher, z, lam_t, lam_mid, lam_s,
                                             jnp.full((6,), last))
    np.testing.assert_allclose(target, x, atol=2e-4)


@pytest.mark.parametrize("n", [2, 16, 256])
def test_one_student_ddim_step_from_the_target_reproduces_two_teacher_steps(n):
  rng = np.random.default_rng(n)
  t = jnp.asarray(rng.integers(1, n + 1, size=5) / n, jnp.float32)
  lam_t, lam_mid, lam_s = _logsnrs(n, t)
  z_t = jnp.asarray(rng.normal(size=(5, 3, 3, 1)), jnp.float32)
  target = progressive.distillation_target(_nonlinear_teacher, z_t, lam_t, lam_mid, lam_s,
                                           jnp.zeros((5,), bool))
  z_student = samplers.ddim_step(process.from_x(z_t, target, lam_t), z_t, lam_t, lam_s)
  # The two teacher steps in float64 numpy (DDIM eq. 12 with eps from x and z).
  def ddim(z, x, l_from, l_to):
    a_f, s_f = np.sqrt(1 / (1 + np.exp(-l_from))), np.sqrt(1 / (1 + np.exp(l_from)))
    a_t, s_t = np.sqrt(1 / (1 + np.exp(-l_to))), np.sqrt(1 / (1 + np.exp(l_to)))
    eps = (z - a_f * x) / s_f
    return a_t * x + s_t * eps
  col = lambda a: np.asarray(a, np.float64)[:, None, None, None]
  z64 = np.asarray(z_t, np.float64)
  x1 = np.asarray(_nonlinear_teacher(z_t, lam_t, None).x, np.float64)
  z_mid = ddim(z64, x1, col(lam_t), col(lam_mid))
  x2 = np.asarray(_nonlinear_teacher(jnp.asarray(z_mid, jnp.float32), lam_mid, None).x,
                  np.float64)
  z_s = ddim(z_mid, x2, col(lam_mid), col(lam_s))
  np.testing.assert_allclose(z_student, z_s, rtol=1e-4, atol=2e-5)


def test_last_step_target_is_the_teachers_x_hat_at_the_midpoint():
  n, z_t = 4, jnp.asarray(np.random.default_rng(3).normal(size=(2, 2, 2, 1)), jnp.float32)
  t = jnp.full((2,), 1.0 / n)
  lam_t, lam_mid, lam_s = _logsnrs(n, t)
  target = progressive.distillation_target(_nonlinear_teacher, z_t, lam_t, lam_mid, lam_s,
                                           jnp.ones((2,), bool))
  z_mid = samplers.ddim_step(_nonlinear_teacher(z_t, lam_t, None), z_t, lam_t, lam_mid)
  np.testing.assert_allclose(target, _nonlinear_teacher(z_mid, lam_mid, None).x, rtol=1e-6)


def test_student_times_lie_on_the_student_grid():
  i, t, t_mid, s = progressive.student_times(jax.random.key(0), 4000, 8)
  assert set(np.unique(np.asarray(i)).tolist()) == set(range(1, 9))
  np.testing.assert_allclose(t, np.asarray(i) / 8)
  np.testing.assert_allclose(t - t_mid, 1 / 16, rtol=1e-6)
  np.testing.assert_allclose(t - s, 1 / 8, rtol=1e-6)


@pytest.mark.parametrize("weighting,weight", [
    ("truncated_snr", lambda snr: np.maximum(snr, 1.0)),
    ("snr_plus_one", lambda snr: snr + 1.0),
    ("x_mse", lambda snr: np.ones_like(snr))])
def test_x_space_loss_weights(weighting, weight):
  logsnr = jnp.asarray([-4.0, 0.0, 3.0])
  a = jnp.asarray(np.random.default_rng(4).normal(size=(3, 2, 2, 1)), jnp.float32)
  b = jnp.zeros_like(a)
  want = 0.5 * weight(np.exp(np.asarray(logsnr))) * np.sum(np.asarray(a) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(progressive.x_space_loss(a, b, logsnr, weighting), want, rtol=1e-5)
  with pytest.raises(ValueError, match="distillation weighting"):
    progressive.x_space_loss(a, b, logsnr, "elbo")


def test_forward_noise_has_the_marginal_of_the_forward_process():
  x, lam_r, lam_u = 0.6, 2.0, -1.0
  n = 200_000
  k1, k2 = jax.random.split(jax.random.key(5))
  z_r = process.diffuse(jnp.full((n, 1), x), jnp.full((n,), lam_r), jax.random.normal(k1, (n, 1)))
  z_u = sampling.forward_noise(z_r, jnp.full((n,), lam_r), jnp.full((n,), lam_u),
                               jax.random.normal(k2, (n, 1)))
  alpha_u, sigma_u = np.sqrt(1 / (1 + np.exp(-lam_u))), np.sqrt(1 / (1 + np.exp(lam_u)))
  assert abs(float(jnp.mean(z_u)) - alpha_u * x) < 5e-3
  assert abs(float(jnp.std(z_u)) - sigma_u) < 5e-3


@pytest.mark.parametrize("sampler", ["ddim", "stochastic"])
def test_distilled_samplers_return_the_point_for_an_exact_point_mass_denoiser(sampler):
  point = jnp.asarray(np.random.default_rng(6).uniform(-0.9, 0.9, size=(1, 3, 3, 1)))
  denoise = lambda z, lam, c: process.from_x(z, jnp.broadcast_to(point, z.shape), lam)
  out = sampling.sample(denoise, schedules.CosineLogSNR(-15.0, 15.0), (4, 3, 3, 1),
                        jax.random.key(0), num_steps=4, sampler=sampler)
  np.testing.assert_allclose(out, jnp.broadcast_to(point, out.shape), atol=1e-5)
  with pytest.raises(ValueError, match="unknown distilled sampler"):
    sampling.sample(denoise, schedules.CosineLogSNR(), (1, 3, 3, 1), jax.random.key(0),
                    num_steps=2, sampler="ancestral")


def test_stochastic_sampler_differs_from_ddim_and_varies_with_the_seed():
  """A denoiser with a spread posterior (x-hat shrinks z): fresh noise changes the result."""
  denoise = lambda z, lam, c: process.from_x(z, 0.5 * jnp.tanh(z), lam)
  kw = dict(num_steps=4, sampler="stochastic")
  logsnr_fn = schedules.CosineLogSNR(-15.0, 15.0)
  a = sampling.sample(denoise, logsnr_fn, (8, 2, 2, 1), jax.random.key(0), **kw)
  b = sampling.sample(denoise, logsnr_fn, (8, 2, 2, 1), jax.random.key(1), **kw)
  d = sampling.sample(denoise, logsnr_fn, (8, 2, 2, 1), jax.random.key(0), num_steps=4)
  assert float(jnp.abs(a - b).max()) > 1e-3 and float(jnp.abs(a - d).max()) > 1e-3


# ------------------------------------------------------------------ guided stage one, learning


def _guided_setup():
  """A tiny class-conditional VDM teacher and its w-conditioned student (a copy)."""
  cfg = digits_cond.get_config("runlocal")
  teacher = experiment.build_model(cfg.model, 17, (8, 8, 1), nnx.Rngs(0))
  # Make conditional and unconditional predictions differ: perturb the teacher's weights.
  params = nnx.state(teacher, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [p + 0.3 * jax.random.normal(k, p.shape)
                                        for p, k in zip(leaves, keys)])
  nnx.update(teacher, params)
  cfg.model.guidance_embedding = True
  student = experiment.build_model(cfg.model, 17, (8, 8, 1), nnx.Rngs(0))
  nnx.update(student, nnx.state(teacher, nnx.Param))
  return cfg, teacher, student


def test_guided_student_learns_the_guided_teacher_across_the_w_range():
  cfg, teacher, student = _guided_setup()
  cfg.distill = dict(kind="guided", base_family="vdm", weighting="x_mse", clip="none",
                     w_min=0.0, w_max=4.0, teacher_guidance_embedding=False, student_steps=1,
                     sampler="ddim", sample_w=1.0)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 17, size=(32, 8, 8, 1)))
  batch = {"image": images, "label": jnp.arange(32) % 10}
  # Held-out check points: fixed (z, logsnr, w) over the whole w range.
  x = images / 8.0 - 1.0
  z, logsnr = guided.stage_one_inputs(jax.random.key(9), x, teacher.logsnr)
  w_grid = jnp.linspace(0.0, 4.0, 32)
  cond = {"label": batch["label"]}
  want = guided.guided_target(lambda a, b, c: teacher.denoise(a, b, c), z, logsnr, cond, w_grid,
                              guidance.drop_label)

  def error(student_params):
    s = nnx.merge(graphdef, student_params)
    got = s.denoise(z, logsnr, guided.with_guidance_weight(cond, w_grid)).x
    return float(jnp.mean(jnp.square(got - want)))

  graphdef, params = nnx.split(student, nnx.Param)
  # At init the student is the conditional teacher: exact at w = 0 only.
  s0 = nnx.merge(graphdef, params)
  got0 = s0.denoise(z, logsnr, guided.with_guidance_weight(cond, jnp.zeros(32))).x
  np.testing.assert_allclose(got0, teacher.denoise(z, logsnr, cond).x, rtol=1e-5, atol=1e-6)
  tx = optax.adam(optax.linear_schedule(3e-3, 3e-4, 120))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, rng):
    _, _, grads = families.get_family("distill").loss_and_grads(graphdef, params, batch, rng, cfg, teacher)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  errors = [error(params)]
  for k in range(3):
    for i in range(40):
      params, opt_state = step(params, opt_state, jax.random.key(100 * k + i))
    errors.append(error(params))
  # Measured: 0.50 -> 0.31 -> 0.28 -> 0.28 (the tiny net's capacity bounds the rest).
  assert errors[0] > 1e-2, errors
  assert errors[-1] < 0.65 * errors[0] and errors[-1] < errors[1], errors


def test_imagen_sr_stage_distils_with_its_text_and_lowres_input_passed_through():
  """The family's loss for an Imagen SR teacher equals the loss assembled by hand from the
  stage's own conditioning (text + augmented low-res input) and the pure target function."""
  from configs.imagen import digits_sr  # pylint: disable=g-import-not-at-top
  from imagen import experiment as imagen_experiment  # pylint: disable=g-import-not-at-top
  config = digits_sr.get_config("runlocal")
  teacher = imagen_experiment.build_model(config.model, 17, (8, 8, 1), nnx.Rngs(0))
  config.distill = dict(kind="progressive", base_family="imagen", weighting="truncated_snr",
                        clip="none", w_min=0.0, w_max=0.0, teacher_guidance_embedding=False,
                        student_steps=4, sampler="ddim", sample_w=0.0)
  config.optim.weight_decay = 0.0
  rng_np = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng_np.integers(0, 17, size=(4, 8, 8, 1))),
           "text_emb": jnp.asarray(rng_np.normal(size=(4, 5, 32)), jnp.float32),
           "text_mask": jnp.asarray([[1, 1, 1, 0, 0]] * 4, jnp.int32)}
  graphdef, params = nnx.split(teacher, nnx.Param)
  params = jax.tree.map(lambda p: p + 0.05, params)      # a student that differs a little
  rng = jax.random.key(3)
  loss, _, grads = jax.jit(lambda p: families.get_family("distill").loss_and_grads(
      graphdef, p, batch, rng, config, teacher))(params)

  @jax.jit
  def by_hand(params):
    return _sr_loss_by_hand(teacher, graphdef, params, batch, rng, config)

  np.testing.assert_allclose(loss, by_hand(params), rtol=1e-5)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  config.optim.weight_decay = 0.01
  with pytest.raises(ValueError, match="weight_decay=0"):
    families.get_family("distill").loss_and_grads(graphdef, params, batch, rng, config, teacher)


def _sr_loss_by_hand(teacher, graphdef, params, batch, rng, config):
  import math  # pylint: disable=g-import-not-at-top
  from imagen import experiment as imagen_experiment  # pylint: disable=g-import-not-at-top
  k_cond, _, k_times = jax.random.split(rng, 3)
  cond = imagen_experiment.stage_cond(teacher, batch, k_cond, config.model, train=False)
  assert set(cond) == {"text_emb", "text_mask", "lowres", "aug_logsnr"}
  x = imagen_experiment.stage_images(teacher, batch)
  k_i, k_eps = jax.random.split(k_times)
  i, t, t_mid, s = progressive.student_times(k_i, 4, 4)
  lam = teacher.logsnr(t)
  z = process.diffuse(x, lam, jax.random.normal(k_eps, x.shape))
  target = progressive.distillation_target(lambda a, b, c: teacher.denoise(a, b, c), z, lam,
                                           teacher.logsnr(t_mid), teacher.logsnr(s), i == 1,
                                           cond)
  student = nnx.merge(graphdef, params)
  return progressive.x_space_loss(target, student.denoise(z, lam, cond).x, lam,
                                  "truncated_snr").mean() / (64 * math.log(2.0))
