"""Self-conditioning (Chen et al. 2022, "Analog Bits", sec. 3.2; vdm/self_conditioning.py).

  * a self-conditioned model whose extra input weights (those that read x_self) are zero is
    the plain model with the same other weights, for every net family;
  * the 50% rule of training (Algorithm 1) against a hand-computed first pass, and no
    gradient through that pass;
  * one train step of each family (VDM, Imagen SR stage, video stage) from perturbed
    weights: its loss equals a recomputation whose x_self is built by hand here, and the
    weights that read x_self move (they get no gradient when x_self is always zero).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen import experiment as imagen_experiment
from imagen import video_experiment
from launch import config_flags, families, trainer
from launch import setup as setup_lib
from launch.data import pipeline
from tests import runtime_helpers as h
from vdm import experiment as vdm_experiment
from vdm import losses, process, schedules, self_conditioning

VDM_CONFIG = "configs/vdm/digits.py:runlocal"
SR_CONFIG = "configs/imagen/digits_sr.py:runlocal"
VIDEO_CONFIG = "configs/video/moving_digits.py:runlocal"
# A one-level video net over 4 frames of 6x6 (cheap to compile), without the CoordConv
# channels, so conv_in reads [z] or [z, x_self].
VIDEO_TINY = ("data.name=moving_digits:4x12x12", "model.num_frames=4", "model.resolution=6",
              "model.unet_overrides.ch_mult=(1,)", "model.unet_overrides.num_res_blocks=(1,)",
              "model.unet_overrides.attn_resolutions=()",
              "model.unet_overrides.cross_attn_resolutions=(6,)",
              "model.unet_overrides.temporal_attn_resolutions=(6,)",
              "model.unet_overrides.temporal_conv_resolutions=()",
              "model.joint_image_fraction=0.0", "model.p_uncond=0.0", "model.coord_cond=False")
# Fixed schedule, constant lr, no evaluation or sampling: the step alone.
STEP = ("model.schedule.name=linear", "optim.decay=constant", "optim.warmup_steps=0",
        "train.eval_every=0", "train.sample_every=0", "mesh.ici=(1, 1, 1)")


def _perturbed(tree, seed=1, scale=0.1):
  """Every leaf plus numpy noise, so the zero-initialised output convs stop hiding x_self."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: np.asarray(p) + scale * rng.standard_normal(p.shape).astype(
      np.float32), tree)


def _text(batch_size, length=3, dim=32, seed=0):
  rng = np.random.default_rng(seed)
  return {"text_emb": jnp.asarray(rng.normal(size=(batch_size, length, dim)), jnp.float32),
          "text_mask": jnp.asarray([[1, 1, 0]] * batch_size, jnp.int32)}


# ---------------------------------------------------------- zero extra weights = plain model


def _score_unet_rows(c, n):
  """conv_in input rows of the plain ScoreUNet inside the self-conditioned one: inputs are
  [z, fourier(z)] = [z (C), sin (C N), cos (C N)] against [z, x_self, sin of both (2 C N),
  cos of both (2 C N)], channel c's N features contiguous (layers.fourier_features)."""
  z = list(range(c))
  sin = [2 * c + j for j in range(c * n)]
  cos = [2 * c + 2 * c * n + j for j in range(c * n)]
  return z + sin + cos


def _vdm_case(net):
  unet = ["model.unet.ch=8", "model.unet.ch_mult=(1, 2)", "model.unet.attn_resolutions=(4,)"]

  def make(sc):
    cfg = config_flags.load_config(VDM_CONFIG, [f"model.net={net}", f"model.self_condition={sc}"]
                                   + (unet if net == "unet" else [])).model
    return vdm_experiment.build_model(cfg, 17, (8, 8, 1), nnx.Rngs(0))

  score = config_flags.load_config(VDM_CONFIG, []).model.score_unet
  rows = (_score_unet_rows(1, score.fourier_max - score.fourier_min + 1)
          if net == "score_unet" else [0])
  return make, rows, (3, 8, 8, 1), lambda b: None


