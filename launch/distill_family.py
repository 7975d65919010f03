"""The "distill" family: a student trained by the generic trainer against a frozen teacher.

A distillation stage's config is its teacher's config (any family: VDM, class-conditional
VDM, an Imagen stage) plus a `distill` section; `config.distill.base_family` names the
teacher's family, whose model, data and conditioning are reused unchanged. The teacher is
the trainer's frozen module: its EMA weights, restored from `distill.teacher` (a workdir),
enter the compiled step as a sharded argument.

  distill.kind = "progressive"  one student DDIM step matches two teacher steps
                                (distill.progressive), student steps = distill.student_steps
  distill.kind = "guided"       stage one of guided distillation (distill.guided): the
                                w-conditioned student matches the classifier-free guided
                                teacher at every noise level
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from distill import guided, progressive, sampling
from imagen import thresholding
from launch import families
from vdm import guidance, losses, process, samplers

KINDS = ("progressive", "guided")


# ------------------------------------------------------------------ what each base family gives


def _vdm_data_and_cond(model, batch, rng, config):
  del rng
  x = losses.int_to_x(batch["image"], model.num_levels)
  cond = {"label": batch["label"]} if config.model.num_classes else None
  return x, cond


def _imagen_data_and_cond(model, batch, rng, config):
  from imagen import experiment as imagen_experiment  # pylint: disable=g-import-not-at-top
  x = imagen_experiment.stage_images(model, batch)
  # Text and (for SR stages) the low-res input at the sampling augmentation level: the
  # student is distilled for the cascade it will run in.
  cond = imagen_experiment.stage_cond(model, batch, rng, config.model, train=False)
  return x, cond


_DATA_AND_COND = {"vdm": _vdm_data_and_cond, "imagen": _imagen_data_and_cond}
_DROP = {"vdm": guidance.drop_label, "imagen": guidance.drop_text}


def _settings(config):
  d = config.distill
  if d.kind not in KINDS:
    raise ValueError(f"unknown distill.kind {d.kind!r}; choose one of {KINDS}")
  if config.optim.weight_decay:
    raise ValueError("distillation needs optim.weight_decay=0: decay would move the teacher's "
                     "noise schedule, which the student must keep (its sampling grid)")
  if d.base_family not in _DATA_AND_COND:
    raise ValueError(f"cannot distil a {d.base_family!r} teacher; supported: "
                     f"{sorted(_DATA_AND_COND)}")
  return d


# ---------------------------------------------------------------------------------- the loss


def loss_and_grads(graphdef, params, batch, rng, config, teacher):
  """Mean x-space distillation loss (bits/dim units), metrics and gradients."""
  d = _settings(config)
  k_cond, k_w, k_times = jax.random.split(rng, 3)
  x, cond = _DATA_AND_COND[d.base_family](teacher, batch, k_cond, config)
  batch_size = x.shape[0]
  w = guided.sample_guidance_weights(k_w, batch_size, d.w_min, d.w_max)
  student_cond = guided.with_guidance_weight(cond, w) if config.model.guidance_embedding else cond
  clip = thresholding.clip_hook(d.clip)

  # 1. the target, from the frozen teacher (no gradient)
  if d.kind == "guided":
    z, logsnr = guided.stage_one_inputs(k_times, x, teacher.logsnr)
    target = guided.guided_target(lambda z_, l_, c_: teacher.denoise(z_, l_, c_), z, logsnr,
                                  cond, w, _DROP[d.base_family], clip)
  else:
    k_i, k_eps = jax.random.split(k_times)
    i, t, t_mid, s = progressive.student_times(k_i, batch_size, d.student_steps)
    logsnr, logsnr_mid, logsnr_s = teacher.logsnr(t), teacher.logsnr(t_mid), teacher.logsnr(s)
    z = process.diffuse(x, logsnr, jax.random.normal(k_eps, x.shape))
    teacher_cond = guided.with_guidance_weight(cond, w) if d.teacher_guidance_embedding else cond

    def teacher_fn(z_, l_, c_):
      return samplers.clip_prediction(teacher.denoise(z_, l_, c_), z_, l_, clip)

    target = progressive.distillation_target(teacher_fn, z, logsnr, logsnr_mid, logsnr_s,
                                             i == 1, teacher_cond)
  target = jax.lax.stop_gradient(target)
  to_bpd = 1.0 / (math.prod(x.shape[1:]) * math.log(2.0))

  # 2. the student's x-hat at the same z_t and its weighted error
  def loss_fn(p):
    student = nnx.merge(graphdef, p)
    x_hat = student.denoise(z, logsnr, student_cond).x
    per_example = progressive.x_space_loss(target, x_hat, logsnr, d.weighting)
    loss = jnp.mean(per_example) * to_bpd
    return loss, {"loss": loss, "x_mse": jnp.mean(jnp.square(target - x_hat))}

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, metrics, grads


# ------------------------------------------------------------------------------ sampling


def sample(model, rng, batch, config, teacher=None, *, num_steps):
  """Student samples for the batch's conditioning, as integer levels: N-step deterministic
  DDIM or Meng et al.'s stochastic sampler (distill.sampler), at guidance distill.sample_w
  when the student takes w."""
  del teacher
  d = _settings(config)
  k_cond, k_sample = jax.random.split(rng)
  x, cond = _DATA_AND_COND[d.base_family](model, batch, k_cond, config)
  if config.model.guidance_embedding:
    cond = guided.with_guidance_weight(cond, jnp.full((x.shape[0],), d.sample_w))
  out = sampling.sample(lambda z, l, c: model.denoise(z, l, c), model.logsnr, x.shape, k_sample,
                        num_steps=num_steps, sampler=d.sampler,
                        clip_x=thresholding.clip_hook(d.clip), cond=cond)
  return losses.x_to_int(out, model.num_levels)


# ----------------------------------------------------------------------- the frozen teacher


def load_teacher(workdir: str, step: int | None = None):
  """(teacher module with its EMA weights, its config) from a training or distillation
  workdir; a distillation workdir's own teacher is not loaded (no chain of loads)."""
  from launch import trainer  # pylint: disable=g-import-not-at-top  (trainer imports families)
  setup, state, ckpt = trainer.load_workdir(workdir, step, with_frozen=False)
  ckpt.close()
  return nnx.merge(setup.graphdef, state["ema"]), setup.config


def _frozen_init(config):
  d = _settings(config)
  if d.base_family == "imagen" and config.data.text_source != "cache":
    raise ValueError("distilling an Imagen stage needs cached text embeddings: set "
                     "--config.data.text_source=cache (the teacher's text_cache is reused)")
  return load_teacher(d.teacher, d.teacher_step or None)[0]


def _base(config):
  return families.get_family(config.distill.base_family)


DISTILL = families.Family(
    build_model=lambda config, source, rngs: _base(config).build_model(config, source, rngs),
    loss_and_grads=loss_and_grads,
    sample=sample,
    get_source=lambda config, split: (_base(config).get_source(config, split)
                                      if _base(config).get_source else None),
    wrap_source=lambda config, source, split, workdir: (
        _base(config).wrap_source(config, source, split, workdir)
        if _base(config).wrap_source else source),
    frozen_init=_frozen_init,
    default_config=lambda saved: _base(saved).default_config(saved),
    batch_keys=families.IMAGEN.batch_keys,
)
