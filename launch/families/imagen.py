"""The Imagen family: one cascade stage of `imagen/experiment.py` for the trainer, reading
captioned images and their T5 text either from an embedding cache or through the frozen
T5 encoder run inside the train step (config.data.text_source)."""

import functools

import jax

from configs.imagen import common
from imagen import experiment, text_conditioning
from launch import fs
from launch import text_encoder as text_encoder_lib
from launch.data import captions, pipeline, text_cache
from launch.families.base import Family, compute_dtype
from vdm import losses


class Tokenized:
  """A caption source whose examples also carry T5 tokens (for the in-step encoder)."""

  def __init__(self, source, tokenizer):
    self.source, self.tokenize = source, text_conditioning.Tokenize(tokenizer)
    pipeline.copy_metadata(self, source)

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    return self.tokenize(self.source[i])

  def __repr__(self):
    return f"Tokenized({self.source!r}, {self.tokenize.tokenizer.path})"


@functools.lru_cache(maxsize=4)
def _text_encoder(t5: str, max_length: int):
  return text_encoder_lib.load_text_encoder(t5, max_length=max_length, module=True)


def text_encoder(config):
  """(frozen T5 module, tokenizer) named by config.data.t5; loaded once per process."""
  return _text_encoder(config.data.t5, config.data.max_length)


def _get_source(config, split):
  """Images with captions (launch.data.captions): digits, jsonl:DIR, coco_captions or any
  tfds image+text dataset, resized and centre-cropped to data.image_size when set."""
  return captions.get_caption_source(config.data.name, split,
                                     data_dir=config.data.data_dir or None,
                                     image_size=config.data.get("image_size", 0) or None)


def _wrap_source(config, source, split, workdir):
  """Adds the captions' T5 embeddings from a cache (config.data.text_source = "cache",
  encoding them once if no cache exists yet in config.data.text_cache, default
  WORKDIR/text_cache), or their tokens for the frozen encoder run in the step ("encoder")."""
  if config.data.text_source == "encoder":
    return Tokenized(source, text_encoder(config)[1])
  if config.data.text_source != "cache":
    raise ValueError(f"data.text_source must be 'cache' or 'encoder', got "
                     f"{config.data.text_source!r}")
  cache_dir = config.data.text_cache or (fs.join(workdir, "text_cache") if workdir else "")
  if not cache_dir:
    raise ValueError("Imagen stages need text embeddings: set data.text_cache to a cache made "
                     "by `python -m launch.encode_text`, or pass a workdir to build one there")
  if not fs.path(text_cache.manifest_path(cache_dir, split)).exists():
    encoder = text_encoder_lib.load_text_encoder(config.data.t5,
                                                 max_length=config.data.max_length)
    text_cache.encode_split(source, cache_dir, split, encoder, captions_name=config.data.name)
  return text_cache.WithTextEmbeddings(source, text_cache.EmbeddingCache(cache_dir, split))


def _build(config, source, rngs):
  return experiment.build_model(config.model, source.num_levels, source.image_shape, rngs,
                                dtype=compute_dtype(config))


def _frozen_init(config, load_ema_model):
  """The frozen T5 encoder when text is encoded in the step, else None (cached text)."""
  del load_ema_model
  return text_encoder(config)[0] if config.data.text_source == "encoder" else None


def _loss_and_grads(graphdef, params, batch, rng, config, encoder=None):
  return experiment.loss_and_grads(graphdef, params, batch, rng, config.model, encoder)


def _sample(model, rng, batch, config, encoder=None, *, num_steps, guide=None):
  """One stage's samples for the batch's captions; an SR stage is given the real images
  downsampled to its input resolution (so each stage is judged on its own)."""
  k_cond, k_sample = jax.random.split(rng)
  cond = experiment.stage_cond(model, batch, k_cond, config.model, train=False,
                               text_encoder=encoder)
  x = experiment.sample(model, k_sample, cond, batch["image"].shape[0], num_steps=num_steps,
                        guidance_w=config.eval.guidance_w, sampler=config.eval.sampler,
                        threshold=config.eval.threshold, percentile=config.eval.percentile,
                        guidance_interval=config.eval.get("guidance_interval", ()),
                        guide=guide, solver_options=config.eval.get("solver"))
  return losses.x_to_int(x, model.num_levels)


def _defaults(saved):
  m = saved.model
  return common.stage_config(resolution=m.resolution, lowres_size=m.lowres_size,
                             unet_preset=m.unet_preset, text_dim=m.text_dim)


IMAGEN = Family(
    build_model=_build,
    default_config=_defaults,
    loss_and_grads=_loss_and_grads,
    sample=_sample,
    get_source=_get_source,
    wrap_source=_wrap_source,
    frozen_init=_frozen_init,
    batch_keys=("image", "label", "text_emb", "text_mask", "input_ids", "attention_mask"),
)