def _sr_case():
  def make(sc):
    cfg = config_flags.load_config(SR_CONFIG, [f"model.self_condition={sc}"]).model
    return imagen_experiment.build_model(cfg, 17, (8, 8, 1), nnx.Rngs(0))

  def cond(b):
    low = jax.random.normal(jax.random.key(5), (b, 8, 8, 1))
    return {**_text(b), "lowres": low, "aug_logsnr": jnp.linspace(-2.0, 3.0, b)}

  return make, [0, 2], (3, 8, 8, 1), cond   # [z, lowres] -> [z, x_self, lowres]


def _video_case():
  def make(sc):
    cfg = config_flags.load_config(VIDEO_CONFIG, list(VIDEO_TINY) +
                                   [f"model.self_condition={sc}"]).model
    return video_experiment.build_model(cfg, 17, (4, 12, 12, 1), nnx.Rngs(0))

  return make, [0], (2, 4, 6, 6, 1), _text


@pytest.mark.parametrize("case", ["score_unet", "unet", "efficient_unet_sr", "video_unet"])
def test_zero_weights_on_x_self_give_the_plain_model(case):
  """Self-conditioned model, its conv_in rows that read x_self (and, for the ScoreUNet, its
  Fourier features) set to zero and every other weight copied from a plain model (random
  weights: no zero-initialised layer hides anything): the same prediction as the plain
  model, for zeros or any x_self. With those rows nonzero, x_self changes the prediction."""
  make, rows, shape, cond_fn = {"score_unet": lambda: _vdm_case("score_unet"),
                                "unet": lambda: _vdm_case("unet"),
                                "efficient_unet_sr": _sr_case,
                                "video_unet": _video_case}[case]()
  (plain, p_plain), (sc, p_sc) = _abstract(make, False), _abstract(make, True)
  assert not plain.self_condition and sc.self_condition
  rng = np.random.default_rng(1)
  p_plain = jax.tree.map(lambda a: 0.3 * rng.standard_normal(a.shape).astype(np.float32),
                         p_plain)
  k_plain, k_sc = p_plain["net"]["conv_in"]["kernel"], p_sc["net"]["conv_in"]["kernel"]
  extra = [r for r in range(k_sc.shape[2]) if r not in rows]
  assert k_sc.shape[2] == 2 * k_plain.shape[2] - (1 if case == "efficient_unet_sr" else 0)
  copied = jax.tree.map(lambda a: a, p_plain)
  kernel = np.zeros(k_sc.shape, np.float32)
  kernel[:, :, rows] = k_plain
  copied["net"]["conv_in"]["kernel"] = kernel
  jax.tree.map(lambda a, b: None if a.shape == b.shape else pytest.fail(f"{a.shape} {b.shape}"),
               p_sc, copied)   # every other weight has the plain model's shape

  b = shape[0]
  z = jax.random.normal(jax.random.key(1), shape)
  lam = jnp.linspace(-2.0, 4.0, b)
  cond = cond_fn(b)
  x_self = jax.random.uniform(jax.random.key(2), shape, minval=-1.0, maxval=1.0)
  want = _denoise(plain)(_params(plain, p_plain), z, lam, cond)
  sc_denoise = _denoise(sc)
  for xs in (jnp.zeros(shape), x_self):
    got = sc_denoise(_params(sc, copied), z, lam, self_conditioning.with_x_self(cond, xs))
    np.testing.assert_allclose(got.eps, want.eps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.x, want.x, rtol=1e-5, atol=1e-5)
  # The x_self rows do reach the output when they are not zero.
  kernel[:, :, extra] = 0.3
  moved = sc_denoise(_params(sc, copied), z, lam,
                     self_conditioning.with_x_self(cond, x_self)).eps
  assert float(jnp.abs(moved - want.eps).max()) > 1e-3


