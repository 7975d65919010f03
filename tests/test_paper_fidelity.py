"""Places where the code once deviated silently from the papers and their reference code.

Each test fails on the code before the fix: progressive distillation regressed on a clipped
teacher, VDM's monotone schedule started far from the linear one, the cosine schedule lost
float32 precision near t = 1, guidance at w = 0 ran the network twice, and the train step's
non-finite guard made the compiled program grow quadratically with depth.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from configs.distill import common as distill_common
from configs.vdm import digits
from distill import experiment as distill_experiment
from distill import progressive
from launch import train_state
from vdm import experiment, guidance, losses, process, samplers, schedules


# ---------------------------------------------------------------- 1. unclipped teacher targets


def _perturbed_v_teacher():
  """A tiny v-parameterized digits teacher whose x-hat leaves [-1, 1] (weights perturbed)."""
  cfg = digits.get_config("runlocal")
  cfg.model.parameterization = "v"
  cfg.model.guidance_embedding = False
  teacher = experiment.build_model(cfg.model, 17, (8, 8, 1), nnx.Rngs(0))
  params = nnx.state(teacher, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(teacher, jax.tree.unflatten(
      treedef, [p + 0.5 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]))
  return cfg, teacher


def _loss_by_hand(teacher, graphdef, params, batch, rng, clip_x):
  """Algorithm 2 of Salimans & Ho written out, with the teacher's x-hat through clip_x."""
  _, _, k_times = jax.random.split(rng, 3)
  x = losses.int_to_x(batch["image"], 17)
  k_i, k_eps = jax.random.split(k_times)
  i, t, t_mid, s = progressive.student_times(k_i, x.shape[0], 2)
  lam = teacher.logsnr(t)
  z = process.diffuse(x, lam, jax.random.normal(k_eps, x.shape))
  teacher_fn = lambda a, b, c: samplers.clip_prediction(teacher.denoise(a, b, c), a, b, clip_x)
  target = progressive.distillation_target(teacher_fn, z, lam, teacher.logsnr(t_mid),
                                           teacher.logsnr(s), i == 1)
  x_hat = nnx.merge(graphdef, params).denoise(z, lam).x
  return progressive.x_space_loss(target, x_hat, lam, "truncated_snr").mean() / (
      64 * math.log(2.0))


def test_progressive_targets_use_the_unclipped_teacher_by_default():
  cfg, teacher = _perturbed_v_teacher()
  dcfg = distill_common.base_config().distill
  dcfg.update(dict(kind="progressive", student_steps=2, teacher_guidance_embedding=False))
  assert dcfg.clip == "static" and dcfg.target_clip == "none"   # sampling clips, targets not
  batch = {"image": jnp.asarray(np.random.default_rng(0).integers(0, 17, size=(16, 8, 8, 1))),
           "label": jnp.zeros(16, jnp.int32)}
  graphdef, params = nnx.split(teacher, nnx.Param)
  params = jax.tree.map(lambda p: p + 0.01, params)
  rng = jax.random.key(4)
  # The teacher's x-hat really leaves [-1, 1] here, so clipping would change the targets.
  z = jax.random.normal(jax.random.key(0), (16, 8, 8, 1))
  assert float(jnp.max(jnp.abs(teacher.denoise(z, teacher.logsnr(jnp.ones(16))).x))) > 1.5
  # Both sides jitted: the large truncated-SNR weights amplify eager-vs-jit rounding.
  family = lambda: jax.jit(lambda p: distill_experiment.loss_and_grads(   # traced per call
      graphdef, p, batch, rng, dcfg, cfg.model, teacher)[0])(params)
  by_hand = lambda clip_x: jax.jit(
      lambda p: _loss_by_hand(teacher, graphdef, p, batch, rng, clip_x))(params)
  unclipped, clipped = by_hand(samplers.no_clip), by_hand(samplers.static_clip())
  np.testing.assert_allclose(family(), unclipped, rtol=1e-5)
  assert abs(float(clipped) - float(unclipped)) > 0.03 * abs(float(unclipped))
  dcfg.target_clip = "static"          # the old behaviour, still available by name
  np.testing.assert_allclose(family(), clipped, rtol=1e-5)


# ------------------------------------------------------------ 3. VDM's monotone schedule at init


def test_monotone_network_schedule_starts_as_the_linear_schedule():
  """google-research/vdm initialises l2, l3 with std 0.01 and a zero bias: gamma(t) starts
  within ~1e-4 of gamma_min + (gamma_max - gamma_min) t (it was off by whole units)."""
  for seed in range(3):
    sched = schedules.LearnedMonotoneNet(-13.3, 5.0, n_features=1024, rngs=nnx.Rngs(seed))
    t = jnp.linspace(0.0, 1.0, 11)
    gamma = np.asarray(sched.gamma(t), np.float64)
    np.testing.assert_allclose(gamma[[0, -1]], [-13.3, 5.0], atol=1e-4)
    np.testing.assert_allclose(gamma, -13.3 + 18.3 * np.asarray(t, np.float64), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(sched.l2.bias.value), 0.0)
    assert 0.005 < float(jnp.std(sched.l2.kernel.value)) < 0.02


