"""Model families as the trainer sees them: what to build, what to minimise, how to sample.

The trainer in `launch/trainer.py` is written once; each family hands it these functions.
Adding a family (Imagen stages, distillation students) means adding an entry here, not a
trainer.
"""

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vdm import experiment as vdm_experiment


@dataclasses.dataclass(frozen=True)
class Family:
  """build_model(config, source, rngs) -> nnx.Module
  loss_and_grads(graphdef, params, batch, rng, config) -> (loss, metrics, grads)
  eval_terms(model, batch, rng, config) -> {"recon", "prior", "diffusion"} nats per example
  ode_terms(model, batch, rng, config, **options) -> {"ode"}: nats per example (or None)
  sample(model, rng, batch, config, *, num_steps) -> int images [B, H, W, C], one per example
    of `batch` (eval examples that carry the conditioning: labels, text)
  eval_terms: None when the family has no likelihood (then training evaluates by samples)
  get_source(config, split) -> the split's source, when the family reads other data than
    `pipeline.get_source` gives (Imagen: images with captions)
  wrap_source(config, source, split, workdir) -> source, e.g. adding cached text embeddings
  frozen_init(config) -> an untrained nnx module (e.g. T5) or None; when given, the trainer
    passes it, sharded, as one more argument to loss_and_grads and sample
  default_config(saved_config) -> the family's config with every key at its default, used
    to complete configs saved before a key existed
  batch_keys: which loader fields go to the device."""
  build_model: Callable
  loss_and_grads: Callable
  sample: Callable
  eval_terms: Callable | None = None
  ode_terms: Callable | None = None
  get_source: Callable | None = None
  wrap_source: Callable | None = None
  frozen_init: Callable | None = None
  default_config: Callable | None = None
  batch_keys: tuple = ("image", "label")


def _compute_dtype(config):
  names = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  if config.train.compute_dtype not in names:
    raise ValueError(f"unknown train.compute_dtype {config.train.compute_dtype!r}; choose one "
                     f"of {sorted(names)}")
  return names[config.train.compute_dtype]


def _vdm_build(config, source, rngs):
  return vdm_experiment.build_model(config.model, source.num_levels, source.image_shape, rngs,
                                    dtype=_compute_dtype(config))


def _vdm_sample(model, rng, batch, config, *, num_steps):
  num = batch["image"].shape[0]
  labels = batch["label"] if config.model.num_classes else None
  return vdm_experiment.sample(model, rng, num, num_steps=num_steps,
                               sampler=config.eval.sampler, labels=labels,
                               guidance_w=config.eval.get("guidance_w", 0.0))


def _vdm_defaults(saved):
  del saved
  from configs.vdm import common  # pylint: disable=g-import-not-at-top
  return common.base_config()


VDM = Family(
    build_model=_vdm_build,
    default_config=_vdm_defaults,
    loss_and_grads=lambda g, p, b, r, c: vdm_experiment.loss_and_grads(g, p, b, r, c.model),
    eval_terms=lambda m, b, r, c: vdm_experiment.per_example_vlb(m, b, r, c.model),
    sample=_vdm_sample,
    ode_terms=lambda m, b, r, c, **kw: vdm_experiment.per_example_ode_nll(m, b, r, c.model, **kw),
)

# ------------------------------------------------------------------------------- Imagen


class _Tokenized:
  """A caption source whose examples also carry T5 tokens (for the in-step encoder)."""

  def __init__(self, source, tokenizer):
    from imagen import text_conditioning  # pylint: disable=g-import-not-at-top
    self.source, self.tokenize = source, text_conditioning.Tokenize(tokenizer)
    self.num_levels, self.num_classes = source.num_levels, source.num_classes
    self.image_shape = source.image_shape

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    return self.tokenize(self.source[i])

  def __repr__(self):
    return f"Tokenized({self.source!r}, {self.tokenize.tokenizer.path})"


@functools.lru_cache(maxsize=4)
def _text_encoder(t5: str, max_length: int):
  from launch import encode_text  # pylint: disable=g-import-not-at-top
  return encode_text.load_text_encoder(t5, max_length=max_length, module=True)


def _imagen_text_encoder(config):
  """(frozen T5 module, tokenizer) named by config.data.t5; loaded once per process."""
  return _text_encoder(config.data.t5, config.data.max_length)


def _imagen_get_source(config, split):
  """Images with captions (launch.data.captions): digits, jsonl:DIR, coco_captions or any
  tfds image+text dataset, resized and centre-cropped to data.image_size when set."""
  from launch.data import captions  # pylint: disable=g-import-not-at-top
  return captions.get_caption_source(config.data.name, split,
                                     data_dir=config.data.data_dir or None,
                                     image_size=config.data.get("image_size", 0) or None)