def _abstract(make, self_condition: bool):
  """(abstract model, its parameters' shapes as a pure dict): no eager initialisation."""
  model = nnx.eval_shape(lambda: make(self_condition))
  return model, nnx.state(model, nnx.Param).to_pure_dict()


def _params(model, pure: dict) -> nnx.State:
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
  return state


def _denoise(model):
  """model.denoise(z, logsnr, cond) jitted over (params, z, logsnr, cond): one compile."""
  graphdef, _ = nnx.split(model, nnx.Param)
  return jax.jit(lambda p, z, lam, c: nnx.merge(graphdef, p).denoise(z, lam, c))


def test_network_input_is_z_and_x_self_on_channels():
  """Absent x_self is zeros; the rest of cond passes on without it."""
  z = jnp.arange(8.0).reshape(2, 2, 2, 1)
  net_in, cond = self_conditioning.network_input(z, {"label": jnp.ones(2)}, True)
  np.testing.assert_array_equal(net_in[..., 0], z[..., 0])
  np.testing.assert_array_equal(net_in[..., 1], 0.0)
  assert set(cond) == {"label"}
  net_in, cond = self_conditioning.network_input(z, {"x_self": z + 1}, True)
  np.testing.assert_array_equal(net_in[..., 1], z[..., 0] + 1)
  assert cond == {}
  assert self_conditioning.network_input(z, None, False) == (z, None)


def test_x_self_to_a_plain_model_is_an_error():
  make = _vdm_case("unet")[0]
  (model, _), (sc, _) = _abstract(make, False), _abstract(make, True)
  z = jnp.zeros((2, 8, 8, 1))   # both errors come before the network runs
  with pytest.raises(ValueError, match="self_condition"):
    model.denoise(z, jnp.zeros(2), self_conditioning.with_x_self(None, z))
  with pytest.raises(ValueError, match="shaped like z"):
    sc.denoise(z, jnp.zeros(2), self_conditioning.with_x_self(None, z[:, :4]))


# ------------------------------------------------------------------------- the 50% rule


def _toy(a, c):
  """A toy denoiser: x-hat = a z + c x_self (x_self from cond; zeros when absent)."""
  def denoise(z, logsnr, cond):
    x_self = cond.get(self_conditioning.X_SELF, jnp.zeros_like(z))
    return process.from_x(z, a * z + c * x_self, logsnr)
  return denoise


def test_fifty_percent_rule_and_no_gradient_through_the_first_pass():
  """Over a batch of 64: exactly the examples of Bernoulli(1/2) draws from the key get the
  first pass's x-hat (a z, clipped to [-1, 1]), the others zeros; p = 0 and 1 give all zeros
  and all estimates; and the gradient of a loss of the second pass ignores the first."""
  b = 64
  z = jax.random.normal(jax.random.key(0), (b, 4, 4, 1))
  lam = jnp.zeros(b)
  key = jax.random.key(7)
  a = 0.6
  x_self = np.asarray(self_conditioning.training_x_self(_toy(a, 2.0), z, lam, None, key))
  first = np.clip(a * np.asarray(z), -1.0, 1.0)
  drawn = np.asarray(jax.random.bernoulli(key, 0.5, (b,)))
  assert 20 < drawn.sum() < 44          # binomial(64, 1/2): both kinds present
  np.testing.assert_allclose(x_self[drawn], first[drawn], rtol=1e-6)
  np.testing.assert_array_equal(x_self[~drawn], 0.0)
  assert np.abs(first).min() > 0       # so that a zero row means "not drawn"
  never = self_conditioning.training_x_self(_toy(a, 2.0), z, lam, None, key, p=0.0)
  always = self_conditioning.training_x_self(_toy(a, 2.0), z, lam, None, key, p=1.0)
  np.testing.assert_array_equal(never, 0.0)
  np.testing.assert_allclose(always, first, rtol=1e-6)

  # L(a) = sum(x-hat of the second pass) = sum(a z + c x_self): with the first pass under
  # stop_gradient, dL/da = sum(z); through it, it would add c * sum(z) over drawn, unclipped.
  small = 0.2 * z                       # |a z| < 1: no clipping
  c = 3.0

  def loss(a_):
    xs = self_conditioning.training_x_self(_toy(a_, c), small, lam, None, key)
    return jnp.sum(_toy(a_, c)(small, lam, {"x_self": xs}).x)

  grad = float(jax.grad(loss)(a))
  np.testing.assert_allclose(grad, float(jnp.sum(small)), rtol=1e-5)
  leaked = float(jnp.sum(small)) + c * float(jnp.sum(np.asarray(small)[drawn]))
  assert abs(grad - leaked) > 1e-2 * abs(leaked)


