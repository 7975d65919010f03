"""Model families as the trainer sees them: what to build, what to minimise, how to sample.

The trainer in `launch/trainer.py` is written once; each family hands it these functions.
Adding a family (Imagen stages, distillation students) means adding an entry here, not a
trainer.
"""

import dataclasses
from typing import Callable

import jax.numpy as jnp
import numpy as np

from vdm import experiment as vdm_experiment


@dataclasses.dataclass(frozen=True)
class Family:
  """build_model(config, source, rngs) -> nnx.Module
  loss_and_grads(graphdef, params, batch, rng, config) -> (loss, metrics, grads)
  eval_terms(model, batch, rng, config) -> {"recon", "prior", "diffusion"} nats per example
  ode_terms(model, batch, rng, config, **options) -> {"ode"}: nats per example (or None)
  sample(model, rng, num, config, *, num_steps) -> int images [num, H, W, C]
  batch_keys: which loader fields go to the device."""
  build_model: Callable
  loss_and_grads: Callable
  eval_terms: Callable
  sample: Callable
  ode_terms: Callable | None = None
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


def _vdm_sample(model, rng, num, config, *, num_steps):
  labels = (jnp.arange(num) % config.model.num_classes) if config.model.num_classes else None
  return vdm_experiment.sample(model, rng, num, num_steps=num_steps,
                               sampler=config.eval.sampler, labels=labels)


VDM = Family(
    build_model=_vdm_build,
    loss_and_grads=lambda g, p, b, r, c: vdm_experiment.loss_and_grads(g, p, b, r, c.model),
    eval_terms=lambda m, b, r, c: vdm_experiment.per_example_vlb(m, b, r, c.model),
    sample=_vdm_sample,
    ode_terms=lambda m, b, r, c, **kw: vdm_experiment.per_example_ode_nll(m, b, r, c.model, **kw),
)

FAMILIES = {"vdm": VDM}


def get_family(name: str) -> Family:
  if name not in FAMILIES:
    raise ValueError(f"unknown family {name!r}; choose one of {sorted(FAMILIES)}")
  return FAMILIES[name]


def device_batch(batch: dict, keys) -> dict:
  """The numeric fields a family uses (strings such as captions stay on the host)."""
  return {k: np.asarray(batch[k]) for k in keys if k in batch}
