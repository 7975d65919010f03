"""Guidance interval (Kynkaanniemi et al. 2024) and autoguidance (Karras et al. 2024):
vdm/guidance.py against numpy, and the launch path that loads a guide from a workdir."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from launch import checkpoint, config_flags
from launch import setup as setup_lib
from launch import workdir as workdir_lib
from vdm import guidance, process

B, SHAPE = 6, (4, 4, 1)
LOGSNR = np.array([-6.0, -2.5, -1.0, 0.5, 3.0, 7.5], np.float32)   # spans [logsnr_min, max]


def _toy(scale: float):
  """A denoiser whose x-hat depends on z, logsnr and the label (-1 = the null class):
  x = tanh(scale * (1 + 0.3 label) * z + 0.1 logsnr)."""
  def denoise(z, logsnr, cond):
    label = jnp.asarray(cond["label"], jnp.float32) if cond else jnp.zeros(z.shape[:1])
    a = process.per_example(scale * (1.0 + 0.3 * label), z)
    x = jnp.tanh(a * z + 0.1 * process.per_example(logsnr, z))
    return process.from_x(z, x, logsnr)
  return denoise


def _inputs():
  z = np.random.default_rng(0).normal(size=(B,) + SHAPE).astype(np.float32)
  return jnp.asarray(z), jnp.asarray(LOGSNR), {"label": jnp.arange(B) % 10}


def _np(pred):
  return [np.asarray(a, np.float64) for a in pred]


def _expected(main, other, w, inside, logsnr):
  """numpy: (1 + w) main - w other on x and eps where inside, main elsewhere; v from both."""
  w = np.broadcast_to(np.asarray(w, np.float64), (B,)).reshape(-1, 1, 1, 1)
  on = inside.reshape(-1, 1, 1, 1)
  x = np.where(on, (1 + w) * main[0] - w * other[0], main[0])
  eps = np.where(on, (1 + w) * main[1] - w * other[1], main[1])
  a2 = 1.0 / (1.0 + np.exp(-logsnr.astype(np.float64)))
  alpha, sigma = np.sqrt(a2).reshape(-1, 1, 1, 1), np.sqrt(1 - a2).reshape(-1, 1, 1, 1)
  v = np.where(on, alpha * eps - sigma * x, main[2])
  return x, eps, v


def test_interval_from_sigma_matches_edm_sigma():
  """Kynkaanniemi et al.'s ImageNet-512 interval sigma in (0.28, 2.9] maps to logsnr in
  [-2.13, 2.55], and at those logsnr the VP latent's noise in data units, sigma / alpha
  (z / alpha = x + (sigma / alpha) eps), is the given sigma."""
  lo, hi = guidance.logsnr_interval_from_sigma(*guidance.EDM2_IMAGENET512_SIGMA)
  np.testing.assert_allclose([lo, hi], [-2.1294, 2.5459], atol=1e-4)
  alpha, sigma = process.alpha_sigma(jnp.array([hi, lo]))
  np.testing.assert_allclose(np.asarray(sigma / alpha), [0.28, 2.9], rtol=1e-5)
  assert guidance.check_interval(()) is None and guidance.check_interval(None) is None
  with pytest.raises(ValueError, match="lo > hi"):
    guidance.check_interval((3.0, 1.0))
  with pytest.raises(ValueError, match=r"\(lo, hi\)"):
    guidance.check_interval((1.0, 2.0, 3.0))


def test_guidance_interval_selects_per_example():
  z, logsnr, cond = _inputs()
  f = _toy(1.0)
  w = jnp.array([0.5, 1.0, 2.0, 3.0, 4.0, 1.5])
  plain = guidance.guided(f, w, guidance.drop_label)(z, logsnr, cond)
  # An interval covering all of [logsnr_min, logsnr_max] is plain CFG, bit for bit.
  covering = guidance.guided(f, w, guidance.drop_label, interval=(-6.0, 7.5))(z, logsnr, cond)
  for a, b in zip(covering, plain):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # No overlap: the conditional model itself.
  conditional = f(z, logsnr, cond)
  outside = guidance.guided(f, w, guidance.drop_label, interval=(20.0, 30.0))(z, logsnr, cond)
  for a, b in zip(outside, conditional):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  # Part of the batch inside: against numpy from the two branches computed separately.
  uncond = f(z, logsnr, {"label": jnp.full((B,), -1)})
  inside = (LOGSNR >= -2.13) & (LOGSNR <= 2.55)
  assert 0 < inside.sum() < B
  got = jax.jit(lambda z, l, c: guidance.guided(f, w, guidance.drop_label,
                                                interval=(-2.13, 2.55))(z, l, c))(z, logsnr, cond)
  for a, b in zip(_np(got), _expected(_np(conditional), _np(uncond), w, inside, LOGSNR)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_autoguidance_against_numpy():
  z, logsnr, cond = _inputs()
  main, bad = _toy(1.0), _toy(0.6)
  for w in (0.7, 3.0):   # guide == model: the model, whatever w
    same = guidance.autoguided(main, main, w)(z, logsnr, cond)
    for a, b in zip(_np(same), _np(main(z, logsnr, cond))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  m, g = _np(main(z, logsnr, cond)), _np(bad(z, logsnr, cond))
  everywhere = np.ones(B, bool)
  got = guidance.autoguided(main, bad, 2.0)(z, logsnr, cond)
  for a, b in zip(_np(got), _expected(m, g, 2.0, everywhere, LOGSNR)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  inside = (LOGSNR >= -1.0) & (LOGSNR <= 3.0)
  got = jax.jit(lambda z, l, c: guidance.autoguided(main, bad, 2.0, (-1.0, 3.0))(z, l, c))(
      z, logsnr, cond)
  for a, b in zip(_np(got), _expected(m, g, 2.0, inside, LOGSNR)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_autoguidance_checks_the_guide():
  z, logsnr, cond = _inputs()

  def never(*args):
    raise AssertionError("the guide runs at w = 0")

  # Python w = 0 is the model alone; a guide of another shape is refused by name.
  assert guidance.autoguided(_toy(1.0), never, 0) is not None
  guidance.autoguided(_toy(1.0), never, 0)(z, logsnr, cond)
  smaller = lambda z, l, c: _toy(1.0)(z[:, :2], l, c)
  with pytest.raises(ValueError, match="guide predicts x-hat of shape"):
    guidance.autoguided(_toy(1.0), smaller, 1.0)(z, logsnr, cond)


def test_guidance_interval_flag():
  assert workdir_lib.parse_guidance_interval(None) is None
  assert workdir_lib.parse_guidance_interval("none") == ()
  assert workdir_lib.parse_guidance_interval("-2,2.5") == (-2.0, 2.5)
  lo, hi = workdir_lib.parse_guidance_interval("sigma:0.28,2.9")
  np.testing.assert_allclose([lo, hi], [-2 * math.log(2.9), -2 * math.log(0.28)])
  with pytest.raises(config_flags.InputError, match="lo > hi"):
    workdir_lib.parse_guidance_interval("2,1")


# --------------------------------------------------------------- a guide from a workdir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """The digits runlocal model (unconditional) saved at step 3 and, with other EMA weights,
  at step 6: the guide is the step-3 checkpoint of the same workdir. Host arrays, saved
  synchronously: orbax slices sharded arrays shard by shard (a compile per slice shape), and
  that costs more than the rest of this file."""
  root = tmp_path_factory.mktemp("guide") / "run"
  config = config_flags.load_config("configs/vdm/digits.py:runlocal", [])
  setup = setup_lib.build(config)
  state = jax.tree.map(np.asarray, setup.init())   # host arrays: orbax saves them whole
  later = dict(state, ema=jax.tree.map(lambda a: a * 1.05 + 0.01, state["ema"]))
  with checkpoint.Checkpointer(root, save_every=1, keep=10, async_save=False) as ckpt:
    ckpt.save(3, state, config=config)
    ckpt.save(6, later, config=config)
  return str(root)


def _load(workdir, **overrides):
  setup, state, ckpt = workdir_lib.load_workdir(
      workdir, overrides={f"eval.{k}": v for k, v in overrides.items()})
  ckpt.close()
  return setup, state["ema"]


def test_guide_step_of_the_same_workdir(workdir):
  setup, ema = _load(workdir, guidance_w=1.0)
  guide = workdir_lib.load_guide(setup, workdir, guide_step=3)
  guide_leaves = jax.tree.leaves(jax.tree.map(np.asarray, guide))
  main_leaves = jax.tree.leaves(jax.tree.map(np.asarray, ema))
  assert any(not np.allclose(a, b) for a, b in zip(guide_leaves, main_leaves))
  rng = jax.random.key(0)
  sample = lambda s, p, g: workdir_lib.sample_images(s, p, rng, num=8, num_steps=4, guide=g)
  unguided = sample(setup, ema, None)
  # The earlier checkpoint guides: samples move. The model as its own guide is the model:
  # (1 + w) D - w D = D (up to rounding, which may move a level).
  assert np.abs(sample(setup, ema, guide).astype(int) - unguided).mean() > 0.1
  self_guided = sample(setup, ema, setup_lib.model_with(setup, ema))
  assert np.abs(self_guided.astype(int) - unguided).max() <= 1
  # eval.guidance_interval outside the schedule's logsnr range: no guidance at any step.
  setup_off, _ = _load(workdir, guidance_w=1.0, guidance_interval=(50.0, 60.0))
  np.testing.assert_array_equal(sample(setup_off, ema, guide), unguided)
  with pytest.raises(config_flags.InputError, match="--guide_workdir"):
    workdir_lib.load_guide(setup, workdir)


def test_sampling_follows_an_eval_config_changed_after_loading(workdir):
  """workdir.sample_images compiles once per setup and eval section: changing the sampler
  on a loaded setup samples with the new one (ancestral draws noise, DDIM does not), and
  changing it back gives the first samples again."""
  setup, ema = _load(workdir)
  rng = jax.random.key(1)
  sample = lambda: workdir_lib.sample_images(setup, ema, rng, num=8, num_steps=4)
  first = sample()
  setup.config.eval.sampler = "ancestral" if setup.config.eval.sampler != "ancestral" else "ddim"
  assert np.abs(sample().astype(int) - first).mean() > 0.1
  setup.config.eval.sampler = "ddim" if setup.config.eval.sampler == "ancestral" else "ancestral"
  np.testing.assert_array_equal(sample(), first)