def test_teacher_with_its_own_estimate_is_the_second_pass():
  """with_own_estimate: x-hat = a z + c clip(a z), the pass that sees the first pass."""
  z = jax.random.normal(jax.random.key(3), (5, 2, 2, 1))
  pred = self_conditioning.with_own_estimate(_toy(0.8, 0.5))(z, jnp.ones(5), None)
  want = 0.8 * np.asarray(z) + 0.5 * np.clip(0.8 * np.asarray(z), -1, 1)
  np.testing.assert_allclose(pred.x, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- one train step per family


def _step(config):
  """(hand(fn): fn(model at the weights before the step) under jit, the weights before and
  after as pure dicts, the batch, the step's key, its metrics) of one compiled train step
  from perturbed initial weights (as runtime_helpers.one_train_step, but a fresh init has
  zero output convs, through which x_self could not reach the loss)."""
  setup = setup_lib.build(config, jax.devices()[:1])
  state = setup.init()
  params = state["params"]
  before = _perturbed(h.host(params).to_pure_dict(), seed=3, scale=0.05)
  nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, before))
  state = dict(state, params=jax.device_put(params, setup.state_shardings["params"]))
  host_params = jax.tree.map(jnp.asarray, h.host(state["params"]))
  hand = lambda fn: float(jax.jit(lambda p: fn(nnx.merge(setup.graphdef, p)))(host_params))
  loader = pipeline.make_loader(setup.source, global_batch_size=config.train.batch_size,
                                seed=config.seed)
  batch = next(iter(loader))
  rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 0)   # train_state's key
  arrays = families.device_batch(batch, setup.family.batch_keys)
  compiled, _ = trainer.compile_step(setup, arrays)
  new_state, metrics = compiled(state, setup_lib.put_batch(setup, batch))
  return (hand, before, h.host(new_state["params"]).to_pure_dict(),
          {k: jnp.asarray(v) for k, v in arrays.items()}, rng, h.host(metrics))


def _hand_x_self(model, z, lam, cond, key):
  """The 50% rule spelled out: clip(x-hat at x_self = 0) where Bernoulli(1/2) drew 1."""
  first = model.denoise(z, lam, self_conditioning.with_x_self(cond, jnp.zeros_like(z))).x
  drawn = jax.random.bernoulli(key, 0.5, (z.shape[0],))
  mask = drawn.reshape((-1,) + (1,) * (z.ndim - 1))
  return jnp.where(mask, jnp.clip(first, -1.0, 1.0), 0.0)


def _check_step(before, after, metrics, hand_loss, key, batch_size: int, channels: int = 1):
  """The step's loss is the hand recomputation, over a batch holding both kinds of example;
  conv_in's rows that read x_self (input channels C..2C) moved."""
  drawn = int(jax.random.bernoulli(key, 0.5, (batch_size,)).sum())
  assert 0 < drawn < batch_size, "the batch should hold both kinds of example"
  np.testing.assert_allclose(metrics["loss"], hand_loss, rtol=2e-5)
  k0, k1 = before["net"]["conv_in"]["kernel"], after["net"]["conv_in"]["kernel"]
  moved = np.abs(k1[:, :, channels:2 * channels] - k0[:, :, channels:2 * channels]).max()
  assert moved > 1e-5, "the weights that read x_self did not move"


