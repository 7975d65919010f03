"""A distillation student: its loss against a frozen teacher, and its sampling.

Works for any teacher that is a `vdm.model.DiffusionModel` (a VDM model, class-conditional
VDM, an Imagen stage): the teacher says how it reads a batch (`data_and_cond`) and how its
conditioning is dropped for guidance (`drop_conditioning`), so nothing here depends on the
teacher's family. `dcfg` is config.distill:

  kind = "progressive"  one student DDIM step matches two teacher steps (distill.progressive),
                        the student sampling in dcfg.student_steps
  kind = "guided"       stage one of guided distillation (distill.guided): the w-conditioned
                        student matches the classifier-free guided teacher at every noise level

Targets use the teacher's x-hat through `dcfg.target_clip` ("none" by default: Salimans &
Ho's Algorithm 2 and Meng et al. regress on the unclipped teacher; clipping belongs to
sampling), samples use `dcfg.clip`.

Self-conditioned teachers (model.self_condition, Chen et al. 2022): no sampling chain gives
the teacher a previous estimate at a target's steps, so it is evaluated with its own
estimate from a first pass at the same z (`self_conditioning.with_own_estimate`), the input
of the self-conditioned half of its training. The student inherits the teacher's model
config, so it is self-conditioned too and trains by the same 50% rule
(`self_conditioning.training_x_self`), samples with its latest x-hat as x_self (`sample`),
and serves as the next stage's teacher the same way.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from distill import guided, progressive, sampling
from vdm import losses, process, samplers, self_conditioning
from vdm.model import DiffusionModel

KINDS = ("progressive", "guided")
# Below this many student steps an eps-teacher's x-hat = (z - sigma eps-hat) / alpha is too
# ill-conditioned near t = 1 to distil from (Salimans & Ho 2022, sec. 4).
MIN_STEPS_FOR_EPS_TEACHER = 8


def check_settings(kind: str, student_steps: int, parameterization: str,
                   allow_eps_teacher: bool = False) -> None:
  """Clear errors for settings the paper's method does not support."""
  if kind not in KINDS:
    raise ValueError(f"unknown distill.kind {kind!r}; choose one of {KINDS}")
  if (parameterization == "eps" and student_steps < MIN_STEPS_FOR_EPS_TEACHER
      and not allow_eps_teacher):
    raise ValueError(
        f"the teacher predicts eps, which cannot be distilled to {student_steps} steps: "
        f"x-hat = (z - sigma eps-hat) / alpha blows up as alpha -> 0 (Salimans & Ho 2022, "
        f"sec. 4). Train the teacher with model.parameterization=v or both (e.g. "
        f"configs/distill/digits_teacher.py), stop at distill.end_steps="
        f"{MIN_STEPS_FOR_EPS_TEACHER}, or pass --config.distill.allow_eps_teacher=True")


def _with_w(cond, w, takes_w: bool):
  return guided.with_guidance_weight(cond, w) if takes_w else cond


# ---------------------------------------------------------------------------------- the loss


def loss_and_grads(graphdef, params, batch, rng, dcfg, model_cfg, teacher: DiffusionModel):
  """Mean x-space distillation loss (bits/dim units), metrics and gradients of the student
  (graphdef, params); model_cfg is config.model (the student's: guidance_embedding)."""
  check_settings(dcfg.kind, dcfg.student_steps, teacher.parameterization,
                 dcfg.get("allow_eps_teacher", False))
  k_cond, k_w, k_times = jax.random.split(rng, 3)
  x, cond = teacher.data_and_cond(batch, k_cond, model_cfg)
  batch_size = x.shape[0]
  w = guided.sample_guidance_weights(k_w, batch_size, dcfg.w_min, dcfg.w_max)
  student_cond = _with_w(cond, w, model_cfg.guidance_embedding)
  target_clip = samplers.clip_hook(dcfg.get("target_clip", "none"))
  teacher_denoise = lambda z_, l_, c_: teacher.denoise(z_, l_, c_)
  if teacher.self_condition:
    teacher_denoise = self_conditioning.with_own_estimate(teacher_denoise)

  # 1. the target, from the frozen teacher (no gradient)
  if dcfg.kind == "guided":
    z, logsnr = guided.stage_one_inputs(k_times, x, teacher.logsnr)
    target = guided.guided_target(teacher_denoise, z, logsnr, cond, w,
                                  teacher.drop_conditioning, target_clip)
  else:
    k_i, k_eps = jax.random.split(k_times)
    i, t, t_mid, s = progressive.student_times(k_i, batch_size, dcfg.student_steps)
    logsnr, logsnr_mid, logsnr_s = teacher.logsnr(t), teacher.logsnr(t_mid), teacher.logsnr(s)
    z = process.diffuse(x, logsnr, jax.random.normal(k_eps, x.shape))

    def teacher_fn(z_, l_, c_):
      return samplers.clip_prediction(teacher_denoise(z_, l_, c_), z_, l_, target_clip)

    target = progressive.distillation_target(
        teacher_fn, z, logsnr, logsnr_mid, logsnr_s, i == 1,
        _with_w(cond, w, dcfg.teacher_guidance_embedding))
  target = jax.lax.stop_gradient(target)
  to_bpd = 1.0 / (math.prod(x.shape[1:]) * math.log(2.0))

  # 2. the student's x-hat at the same z_t and its weighted error
  def loss_fn(p):
    student = nnx.merge(graphdef, p)
    s_cond = student_cond
    if student.self_condition:   # the 50% rule, as the teacher was trained
      s_cond = self_conditioning.with_x_self(s_cond, self_conditioning.training_x_self(
          lambda z_, l_, c_: student.denoise(z_, l_, c_), z, logsnr, s_cond,
          jax.random.fold_in(rng, 3)))
    x_hat = student.denoise(z, logsnr, s_cond).x
    per_example = progressive.x_space_loss(target, x_hat, logsnr, dcfg.weighting)
    loss = jnp.mean(per_example) * to_bpd
    return loss, {"loss": loss, "x_mse": jnp.mean(jnp.square(target - x_hat))}

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, metrics, grads


# ------------------------------------------------------------------------------ sampling


def sample(student: DiffusionModel, rng, batch, dcfg, model_cfg, *, num_steps: int):
  """Student samples for the batch's conditioning, as integer levels: N-step deterministic
  DDIM or Meng et al.'s stochastic sampler (dcfg.sampler), x-hat through dcfg.clip, at
  guidance dcfg.sample_w when the student takes w."""
  k_cond, k_sample = jax.random.split(rng)
  x, cond = student.data_and_cond(batch, k_cond, model_cfg)
  cond = _with_w(cond, jnp.full((x.shape[0],), dcfg.sample_w), model_cfg.guidance_embedding)
  out = sampling.sample(lambda z, l, c: student.denoise(z, l, c), student.logsnr, x.shape,
                        k_sample, num_steps=num_steps, sampler=dcfg.sampler,
                        clip_x=samplers.clip_hook(dcfg.clip), cond=cond,
                        self_condition=student.self_condition)
  return losses.x_to_int(out, student.num_levels)
