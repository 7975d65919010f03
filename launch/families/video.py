"""The video family: one text-to-video stage of `imagen/video_experiment.py` for the trainer.

It reads captioned clips (launch/data: moving digits, a folder of video files with a JSONL of
captions, tfds video datasets) under the batch key "video" [B, F, H, W, C], and their T5
text exactly as the Imagen family does (an embedding cache over the captions, or the frozen
encoder in the step: config.data.text_source), by reusing that family's text wrapping.
"""

import jax

from configs.video import common
from imagen import experiment as imagen_experiment
from imagen import video_experiment as experiment
from launch.data import pipeline
from launch.families.imagen import IMAGEN
from launch.families.base import Family, compute_dtype
from vdm import losses


def _get_source(config, split):
  """Clips with captions: data.name with data.video_options (frame_stride, ...)."""
  source = pipeline.get_source(config.data.name, split, data_dir=config.data.data_dir or None,
                               **dict(config.data.video_options))
  if not hasattr(source, "video_shape"):
    raise ValueError(f"data.name={config.data.name!r} is not a video source; the video "
                     f"family reads one of {pipeline.VIDEO_SOURCES}")
  return source


def _build(config, source, rngs):
  return experiment.build_model(config.model, source.num_levels, source.video_shape, rngs,
                                dtype=compute_dtype(config))


def _loss_and_grads(graphdef, params, batch, rng, config, encoder=None):
  return experiment.loss_and_grads(graphdef, params, batch, rng, config.model, encoder)


def _sample(model, rng, batch, config, encoder=None, *, num_steps, guide=None):
  """One clip per example of the batch, for its caption: int levels [B, F, H, W, C]."""
  k_cond, k_sample = jax.random.split(rng)
  cond = experiment.stage_cond(model, batch, k_cond, config.model, train=False,
                               text_encoder=encoder)
  x = imagen_experiment.sample(model, k_sample, cond, batch["video"].shape[0],
                               num_steps=num_steps, guidance_w=config.eval.guidance_w,
                               sampler=config.eval.sampler, threshold=config.eval.threshold,
                               percentile=config.eval.percentile,
                               guidance_interval=config.eval.get("guidance_interval", ()),
                               guide=guide, solver_options=config.eval.get("solver"))
  return losses.x_to_int(x, model.num_levels)


def _defaults(saved):
  m = saved.model
  return common.stage_config(num_frames=m.num_frames, resolution=m.resolution,
                             unet_preset=m.unet_preset, text_dim=m.text_dim)


VIDEO = Family(
    build_model=_build,
    default_config=_defaults,
    loss_and_grads=_loss_and_grads,
    sample=_sample,
    get_source=_get_source,
    wrap_source=IMAGEN.wrap_source,
    frozen_init=IMAGEN.frozen_init,
    batch_keys=("video", "label", "text_emb", "text_mask", "input_ids", "attention_mask"),
)
