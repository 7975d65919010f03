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
lower frame rate) and area-downsampled to its frame size, so one dataset serves every stage
of a cascade, as in `imagen/experiment.py`. Frames may be non-square (model.frame_size =
(H, W); Imagen Video's are 40 wide and 24 high, and so on up): `resolution` is then H.

Super-resolution stages of the Imagen Video cascade (Ho et al. 2022b): model.lowres_size > 0
(SSR: conditioned on the clip at the previous stage's frame height) and/or
model.lowres_frames > 0 (TSR: on the clip at the previous stage's frame count), the input
upsampled, filled and noise-augmented as `imagen/video_sr.py` describes; the net is built
with lowres_cond=True. Both 0: a base stage, run from text alone by `imagen.cascade`.

  - `build_model(cfg, num_levels, video_shape, rngs, dtype)` -> VideoStage;
  - `loss_and_grads(graphdef, params, batch, rng, cfg[, text_encoder])`;
  - `stage_cond(model, batch, rng, cfg, *, train)` -> the network's cond dict;
  - sampling: `imagen.experiment.sample` (generic over the sample shape);
  - `VideoStage.lowres_cond(x_low, rng, t_aug)`: an SR stage's cond entries from the previous
    stage's clips (`imagen.cascade`);
  - `extend(model, clips, rng, cond, ...)`: longer clips than the stage was trained on, by
    reconstruction guidance (Ho et al. sec. 3.1, vdm/reconstruction_guidance.py).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from imagen import noise_augmentation, text_conditioning, video_sr
from imagen.experiment import denoising_loss
from imagen.unet_presets import video_unet_config
from imagen.video_unet import VideoUNet
from vdm import guidance, losses, reconstruction_guidance, samplers, schedules
from vdm.model import DiffusionModel


class VideoStage(DiffusionModel):
  """Video U-Net + schedule + parameterization for clips of `image_shape` = (F, H, W, C)
  (the shape samplers draw, one clip per example)."""

  def __init__(self, net, schedule, parameterization: str, num_levels: int, video_shape,
               fps: float | None = None, *, lowres_size: int = 0, lowres_frames: int = 0,
               tsr_fill: str = "repeat", self_condition: bool = False):
    super().__init__(net, schedule, parameterization, num_levels, video_shape,
                     self_condition=self_condition)
    video_sr.check_stage(self.image_shape, lowres_size, lowres_frames, tsr_fill)
    self.lowres_size = lowres_size      # SSR: the previous stage's frame height (0: none)
    self.lowres_frames = lowres_frames  # TSR: the previous stage's frame count (0: none)
    self.tsr_fill = tsr_fill            # TSR: how frames between known ones are filled
    self.fps = fps           # the clips' frame rate, given to a net built with fps_cond

  @property
  def is_super_resolution(self) -> bool:
    """Conditioned on the previous stage's clips (SSR, TSR or both)."""
    return bool(self.lowres_size or self.lowres_frames)

  def lowres_cond(self, x_low, rng, t_aug) -> dict:
    """cond["lowres"], cond["aug_logsnr"] from the previous stage's clips x_low
    [B, F_low, h_low, w_low, C] in [-1, 1], noise-augmented to t_aug [B]."""
    return video_sr.augment(self, video_sr.upsampled(self, x_low), rng, t_aug)

  def sampling_cond(self, cond: dict, num: int) -> dict:
    """cond completed with what the net takes besides text at sampling: the frame rate."""
    return cond if self.fps is None else {**cond, "fps": jnp.full((num,), self.fps)}

  def data_and_cond(self, batch, rng, cfg):
    """The stage's clips and its text at sampling time (distillation, evaluation)."""
    return stage_videos(self, batch), stage_cond(self, batch, rng, cfg, train=False)

  drop_conditioning = staticmethod(guidance.drop_text)


def frame_size(cfg) -> tuple:
  """(H, W) of the stage's frames: model.frame_size, or square at model.resolution."""
  size = tuple(cfg.get("frame_size", ()) or ())
  if not size:
    return (cfg.resolution, cfg.resolution)
  if len(size) != 2 or size[0] != cfg.resolution:
    raise ValueError(f"model.frame_size={size} must be (H, W) with H = model.resolution="
                     f"{cfg.resolution} (stage_config(resolution=(H, W)) sets both)")
  return size


def stage_shape(cfg, data_shape) -> tuple:
  """(F, H, W, C) of the stage for data clips of data_shape (F_data, H_data, W_data, C)."""
  frames, height, width, channels = data_shape
  if frames % cfg.num_frames:
    raise ValueError(f"model.num_frames={cfg.num_frames} must divide the data's {frames} "
                     "frames (the stage takes every k-th frame)")
  h, w = frame_size(cfg)
  if height % h or width % w or height // h != width // w:
    raise ValueError(f"the stage's {h}x{w} frames (model.resolution / model.frame_size) "
                     f"must divide the data's {height}x{width} frames by one factor")
  return (cfg.num_frames, h, w, channels)


def build_model(cfg, num_levels: int, data_shape, rngs: nnx.Rngs,
                dtype=jnp.float32) -> VideoStage:
  """cfg = config.model: num_frames, resolution (frame_size), lowres_size / lowres_frames
  (SR stages), unet preset and overrides, text_dim. The net's level sizes (its attention
  resolutions) are named by the frame height."""
  shape = stage_shape(cfg, data_shape)
  sr = dict(lowres_size=cfg.get("lowres_size", 0), lowres_frames=cfg.get("lowres_frames", 0),
            tsr_fill=cfg.get("tsr_fill", "repeat"))
  kwargs = dict(video_unet_config(cfg.unet_preset))
  kwargs.update(dict(cfg.unet_overrides))
  crop = tuple(cfg.get("crop_size", ()) or ())
  if crop and cfg.get("coord_cond", False):
    raise ValueError(f"model.coord_cond with model.crop_size={crop}: a crop-trained stage "
                     "would learn crop coordinates and sample whole frames; drop one")
  if crop and not sr["lowres_size"]:
    raise ValueError(f"model.crop_size={crop}: only spatial super-resolution stages (with "
                     "model.lowres_size) train on crops; set crop_size=() for this stage")
  # Level sizes (attention resolutions) are named at the training frame height: the crop's.
  kwargs.update(channels=shape[-1], image_size=crop[0] if crop else shape[1],
                text_dim=cfg.text_dim,
                fps_cond=cfg.fps_cond, frame_index_cond=cfg.get("frame_index_cond", False),
                coord_cond=cfg.get("coord_cond", False),
                scan_layers=cfg.scan_layers, remat=cfg.remat,
                lowres_cond=bool(sr["lowres_size"] or sr["lowres_frames"]),
                out_channels=shape[-1] * (2 if cfg.parameterization == "both" else 1),
                guidance_embedding=cfg.guidance_embedding, dtype=dtype,
                in_channels=shape[-1] * (2 if cfg.get("self_condition", False) else 1))
  net = VideoUNet(**kwargs, rngs=rngs)
  return VideoStage(net, schedules.from_config(cfg.schedule, rngs), cfg.parameterization,
                    num_levels, shape, fps=float(cfg.fps) if cfg.fps_cond else None, **sr,
                    self_condition=cfg.get("self_condition", False))


def stage_videos(model: VideoStage, batch):
  """The batch's clips in [-1, 1] at this stage's frame count and frame size."""
  x = losses.int_to_x(batch["video"], model.num_levels)
  frames, height, width = model.image_shape[:3]
  x = x[:, ::x.shape[1] // frames]
  return video_sr.area_downsample(x, height, width) if x.shape[2] != height else x


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
               is_image=None, x=None):
  """Text (with conditioning dropout in training), the frame rate (nets built with
  fps_cond; 0 for image examples, which have none), the image flags of joint training and,
  for SR stages, the low-resolution clip of x (default: the batch's clips at this stage)
  noise-augmented (t_aug ~ U[0, max_aug_level) in training, sample_aug_level otherwise)."""
  emb, mask = text_conditioning.text_embeddings(batch, text_encoder)
  cond = {"text_emb": emb, "text_mask": mask}
  if train and cfg.p_uncond > 0:
    cond = guidance.drop_for_training(cond, rng, cfg.p_uncond, guidance.drop_text)
  cond = model.sampling_cond(cond, emb.shape[0])
  if is_image is not None:
    cond["is_image"] = is_image
    if "fps" in cond:
      cond["fps"] = jnp.where(is_image, 0.0, cond["fps"])
  if model.is_super_resolution:
    k_aug, k_level = jax.random.split(jax.random.fold_in(rng, 1))
    x = stage_videos(model, batch) if x is None else x
    t_aug = (noise_augmentation.sample_levels(k_level, x.shape[0], cfg.max_aug_level) if train
             else jnp.full((x.shape[0],), cfg.sample_aug_level))
    cond.update(video_sr.augment(model, video_sr.training_input(model, x, is_image), k_aug,
                                 t_aug))
  return cond


def loss_and_grads(graphdef, params, batch, rng, cfg, text_encoder=None):
  """Weighted denoising loss over whole clips, or random crops of them (cfg.crop_size)
  (cfg.weighting, v-MSE by default), in units of nats/(dim ln 2), with joint image examples
  when cfg.joint_image_fraction > 0."""
  k_t, k_eps, k_cond, k_drop, k_joint = jax.random.split(rng, 5)

  def loss_fn(p):
    model = nnx.merge(graphdef, p)
    x, is_image = stage_videos(model, batch), None
    if cfg.joint_image_fraction > 0:
      x, is_image = joint_images(k_joint, x, cfg.joint_image_fraction)
    if cfg.get("crop_size", ()):   # Imagen Video's ssr3: random crops, whole frames sampled
      x = video_sr.random_crops(model, x, jax.random.fold_in(k_joint, 1), cfg.crop_size)
    cond = stage_cond(model, batch, k_cond, cfg, train=True, text_encoder=text_encoder,
                      is_image=is_image, x=x)
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
