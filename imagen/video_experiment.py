"""One text-to-video diffusion stage (Ho et al. 2022, "Video Diffusion Models"): what the
generic trainer receives from the video family.

A stage is a space-time Video U-Net (`imagen/video_unet.py`) with a noise schedule and a
parameterization (Imagen's defaults: cosine logsnr, v), conditioned on T5 text as the Imagen
stages are, trained with the weighted denoising loss over whole clips [B, F, H, W, C].

Joint image-video training (Ho et al. sec. 3.2). "We concatenate random independent image
frames to the end of each video sampled from the dataset, and we mask the attention in the
temporal attention blocks to prevent mixing information across video frames and each
individual image frame." With one caption per example, our images are frames of the
example's own clip drawn at random times (with replacement), so each still matches its
caption's subject (its motion words say nothing about one frame); a fraction
`joint_image_fraction` of the examples are such image examples, flagged by cond["is_image"],
so the net's temporal layers let each of their frames see only itself. The loss is the same
for both kinds: the net learns to denoise frames alone and clips in the same weights.

The stage's clips are the data subsampled to the stage's frame count (every k-th frame: a
lower frame rate) and area-downsampled to its resolution, so one dataset serves every stage
of a cascade, as in `imagen/experiment.py`.

  - `build_model(cfg, num_levels, video_shape, rngs, dtype)` -> VideoStage;
  - `loss_and_grads(graphdef, params, batch, rng, cfg[, text_encoder])`;
  - `stage_cond(model, batch, rng, cfg, *, train)` -> the network's cond dict;
  - sampling: `imagen.experiment.sample` (generic over the sample shape);
  - `extend(model, clips, rng, cond, ...)`: longer clips than the stage was trained on, by
    reconstruction guidance (Ho et al. sec. 3.1, vdm/reconstruction_guidance.py).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from imagen import text_conditioning
from imagen.experiment import denoising_loss, downsample
from imagen.unet_presets import video_unet_config
from imagen.video_unet import VideoUNet
from vdm import guidance, losses, reconstruction_guidance, samplers, schedules
from vdm.model import DiffusionModel


class VideoStage(DiffusionModel):
  """Video U-Net + schedule + parameterization for clips of `image_shape` = (F, H, W, C)
  (the shape samplers draw, one clip per example)."""

  def __init__(self, net, schedule, parameterization: str, num_levels: int, video_shape,
               fps: float | None = None):
    super().__init__(net, schedule, parameterization, num_levels, video_shape)
    self.lowres_size = 0     # a base stage: imagen.cascade runs it from text alone
    self.fps = fps           # the clips' frame rate, given to a net built with fps_cond

  def sampling_cond(self, cond: dict, num: int) -> dict:
    """cond completed with what the net takes besides text at sampling: the frame rate."""
    return cond if self.fps is None else {**cond, "fps": jnp.full((num,), self.fps)}

  def data_and_cond(self, batch, rng, cfg):
    """The stage's clips and its text at sampling time (distillation, evaluation)."""
    return stage_videos(self, batch), stage_cond(self, batch, rng, cfg, train=False)

  drop_conditioning = staticmethod(guidance.drop_text)


def stage_shape(cfg, data_shape) -> tuple:
  """(F, H, W, C) of the stage for data clips of data_shape (F_data, H_data, W_data, C)."""
  frames, height, width, channels = data_shape
  if frames % cfg.num_frames:
    raise ValueError(f"model.num_frames={cfg.num_frames} must divide the data's {frames} "
                     "frames (the stage takes every k-th frame)")
  if height % cfg.resolution or width % cfg.resolution or height != width:
    raise ValueError(f"model.resolution={cfg.resolution} must divide the data's square "
                     f"{height}x{width} frames")
  return (cfg.num_frames, cfg.resolution, cfg.resolution, channels)


def build_model(cfg, num_levels: int, data_shape, rngs: nnx.Rngs,
                dtype=jnp.float32) -> VideoStage:
  """cfg = config.model: num_frames, resolution, unet preset and overrides, text_dim."""
  shape = stage_shape(cfg, data_shape)
  kwargs = dict(video_unet_config(cfg.unet_preset))
  kwargs.update(dict(cfg.unet_overrides))
  kwargs.update(channels=shape[-1], image_size=cfg.resolution, text_dim=cfg.text_dim,
                fps_cond=cfg.fps_cond, scan_layers=cfg.scan_layers, remat=cfg.remat,
                out_channels=shape[-1] * (2 if cfg.parameterization == "both" else 1),
                guidance_embedding=cfg.guidance_embedding, dtype=dtype)
  net = VideoUNet(**kwargs, rngs=rngs)
  return VideoStage(net, schedules.from_config(cfg.schedule, rngs), cfg.parameterization,
                    num_levels, shape, fps=float(cfg.fps) if cfg.fps_cond else None)