def _imagen_wrap_source(config, source, split, workdir):
  """Adds the captions' T5 embeddings from a cache (config.data.text_source = "cache",
  encoding them once if no cache exists yet in config.data.text_cache, default
  WORKDIR/text_cache), or their tokens for the frozen encoder run in the step ("encoder")."""
  import os  # pylint: disable=g-import-not-at-top
  from launch import encode_text  # pylint: disable=g-import-not-at-top
  if config.data.text_source == "encoder":
    return _Tokenized(source, _imagen_text_encoder(config)[1])
  if config.data.text_source != "cache":
    raise ValueError(f"data.text_source must be 'cache' or 'encoder', got "
                     f"{config.data.text_source!r}")
  cache_dir = config.data.text_cache or (os.path.join(workdir, "text_cache") if workdir else "")
  if not cache_dir:
    raise ValueError("Imagen stages need text embeddings: set data.text_cache to a cache made "
                     "by `python -m launch.encode_text`, or pass a workdir to build one there")
  if not os.path.exists(encode_text.manifest_path(cache_dir, split)):
    text_encoder = encode_text.load_text_encoder(config.data.t5,
                                                 max_length=config.data.max_length)
    encode_text.encode_split(source, cache_dir, split, text_encoder,
                             captions_name=config.data.name)
  return encode_text.WithTextEmbeddings(source, encode_text.EmbeddingCache(cache_dir, split))


def _imagen_build(config, source, rngs):
  from imagen import experiment as imagen_experiment  # pylint: disable=g-import-not-at-top
  return imagen_experiment.build_model(config.model, source.num_levels, source.image_shape,
                                       rngs, dtype=_compute_dtype(config))


def _imagen_frozen_init(config):
  """The frozen T5 encoder when text is encoded in the step, else None (cached text)."""
  return _imagen_text_encoder(config)[0] if config.data.text_source == "encoder" else None


def _imagen_loss_and_grads(graphdef, params, batch, rng, config, text_encoder=None):
  from imagen import experiment as imagen_experiment  # pylint: disable=g-import-not-at-top
  return imagen_experiment.loss_and_grads(graphdef, params, batch, rng, config.model,
                                          text_encoder)


def _imagen_sample(model, rng, batch, config, text_encoder=None, *, num_steps):
  """One stage's samples for the batch's captions; an SR stage is given the real images
  downsampled to its input resolution (so each stage is judged on its own)."""
  from imagen import experiment as imagen_experiment  # pylint: disable=g-import-not-at-top
  from vdm import losses  # pylint: disable=g-import-not-at-top
  k_cond, k_sample = jax.random.split(rng)
  cond = imagen_experiment.stage_cond(model, batch, k_cond, config.model, train=False,
                                      text_encoder=text_encoder)
  x = imagen_experiment.sample(model, k_sample, cond, batch["image"].shape[0],
                               num_steps=num_steps, guidance_w=config.eval.guidance_w,
                               sampler=config.eval.sampler, threshold=config.eval.threshold,
                               percentile=config.eval.percentile)
  return losses.x_to_int(x, model.num_levels)


def _imagen_defaults(saved):
  from configs.imagen import common  # pylint: disable=g-import-not-at-top
  m = saved.model
  return common.stage_config(resolution=m.resolution, lowres_size=m.lowres_size,
                             unet_preset=m.unet_preset, text_dim=m.text_dim)


IMAGEN = Family(
    build_model=_imagen_build,
    default_config=_imagen_defaults,
    loss_and_grads=_imagen_loss_and_grads,
    sample=_imagen_sample,
    get_source=_imagen_get_source,
    wrap_source=_imagen_wrap_source,
    frozen_init=_imagen_frozen_init,
    batch_keys=("image", "label", "text_emb", "text_mask", "input_ids", "attention_mask"),
)

FAMILIES = {"vdm": VDM, "imagen": IMAGEN}


def get_family(name: str) -> Family:
  if name == "distill" and name not in FAMILIES:   # defined on top of the others
    from launch import distill_family  # pylint: disable=g-import-not-at-top
    FAMILIES[name] = distill_family.DISTILL
  if name not in FAMILIES:
    raise ValueError(f"unknown family {name!r}; choose one of {sorted(FAMILIES) + ['distill']}")
  return FAMILIES[name]


def device_batch(batch: dict, keys) -> dict:
  """The numeric fields a family uses (strings such as captions stay on the host)."""
  return {k: np.asarray(batch[k]) for k in keys if k in batch}
