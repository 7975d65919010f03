"""The VDM experiment: a model (denoising network + noise schedule), its loss, and sampling.

This is what the generic trainer in `launch/` receives from the VDM family:
  - `build_model(model_config, num_levels, image_shape, rngs)` -> `VDM` module;
  - `loss_and_grads(graphdef, params, batch, rng, config)` -> (loss, metrics, grads);
  - `per_example_vlb(model, batch, rng, config)` -> the three VLB terms per example (nats),
    for the full-pass bits/dim evaluation in `vdm.likelihood`; `per_example_ode_nll`, the
    same from the probability-flow ODE;
  - `sample(model, rng, num, ...)` -> integer images.
Nothing here imports `launch/`: it is arrays and parameters only.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from vdm import guidance, losses, ode_likelihood, process, samplers, schedules
from vdm import self_conditioning
from vdm.model import DiffusionModel
from vdm.nets.score_unet import ScoreUNet
from vdm.nets.unet import UNet


def settings_for_levels(num_levels: int) -> dict:
  """Schedule endpoint and Fourier exponents derived from the data's number of levels.

  The noise at t=0 should be a small fraction (1/6) of the gap 2/L between levels, so
  logsnr_max = -2 log(sigma_0) = 2 log(3 L); Fourier features should resolve the level gap,
  sin(2^n pi z) having period 2^(1-n) of about two gaps: n_max = round(log2(L / 2)). For 256
  levels this gives VDM's CIFAR-10 values (gamma_min = -13.3, exponents 6 and 7).
  """
  n_max = round(math.log2(num_levels / 2))
  return {"logsnr_max": round(2 * math.log(3 * num_levels), 1),
          "fourier_min": n_max - 1, "fourier_max": n_max}


class VDM(DiffusionModel):
  """The VDM model; class-conditional when config.model.num_classes (labels in the batch)."""

  def data_and_cond(self, batch, rng, cfg):
    del rng
    return losses.int_to_x(batch["image"], self.num_levels), _cond(batch, cfg)

  drop_conditioning = staticmethod(guidance.drop_label)


def build_model(cfg, num_levels: int, image_shape, rngs: nnx.Rngs, dtype=jnp.float32) -> VDM:
  """Builds the VDM model from `config.model` and the data's metadata (dtype: compute dtype;
  parameters stay float32)."""
  channels = image_shape[-1]
  num_classes = cfg.num_classes or None
  # "both" outputs x_tilde and eps_tilde (Salimans & Ho 2022 sec. 4); guidance_embedding
  # makes a w-conditioned distillation student (Meng et al. 2023).
  # self_condition: the net also sees x_self, concatenated to z (vdm/model.py).
  self_condition = cfg.get("self_condition", False)
  distill = dict(out_channels=2 * channels if cfg.parameterization == "both" else channels,
                 guidance_embedding=cfg.get("guidance_embedding", False),
                 in_channels=channels * (2 if self_condition else 1))
  if cfg.net == "score_unet":
    net = ScoreUNet(channels=channels, **cfg.score_unet, num_classes=num_classes,
                    gamma_min=-cfg.schedule.logsnr_max, gamma_max=-cfg.schedule.logsnr_min,
                    base_measure=cfg.parameterization == "eps", **distill, dtype=dtype,
                    rngs=rngs)
  elif cfg.net == "unet":
    net = UNet(channels=channels, image_size=image_shape[0], **cfg.unet,
               num_classes=num_classes, **distill, dtype=dtype, rngs=rngs)
  else:
    raise ValueError(f"unknown net {cfg.net!r}; choose 'score_unet' or 'unet'")
  return VDM(net, schedules.from_config(cfg.schedule, rngs), cfg.parameterization, num_levels,
             image_shape, self_condition=self_condition)


def _cond(batch, cfg):
  return {"label": batch["label"]} if cfg.num_classes else None


def _schedule_values(schedule, t, num_steps: int):
  """Per-example schedule values the loss needs: logsnr at 0, 1, t, and its rate (or at s)."""
  ones = jnp.ones_like(t)
  lam_t, rate_t = schedules.logsnr_and_rate(schedule, t)
  values = {"logsnr_0": schedule(0.0 * ones), "logsnr_1": schedule(ones), "logsnr_t": lam_t,
            "rate_t": rate_t}
  if num_steps:
    values["logsnr_s"] = schedule(t - 1.0 / num_steps)
  return values


def _vlb_terms(model: VDM, x_int, sched, eps, eps_0, cond, cfg, dropout_key,
               self_cond_key=None):
  """The three VLB terms (and the weighted diffusion loss) per example, in nats.

  A self-conditioned model sees x_self by the 50% rule (vdm.self_conditioning) when
  self_cond_key is given (training), else x_self = 0. Either way the diffusion term is a
  valid bound: x_self is a function of z_t, so x-hat stays a denoiser of z_t. Evaluation
  uses x_self = 0 throughout, the likelihood of one fixed model (the one-pass denoiser);
  the sampled model differs from it (its x_self comes from the previous step), so for
  self-conditioned models sample quality (FD), not bits/dim, is the measure to compare.
  """
  x = losses.int_to_x(x_int, model.num_levels)
  # 1. reconstruction: -log p(x | z_0), z_0 ~ q(z_0 | x)
  z_0 = process.diffuse(x, sched["logsnr_0"], eps_0)
  recon = losses.reconstruction_loss(x_int, z_0, sched["logsnr_0"], model.num_levels)
  # 2. prior: KL(q(z_1 | x) || N(0, I))
  prior = losses.prior_kl(x, sched["logsnr_1"])
  # 3. diffusion: denoising error at z_t, weighted by the schedule's rate (or T steps)
  z_t = process.diffuse(x, sched["logsnr_t"], eps)
  if model.self_condition and self_cond_key is not None:
    first_key = None if dropout_key is None else jax.random.fold_in(dropout_key, 1)
    x_self = self_conditioning.training_x_self(
        lambda z, lam, c: model.denoise(z, lam, c, dropout_key=first_key), z_t,
        sched["logsnr_t"], cond, self_cond_key)
    cond = self_conditioning.with_x_self(cond, x_self)
  eps_hat = model.denoise(z_t, sched["logsnr_t"], cond, dropout_key=dropout_key).eps
  if cfg.num_steps_train:
    diffusion = losses.diffusion_loss_discrete(eps, eps_hat, sched["logsnr_t"],
                                               sched["logsnr_s"], cfg.num_steps_train)
  else:
    diffusion = losses.diffusion_loss_continuous(eps, eps_hat, sched["rate_t"])
  weighted = losses.weighted_diffusion_loss(eps, eps_hat, sched["logsnr_t"], sched["rate_t"],
                                            cfg.weighting, **cfg.weighting_params)
  return {"recon": recon, "prior": prior, "diffusion": diffusion, "weighted": weighted}


def _draws(rng, batch, cfg):
  """Times and noises of one loss evaluation."""
  k_t, k_eps, k_eps0, k_drop = jax.random.split(rng, 4)
  x_shape = batch["image"].shape
  t = losses.sample_times(k_t, x_shape[0], antithetic=cfg.antithetic_time,
                          num_steps=cfg.num_steps_train)
  return t, jax.random.normal(k_eps, x_shape), jax.random.normal(k_eps0, x_shape), k_drop


def per_example_vlb(model: VDM, batch, rng, cfg, *, dropout_key=None) -> dict:
  """VLB terms per example at one draw of (t, eps), for evaluation (no dropout by default)."""
  t, eps, eps_0, _ = _draws(rng, batch, cfg)
  sched = _schedule_values(model.schedule, t, cfg.num_steps_train)
  return _vlb_terms(model, batch["image"], sched, eps, eps_0, _cond(batch, cfg), cfg,
                    dropout_key)


def per_example_ode_nll(model: VDM, batch, rng, cfg, *, num_steps: int = 100,
                        hutchinson: str = "rademacher") -> dict:
  """Negative log-likelihood (nats) of the discrete data from the probability-flow ODE, with
  uniform dequantization: {"ode": [B]}; compare with the VLB of `per_example_vlb`."""
  out = ode_likelihood.ode_bits_per_dim(
      lambda z, lam, c: model.denoise(z, lam, c), model.logsnr, batch["image"], rng,
      num_levels=model.num_levels, num_steps=num_steps, hutchinson=hutchinson,
      cond=_cond(batch, cfg))
  return {"ode": out["nll_nats"]}


def _objective(terms, cfg):
  """Per-example training loss: the VLB for the ELBO weighting, else the weighted loss."""
  if cfg.weighting == "elbo":
    return terms["recon"] + terms["prior"] + terms["diffusion"]
  return terms["weighted"]


def loss_and_grads(graphdef, params, batch, rng, cfg, *, train: bool = True):
  """Mean loss (in bits/dim), metrics and gradients with respect to `params`.

  With a learned schedule and cfg.variance_minimization, the schedule's parameters get the
  gradient of the loss estimator's second moment instead (VDM appendix I.2).
  """
  t, eps, eps_0, k_drop = _draws(rng, batch, cfg)
  dropout_key = k_drop if train else None
  num_dims = math.prod(batch["image"].shape[1:])
  to_bpd = 1.0 / (num_dims * math.log(2.0))
  cond = _cond(batch, cfg)
  if train and cond is not None and cfg.get("p_uncond", 0.0) > 0:
    # Classifier-free guidance: the null class for a fraction of the batch (Ho & Salimans).
    cond = guidance.drop_for_training(cond, jax.random.fold_in(rng, 1), cfg.p_uncond,
                                      guidance.drop_label)
  net_params, sched_params = split_schedule_params(params)
  self_cond_key = jax.random.fold_in(rng, 2) if train else None   # the 50% rule's draws

  def terms_fn(p, sched):
    model = nnx.merge(graphdef, _join(p, sched_params))
    return _vlb_terms(model, batch["image"], sched, eps, eps_0, cond, cfg, dropout_key,
                      self_cond_key)

  def values_fn(sp):
    model = nnx.merge(graphdef, _join(net_params, sp))
    return _schedule_values(model.schedule, t, cfg.num_steps_train)

  def per_example(p, sched):   # (training loss per example, the VLB terms for metrics)
    terms = terms_fn(p, sched)
    return _objective(terms, cfg) * to_bpd, terms

  if cfg.variance_minimization and jax.tree.leaves(sched_params):
    losses_, g_net, g_sched, terms = losses.variance_minimizing_grads(
        per_example, net_params, values_fn, sched_params, has_aux=True)
  else:
    def mean_loss(p_net, p_sched):
      per, terms = per_example(p_net, values_fn(p_sched))
      return jnp.mean(per), (per, terms)
    (_, (losses_, terms)), (g_net, g_sched) = jax.value_and_grad(
        mean_loss, argnums=(0, 1), has_aux=True)(net_params, sched_params)
  metrics = {"loss": jnp.mean(losses_)}
  for name in ("recon", "prior", "diffusion"):
    metrics[f"bpd_{name}"] = jnp.mean(terms[name]) * to_bpd
  metrics["bpd"] = metrics["bpd_recon"] + metrics["bpd_prior"] + metrics["bpd_diffusion"]
  return metrics["loss"], metrics, _join(g_net, g_sched)


def split_schedule_params(params: nnx.State):
  """(network params, schedule params): the latter are the `ScheduleParam` variables."""
  sched, net = nnx.split_state(params, schedules.ScheduleParam, ...)
  return net, sched


def _join(a: nnx.State, b: nnx.State) -> nnx.State:
  return nnx.merge_state(a, b)


def sample(model: VDM, rng, num: int, *, num_steps: int, sampler: str = "ddim",
           eta: float = 0.0, clip: bool = True, labels=None, guidance_w: float = 0.0,
           guidance_interval=None, guide: VDM | None = None, solver_options=None):
  """Draws `num` images as integer levels (0..num_levels-1) with any of samplers.SAMPLERS
  (solver_options: its options, e.g. config.eval.solver); with labels and guidance_w > 0,
  classifier-free guided ((1 + w) cond - w uncond; the model must be trained with p_uncond);
  with a `guide` model (a smaller or earlier VDM), autoguided instead ((1 + w) model - w
  guide, conditional or not). Either only where logsnr lies in guidance_interval (lo, hi)."""
  cond = None if labels is None else {"label": labels}

  def denoise_fn(z, logsnr, c):
    return model.denoise(z, logsnr, c)

  denoise_fn = guidance.guided_denoiser(
      denoise_fn, guidance_w, drop=guidance.drop_label if labels is not None else None,
      interval=guidance_interval, guide_fn=None if guide is None else guide.denoise)

  x = samplers.sample(denoise_fn, model.logsnr, (num,) + model.image_shape, rng,
                      num_steps=num_steps, sampler=sampler, eta=eta,
                      clip_x=samplers.static_clip() if clip else samplers.no_clip, cond=cond,
                      solver_options=solver_options, self_condition=model.self_condition)
  return losses.x_to_int(x, model.num_levels)
