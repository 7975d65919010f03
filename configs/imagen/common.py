"""Pieces shared by the Imagen stage configs (one config per cascade stage)."""

import ml_collections

from configs.vdm.common import base_config


def stage_config(*, resolution: int, lowres_size: int, unet_preset: str,
                 text_dim: int) -> ml_collections.ConfigDict:
  """A cascade stage: base (lowres_size 0) or super-resolution from lowres_size."""
  c = base_config()
  c.family = "imagen"
  # text_source: "cache" (embeddings encoded once, read by the loader) or "encoder" (tokens
  # in the batch, the frozen T5 run inside the train step).
  # image_size: images are resized (shorter side) and centre-cropped to it (0: as stored).
  c.data.update(dict(text_source="cache", text_cache="", t5="tiny", max_length=16,
                     image_size=0))
  c.model = ml_collections.ConfigDict(dict(
      resolution=resolution,
      lowres_size=lowres_size,        # 0: base stage; else the previous stage's resolution
      crop_size=0,                    # > 0: train on random crops (Imagen's 256 -> 1024)
      guidance_embedding=False,       # the net also takes cond["guidance_w"] (distillation)
      self_condition=False,           # the net also sees its previous x-hat (Chen et al. 2022)
      unet_preset=unet_preset,        # imagen.efficient_unet presets
      unet_overrides=ml_collections.ConfigDict(),
      scan_layers=True,               # ResBlock runs scanned over stacked parameters
      remat="none",                   # none | block | dots (vdm/nets/stack.py)
      text_dim=text_dim,              # d_model of the T5 encoder
      parameterization="v",           # Imagen's defaults: v and cosine logsnr
      weighting="v_mse",
      weighting_params=ml_collections.ConfigDict(dict(
          sigmoid_bias=0.0, edm_mean=2.4, edm_std=2.4, sigma_data=0.5, min_snr_gamma=5.0)),
      antithetic_time=True,
      p_uncond=0.1,                   # conditioning dropped for classifier-free guidance
      max_aug_level=0.5,              # SR training: t_aug ~ U[0, max_aug_level)
      sample_aug_level=0.0,           # SR sampling: the augmentation level (sweepable)
      schedule=ml_collections.ConfigDict(dict(
          name="cosine", logsnr_min=-20.0, logsnr_max=20.0, pin_endpoints=False,
          n_features=1024, resolution=resolution, base=64, resolution_at_data=32)),
  ))
  c.eval.update(dict(guidance_w=1.0, threshold="dynamic", percentile=99.5, sample_steps=64))
  return c


def digits_stage(*, resolution: int, lowres_size: int, unet_preset: str, guidance_w: float,
                 arg=None) -> ml_collections.ConfigDict:
  """A stage of the embedded digits cascade (offline tiny T5, d_model 32)."""
  c = stage_config(resolution=resolution, lowres_size=lowres_size, unet_preset=unet_preset,
                   text_dim=32)
  c.model.unet_overrides.update(dict(ch=32))
  c.optim.update(dict(lr=1e-3, warmup_steps=100, decay="cosine", ema_decay=0.995,
                      weight_decay=0.0))
  c.train.update(dict(batch_size=64, num_steps=2000, log_every=100, eval_every=0,
                      sample_every=1000, checkpoint_every=500))
  c.eval.update(dict(num_samples=100, sample_steps=64, guidance_w=guidance_w))
  if arg == "runlocal":
    c.model.unet_overrides.update(dict(ch=8))
    c.train.update(dict(batch_size=16, num_steps=4, log_every=2, sample_every=4,
                        checkpoint_every=2))
    c.eval.update(dict(num_samples=8, sample_steps=4))
  return c


def paper_stage(*, resolution: int, lowres_size: int, unet_preset: str, crop_size: int = 0,
                arg=None) -> ml_collections.ConfigDict:
  """A stage of Imagen's 64 -> 256 -> 1024 cascade (Saharia et al. 2022, sec. 2 and app. F)
  on COCO captions with T5-XXL embeddings (4096-d; encode them once with
  `python -m launch.encode_text` and pass --config.data.text_cache=DIR, or point data.t5 at
  the checkpoint). Imagen trained on internal data at batch 2048 for 2.5M steps with lr 1e-4
  and 10k warmup steps (Adafactor for the base model, Adam for the SR models; AdamW here).

  arg "runlocal": the same stage shape on the embedded digits with a tiny U-Net."""
  if arg == "runlocal":
    # 4x4 base / 4 -> 8 SR (the digits are 8x8); the crop stage trains on 4x4 crops.
    c = digits_stage(resolution=4 if not lowres_size else 8, lowres_size=lowres_size and 4,
                     unet_preset="tiny_sr" if lowres_size else "tiny_base", guidance_w=1.0,
                     arg="runlocal")
    if crop_size:
      c.model.crop_size = 4
      c.model.unet_overrides.update(dict(cross_attn_resolutions=(4,), attn_resolutions=()))
    return c
  c = stage_config(resolution=resolution, lowres_size=lowres_size, unet_preset=unet_preset,
                   text_dim=4096)
  c.model.crop_size = crop_size
  c.data.update(dict(name="coco_captions", train_split="train", eval_split="val",
                     image_size=1024 if crop_size else resolution, t5="hf:/models/t5-v1_1-xxl",
                     max_length=128, worker_count=8))
  # Imagen (training details): Adafactor for the 2B base model, Adam for the SR models.
  c.optim.update(dict(name="adamw" if lowres_size else "adafactor", lr=1e-4,
                      warmup_steps=10_000, decay="constant", b2=0.999, weight_decay=0.0,
                      grad_clip=1.0, ema_decay=0.9999))
  c.train.update(dict(batch_size=2048, num_steps=2_500_000, compute_dtype="bfloat16",
                      log_every=100, eval_every=0, sample_every=10_000,
                      checkpoint_every=5_000))
  c.eval.update(dict(num_samples=16, sample_steps=256, guidance_w=3.0 if not lowres_size
                     else 0.0))
  c.mesh.update(dict(ici=(1, -1, 1), rules="fsdp"))
  return c