# ------------------------------------------------------------- 4. cosine precision near t = 1


def test_cosine_schedule_is_float32_exact_over_the_whole_interval():
  """Against float64: |error| <= 1e-6 wherever |logsnr| < 16, and within one float32 ulp of
  the true value everywhere (ulp = 1.9e-6 for |logsnr| in [16, 32), so 1e-6 is below
  float32's own resolution there). Before the fix logsnr(1) was -19.99917."""
  sched = schedules.CosineLogSNR(-20.0, 20.0)
  t = np.concatenate([np.linspace(0, 1, 100_001, dtype=np.float32),
                      (1 - np.logspace(-7, -1, 500)).astype(np.float32), [1.0]])
  t = t.astype(np.float32)
  got = np.asarray(jax.jit(sched)(jnp.asarray(t)), np.float64)
  u_min, u_max = math.atan(math.exp(-10.0)), math.atan(math.exp(10.0))
  want = -2.0 * np.log(np.tan(u_min + t.astype(np.float64) * (u_max - u_min)))
  err = np.abs(got - want)
  assert got[-1] == -20.0 and got[0] == 20.0
  small = np.abs(want) < 16
  assert err[small].max() < 1e-6, err[small].max()
  ulp = np.spacing(np.abs(want[~small]).astype(np.float32)).astype(np.float64)
  assert np.all(err[~small] <= ulp), (err[~small] / ulp).max()


# ------------------------------------------------------------------ 5. guidance at w = 0


def test_guidance_at_w_zero_runs_the_network_once():
  calls = []

  def denoise(z, logsnr, cond):
    calls.append(z.shape[0])
    return process.from_x(z, jnp.tanh(z) + cond["label"][:, None, None, None], logsnr)

  z = jnp.ones((3, 4, 4, 1))
  logsnr = jnp.zeros(3)
  cond = {"label": jnp.arange(3, dtype=jnp.float32)}
  plain = denoise(z, logsnr, cond).x
  calls.clear()
  got = guidance.guided(denoise, 0.0, guidance.drop_label)(z, logsnr, cond).x
  assert calls == [3]                     # one pass of B, not one of 2B
  np.testing.assert_array_equal(got, plain)
  calls.clear()
  guidance.guided(denoise, 1.0, guidance.drop_label)(z, logsnr, cond)
  assert calls == [6]


# ------------------------------------------------------- 6. the non-finite guard compiles small


def _optimized_hlo_instructions(num_leaves: int) -> int:
  """Optimized-HLO size of the train step of a model with `num_leaves` weight matrices."""
  params = {f"w{i}": jnp.full((8, 8), 0.1 * (i + 1)) for i in range(num_leaves)}
  tx = optax.adamw(1e-3)
  state = train_state.init_state(params, tx, 0)

  def loss_and_grads(p, batch, rng):
    del rng
    loss_fn = lambda q: sum(jnp.sum(jnp.tanh(batch["x"] @ w) ** 2) for w in q.values())
    loss, grads = jax.value_and_grad(loss_fn)(p)
    return loss, {"loss": loss}, grads

  step = train_state.make_train_step(loss_and_grads, tx, ema_decay=0.99)
  text = jax.jit(step).lower(state, {"x": jnp.ones((4, 8))}).compile().as_text()
  return sum(1 for line in text.splitlines() if " = " in line)


def test_train_step_program_grows_linearly_with_the_number_of_weights():
  """The per-leaf jnp.where guard made XLA copy the all-leaves finiteness test into every
  fusion that touches a leaf: the program grew quadratically in the number of parameter
  leaves (so in depth, for nets with one module per block). With one lax.cond, the second
  difference of the instruction count over 8, 16, 24 leaves is a small fraction of the
  first difference."""
  n1, n2, n3 = (_optimized_hlo_instructions(k) for k in (8, 16, 24))
  first, second = n2 - n1, (n3 - n2) - (n2 - n1)
  assert first > 0
  assert abs(second) < 0.1 * first, (n1, n2, n3)


def test_a_nonfinite_update_leaves_the_whole_state_unchanged():
  params = {"w": jnp.ones((3,)), "b": jnp.zeros(())}
  tx = optax.adam(0.1)
  state = train_state.init_state(params, tx, 0)

  def loss_and_grads(p, batch, rng):
    del rng
    loss = jnp.sum(p["w"] * batch["scale"]) + p["b"]
    return loss, {"loss": loss}, jax.grad(lambda q: jnp.sum(q["w"] * batch["scale"]) + q["b"])(p)

  step = jax.jit(train_state.make_train_step(loss_and_grads, tx, ema_decay=0.9))
  good, m_good = step(state, {"scale": jnp.ones(3)})
  assert float(m_good["nonfinite"]) == 0 and int(good["step"]) == 1
  assert not np.allclose(good["params"]["w"], 1.0)
  bad, m_bad = step(good, {"scale": jnp.array([1.0, jnp.nan, 1.0])})
  assert float(m_bad["nonfinite"]) == 1 and int(bad["step"]) == 2
  for key in ("params", "opt_state", "ema"):
    jax.tree.map(np.testing.assert_array_equal, bad[key], good[key])
