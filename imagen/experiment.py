"""One stage of an Imagen cascade: what the generic trainer receives from the Imagen family.

A stage is an Efficient U-Net with a noise schedule (cosine logsnr by default) and a
parameterization (v by default), conditioned on T5 text embeddings; a super-resolution stage
also sees the low-resolution image, noise-augmented to a random level in training (Imagen
sec. 2.5). Every stage trains on the same dataset: the stage's images are the data
area-downsampled to the stage's resolution, and an SR stage's low-resolution input is the
data downsampled to the previous stage's resolution, then upsampled back.

  - `build_model(cfg, num_levels, data_shape, rngs, dtype)` -> ImagenStage;
  - `loss_and_grads(graphdef, params, batch, rng, cfg)` -> (loss, metrics, grads);
  - `stage_cond(model, batch, rng, cfg, *, train)` -> the network's cond dict;
  - `sample(model, rng, cond, *, num_steps, ...)` -> images in [-1, 1].
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from imagen import noise_augmentation, text_conditioning
from imagen.efficient_unet import EfficientUNet
from imagen.unet_presets import efficient_unet_config
from vdm import guidance, losses, process, samplers, schedules, self_conditioning
from vdm.model import DiffusionModel


class ImagenStage(DiffusionModel):
  """Efficient U-Net + schedule + parameterization at one resolution of the cascade."""

  def __init__(self, net, schedule, parameterization: str, num_levels: int, image_shape,
               lowres_size: int, *, self_condition: bool = False):
    super().__init__(net, schedule, parameterization, num_levels, image_shape,
                     self_condition=self_condition)
    self.lowres_size = lowres_size          # 0 for the base stage

  def data_and_cond(self, batch, rng, cfg):
    """The stage's images, its text and (SR stages) the low-res input at the sampling
    augmentation level: what the stage sees when it runs in the cascade."""
    return stage_images(self, batch), stage_cond(self, batch, rng, cfg, train=False)

  drop_conditioning = staticmethod(guidance.drop_text)


def build_model(cfg, num_levels: int, data_shape, rngs: nnx.Rngs, dtype=jnp.float32):
  """cfg = config.model: resolution, lowres_size (0 = base), unet preset and overrides."""
  if data_shape[0] % cfg.resolution:
    raise ValueError(f"stage resolution {cfg.resolution} must divide the data's "
                     f"{data_shape[0]}")
  shape = (cfg.resolution, cfg.resolution, data_shape[-1])
  kwargs = dict(efficient_unet_config(cfg.unet_preset))
  # Configs saved before these keys existed build the default (scanned, no remat).
  kwargs.update(scan_layers=cfg.get("scan_layers", True), remat=cfg.get("remat", "none"))
  kwargs.update(dict(cfg.unet_overrides))
  kwargs.update(channels=shape[-1], image_size=cfg.get("crop_size", 0) or cfg.resolution,
                text_dim=cfg.text_dim,
                lowres_cond=cfg.lowres_size > 0, dtype=dtype,
                out_channels=shape[-1] * (2 if cfg.parameterization == "both" else 1),
                guidance_embedding=cfg.get("guidance_embedding", False),
                in_channels=shape[-1] * (2 if cfg.get("self_condition", False) else 1))
  net = EfficientUNet(**kwargs, rngs=rngs)
  return ImagenStage(net, schedules.from_config(cfg.schedule, rngs), cfg.parameterization,
                     num_levels, shape, cfg.lowres_size,
                     self_condition=cfg.get("self_condition", False))


def downsample(x, size: int):
  """Area downsampling of an NHWC batch to size x size (mean over each block)."""
  b, h, w, c = x.shape
  f = h // size
  return x.reshape(b, size, f, size, f, c).mean(axis=(2, 4))


def lowres_cond(model: ImagenStage, x_lowres, rng, t_aug):
  """The SR input: the low-resolution image (or crop) upsampled by this stage's factor,
  noise-augmented."""
  up = noise_augmentation.upsample(x_lowres, model.image_shape[0] // model.lowres_size)
  z_lr, aug_logsnr = noise_augmentation.augment(up, t_aug, rng, model.schedule)
  return {"lowres": z_lr, "aug_logsnr": aug_logsnr}


def stage_images(model: ImagenStage, batch):
  """The batch's images in [-1, 1] at this stage's resolution."""
  x = losses.int_to_x(batch["image"], model.num_levels)
  return downsample(x, model.image_shape[0]) if x.shape[1] != model.image_shape[0] else x


def random_crops(rng, batch_size: int, size: int, crop: int, multiple: int):
  """Per-example top-left corners (y, x) of crop x crop windows in size x size images, on a
  grid of `multiple` pixels so that a crop of the low-resolution image matches exactly."""
  if crop > size or crop % multiple:
    raise ValueError(f"crop_size={crop} must be at most the stage resolution {size} and a "
                     f"multiple of the upsampling factor {multiple}")
  n = (size - crop) // multiple + 1
  return jax.random.randint(rng, (2, batch_size), 0, n) * multiple


def crop(x, corners, size: int):
  """The size x size window of each NHWC image at its (y, x) corner (corners: [2, B])."""
  c = x.shape[-1]
  return jax.vmap(lambda img, y, x0: jax.lax.dynamic_slice(img, (y, x0, 0), (size, size, c)))(
      x, corners[0], corners[1])


def stage_cond(model: ImagenStage, batch, rng, cfg, *, train: bool, text_encoder=None,
               corners=None):
  """Text (with conditioning dropout in training) and, for SR stages, the augmented lowres
  (cropped to match the training crop at `corners`, in stage pixels, when given)."""
  k_drop, k_aug, k_level = jax.random.split(rng, 3)
  emb, mask = text_conditioning.text_embeddings(batch, text_encoder)
  cond = {"text_emb": emb, "text_mask": mask}
  if train and cfg.p_uncond > 0:
    cond = guidance.drop_for_training(cond, k_drop, cfg.p_uncond, guidance.drop_text)
  if model.lowres_size:
    x_lr = downsample(losses.int_to_x(batch["image"], model.num_levels), model.lowres_size)
    if corners is not None:
      factor = model.image_shape[0] // model.lowres_size
      x_lr = crop(x_lr, corners // factor, cfg.crop_size // factor)
    batch_size = x_lr.shape[0]
    t_aug = (noise_augmentation.sample_levels(k_level, batch_size, cfg.max_aug_level) if train
             else jnp.full((batch_size,), cfg.sample_aug_level))
    cond.update(lowres_cond(model, x_lr, k_aug, t_aug))
  return cond


def loss_and_grads(graphdef, params, batch, rng, cfg, text_encoder=None):
  """Weighted denoising loss (cfg.weighting, v-MSE by default), in units of nats/(dim ln 2)."""
  k_t, k_eps, k_cond, k_drop, k_crop = jax.random.split(rng, 5)

  def loss_fn(p):
    model = nnx.merge(graphdef, p)
    x = stage_images(model, batch)
    corners = None
    if cfg.get("crop_size", 0):   # Imagen's 256 -> 1024 stage trains on 256 x 256 crops
      factor = model.image_shape[0] // model.lowres_size if model.lowres_size else 1
      corners = random_crops(k_crop, x.shape[0], x.shape[1], cfg.crop_size, factor)
      x = crop(x, corners, cfg.crop_size)
    cond = stage_cond(model, batch, k_cond, cfg, train=True, text_encoder=text_encoder,
                      corners=corners)
    loss = denoising_loss(model, x, cond, (k_t, k_eps, k_drop), cfg)
    return loss, {"loss": loss}

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, metrics, grads


def denoising_loss(model, x, cond, keys, cfg):
  """The batch mean of the weighted denoising loss 1/2 c(t) ||eps - eps-hat||^2 of x given
  cond (cfg.weighting; v-MSE by default), in units of nats/(dim ln 2). keys: the keys of
  (t, eps, dropout). A self-conditioned model sees x_self by the 50% rule of Chen et al.
  (vdm.self_conditioning.training_x_self)."""
  k_t, k_eps, k_drop = keys
  t = losses.sample_times(k_t, x.shape[0], antithetic=cfg.antithetic_time)
  lam, rate = schedules.logsnr_and_rate(model.schedule, t)
  eps = jax.random.normal(k_eps, x.shape)
  z = process.diffuse(x, lam, eps)
  if model.self_condition:
    first_key = None if k_drop is None else jax.random.fold_in(k_drop, 1)
    x_self = self_conditioning.training_x_self(
        lambda z_, l_, c_: model.denoise(z_, l_, c_, dropout_key=first_key), z, lam, cond,
        jax.random.fold_in(k_t, 1))
    cond = self_conditioning.with_x_self(cond, x_self)
  pred = model.denoise(z, lam, cond, dropout_key=k_drop)
  per_example = losses.weighted_diffusion_loss(eps, pred.eps, lam, rate, cfg.weighting,
                                               **cfg.weighting_params)
  return jnp.mean(per_example) / (math.prod(x.shape[1:]) * math.log(2.0))


def sample(model: ImagenStage, rng, cond: dict, num: int, *, num_steps: int, guidance_w=0.0,
           sampler: str = "ddim", eta: float = 0.0, threshold: str = "dynamic",
           percentile: float = 99.5, guidance_interval=None, guide=None,
           solver_options=None):
  """`num` images in [-1, 1] from this stage given its cond (text, and lowres for SR), with
  any of samplers.SAMPLERS (solver_options: its options, e.g. config.eval.solver):
  classifier-free guided on the text at weight guidance_w or, with a `guide` stage (smaller
  or less trained, same kind and shape), autoguided; only where logsnr lies in
  guidance_interval (lo, hi) when given."""
  clip_x = samplers.clip_hook(threshold, percentile)
  denoise = guidance.guided_denoiser(
      lambda z, lam, c: model.denoise(z, lam, c), guidance_w, drop=guidance.drop_text,
      interval=guidance_interval,
      guide_fn=None if guide is None else (lambda z, lam, c: guide.denoise(z, lam, c)))
  return samplers.sample(denoise, model.logsnr, (num,) + model.image_shape, rng,
                         num_steps=num_steps, sampler=sampler, eta=eta, clip_x=clip_x,
                         cond=cond, solver_options=solver_options,
                         self_condition=model.self_condition)
