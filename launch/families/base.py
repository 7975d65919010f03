"""What a model family hands the trainer: what to build, what to minimise, how to sample.

The trainer (`launch/trainer.py`) is written once; each family is one `Family` value in its
own module of this package, and `launch.families.get_family(name)` is the registry. A
family's math lives in its package's `experiment.py` (vdm/, imagen/, distill/); its module
here only wires that to the trainer.
"""

import dataclasses
from typing import Callable

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Family:
  """build_model(config, source, rngs) -> nnx.Module
  loss_and_grads(graphdef, params, batch, rng, config[, frozen]) -> (loss, metrics, grads)
  sample(model, rng, batch, config[, frozen], *, num_steps, guide=None) -> int images
    [B, H, W, C], one per example of `batch` (eval examples that carry the conditioning:
    labels, text), guided as config.eval says (guidance_w, guidance_interval); `guide`: a
    weaker model of the same family (an earlier checkpoint, a smaller run) that autoguides
    at weight guidance_w in place of classifier-free guidance (vdm/guidance.py)
  eval_terms(model, batch, rng, config) -> {"recon", "prior", "diffusion"} nats per example;
    None when the family has no likelihood (then training evaluates by samples)
  ode_terms(model, batch, rng, config, **options) -> {"ode"}: nats per example (or None)
  get_source(config, split) -> the split's source, when the family reads other data than
    `pipeline.get_source` gives (Imagen: images with captions)
  wrap_source(config, source, split, workdir) -> source, e.g. adding cached text embeddings
  frozen_init(config, load_ema_model) -> an untrained or restored nnx module (T5, a
    distillation teacher) or None; `load_ema_model(workdir, step)` restores a trained
    workdir's EMA model. When given, the trainer passes the module, sharded, as one more
    argument to loss_and_grads and sample
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


def compute_dtype(config):
  """config.train.compute_dtype as a jnp dtype (parameters stay float32)."""
  names = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  if config.train.compute_dtype not in names:
    raise ValueError(f"unknown train.compute_dtype {config.train.compute_dtype!r}; choose one "
                     f"of {sorted(names)}")
  return names[config.train.compute_dtype]


# Clips go to the devices as uint8, their sources' type (levels 0..num_levels-1 < 256): a
# quarter of int32's bytes, 1.05 GiB less per 128-frame 768x1280 RGB clip on the chips that
# hold it. Nets read them through vdm.losses.int_to_x, which casts to float first.
NARROW = {"video": np.uint8}


def device_batch(batch: dict, keys) -> dict:
  """The numeric fields a family uses (strings such as captions stay on the host), clips
  narrowed to uint8 (NARROW)."""
  out = {}
  for k in keys:
    if k not in batch:
      continue
    a = np.asarray(batch[k])
    if k in NARROW and a.dtype != NARROW[k]:
      if a.size and (a.min() < 0 or a.max() > np.iinfo(NARROW[k]).max):
        raise ValueError(f"batch[{k!r}] holds levels {a.min()}..{a.max()}, outside "
                         f"{np.dtype(NARROW[k]).name}: clips must be grey levels 0..255")
      a = a.astype(NARROW[k])
    out[k] = a
  return out