def test_vdm_train_step_with_self_conditioning():
  """Digits VDM (ScoreUNet without Fourier features, so x_self is input channel 1)."""
  config = config_flags.load_config(VDM_CONFIG, list(STEP) + [
      "model.self_condition=True", "model.score_unet.fourier_min=1",
      "model.score_unet.fourier_max=0"])
  hand, before, after, batch, rng, metrics = _step(config)
  cfg, images = config.model, batch["image"]
  key = jax.random.fold_in(rng, 2)

  def loss(model):
    t, eps, eps_0, _ = vdm_experiment._draws(rng, {"image": images}, cfg)
    sched = vdm_experiment._schedule_values(model.schedule, t, cfg.num_steps_train)
    z_t = process.diffuse(losses.int_to_x(images, model.num_levels), sched["logsnr_t"], eps)
    x_self = _hand_x_self(model, z_t, sched["logsnr_t"], None, key)
    terms = vdm_experiment._vlb_terms(model, images, sched, eps, eps_0, {"x_self": x_self},
                                      cfg, None)
    nats = terms["recon"] + terms["prior"] + terms["diffusion"]
    return jnp.mean(nats) / (math.prod(images.shape[1:]) * math.log(2.0))

  _check_step(before, after, metrics, hand(loss), key, images.shape[0])


def _hand_denoising_loss(model, x, cond, k_t, k_eps, cfg):
  """imagen.experiment.denoising_loss with the 50% rule written out (no dropout here)."""
  t = losses.sample_times(k_t, x.shape[0], antithetic=cfg.antithetic_time)
  lam, rate = schedules.logsnr_and_rate(model.schedule, t)
  eps = jax.random.normal(k_eps, x.shape)
  z = process.diffuse(x, lam, eps)
  x_self = _hand_x_self(model, z, lam, cond, jax.random.fold_in(k_t, 1))
  pred = model.denoise(z, lam, self_conditioning.with_x_self(cond, x_self))
  per = losses.weighted_diffusion_loss(eps, pred.eps, lam, rate, cfg.weighting,
                                       **cfg.weighting_params)
  return jnp.mean(per) / (math.prod(x.shape[1:]) * math.log(2.0))


def test_imagen_sr_train_step_with_self_conditioning(tmp_path):
  """Digits 4 -> 8 SR stage: the net reads [z, x_self, lowres]."""
  config = config_flags.load_config(SR_CONFIG, list(STEP) + [
      "model.self_condition=True", "model.p_uncond=0.0", f"data.text_cache={tmp_path}"])
  hand, before, after, batch, rng, metrics = _step(config)
  k_t, k_eps, k_cond, _, _ = jax.random.split(rng, 5)

  def loss(model):
    x = imagen_experiment.stage_images(model, batch)
    cond = imagen_experiment.stage_cond(model, batch, k_cond, config.model, train=True)
    return _hand_denoising_loss(model, x, cond, k_t, k_eps, config.model)

  _check_step(before, after, metrics, hand(loss), jax.random.fold_in(k_t, 1),
              batch["image"].shape[0])


def test_video_train_step_with_self_conditioning(tmp_path):
  """A one-level video stage over 4 frames: the net reads [z, x_self] per frame."""
  config = config_flags.load_config(VIDEO_CONFIG, list(VIDEO_TINY) + list(STEP) + [
      "model.self_condition=True", f"data.text_cache={tmp_path}"])
  hand, before, after, batch, rng, metrics = _step(config)
  k_t, k_eps, k_cond, _, _ = jax.random.split(rng, 5)

  def loss(model):
    x = video_experiment.stage_videos(model, batch)
    cond = video_experiment.stage_cond(model, batch, k_cond, config.model, train=True, x=x)
    return _hand_denoising_loss(model, x, cond, k_t, k_eps, config.model)

  _check_step(before, after, metrics, hand(loss), jax.random.fold_in(k_t, 1),
              batch["video"].shape[0])