def stage_videos(model: VideoStage, batch):
  """The batch's clips in [-1, 1] at this stage's frame count and resolution."""
  x = losses.int_to_x(batch["video"], model.num_levels)
  frames, size = model.image_shape[:2]
  x = x[:, ::x.shape[1] // frames]
  if x.shape[2] != size:
    b, f = x.shape[:2]
    x = downsample(x.reshape((b * f,) + x.shape[2:]), size).reshape((b, f, size, size, -1))
  return x


def joint_images(rng, x, fraction: float):
  """(x, is_image [B]): a `fraction` of the examples (at random) replaced by independent
  images, frames of their own clip at random times (module docstring)."""
  k_pick, k_times = jax.random.split(rng)
  b, f = x.shape[:2]
  is_image = jax.random.uniform(k_pick, (b,)) < fraction
  times = jax.random.randint(k_times, (b, f), 0, f)
  stills = jnp.take_along_axis(x, times.reshape((b, f, 1, 1, 1)), axis=1)
  return jnp.where(is_image.reshape((b, 1, 1, 1, 1)), stills, x), is_image


def stage_cond(model: VideoStage, batch, rng, cfg, *, train: bool, text_encoder=None,
               is_image=None):
  """Text (with conditioning dropout in training), the frame rate (nets built with
  fps_cond; 0 for image examples, which have none) and the image flags of joint training."""
  emb, mask = text_conditioning.text_embeddings(batch, text_encoder)
  cond = {"text_emb": emb, "text_mask": mask}
  if train and cfg.p_uncond > 0:
    cond = guidance.drop_for_training(cond, rng, cfg.p_uncond, guidance.drop_text)
  cond = model.sampling_cond(cond, emb.shape[0])
  if is_image is not None:
    cond["is_image"] = is_image
    if "fps" in cond:
      cond["fps"] = jnp.where(is_image, 0.0, cond["fps"])
  return cond


def loss_and_grads(graphdef, params, batch, rng, cfg, text_encoder=None):
  """Weighted denoising loss over whole clips (cfg.weighting, v-MSE by default), in units of
  nats/(dim ln 2), with joint image examples when cfg.joint_image_fraction > 0."""
  k_t, k_eps, k_cond, k_drop, k_joint = jax.random.split(rng, 5)

  def loss_fn(p):
    model = nnx.merge(graphdef, p)
    x, is_image = stage_videos(model, batch), None
    if cfg.joint_image_fraction > 0:
      x, is_image = joint_images(k_joint, x, cfg.joint_image_fraction)
    cond = stage_cond(model, batch, k_cond, cfg, train=True, text_encoder=text_encoder,
                      is_image=is_image)
    loss = denoising_loss(model, x, cond, (k_t, k_eps, k_drop), cfg)
    return loss, {"loss": loss}

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, metrics, grads


def extend(model: VideoStage, clips, rng, cond: dict, *, total_frames: int, num_known: int,
           num_steps: int, guidance_w=0.0, w_r: float = 2.0, sampler: str = "ddim",
           threshold: str = "dynamic"):
  """Clips [B, F0, H, W, C] in [-1, 1] extended autoregressively to `total_frames`: each
  round samples a window of the stage's F frames whose first `num_known` are the last
  frames so far, by reconstruction guidance with weight w_r (eq. 7) on the text-guided
  denoiser (classifier-free weight guidance_w), and appends its new frames."""
  frames = model.image_shape[0]
  if not 1 <= num_known < frames:
    raise ValueError(f"num_known={num_known} must be between 1 and the stage's clip length "
                     f"{frames} - 1 (each window needs new frames)")
  cond = model.sampling_cond(cond, clips.shape[0])
  denoise = guidance.guided(lambda z, lam, c: model.denoise(z, lam, c), guidance_w,
                            guidance.drop_text)
  window = reconstruction_guidance.window_sampler(
      denoise, model.logsnr, frames, num_steps=num_steps, sampler=sampler, cond=cond,
      clip_x=samplers.clip_hook(threshold), jit=False)
  return reconstruction_guidance.extend_video(lambda known, r: window(known, r, w_r), clips,
                                              rng, num_known=num_known,
                                              total_frames=total_frames)
