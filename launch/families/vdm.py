"""The VDM family: `vdm/experiment.py` (unconditional or class-conditional) for the trainer."""

from configs.vdm import common
from launch.families.base import Family, compute_dtype
from vdm import experiment


def _build(config, source, rngs):
  return experiment.build_model(config.model, source.num_levels, source.image_shape, rngs,
                                dtype=compute_dtype(config))


def _sample(model, rng, batch, config, *, num_steps, guide=None):
  num = batch["image"].shape[0]
  labels = batch["label"] if config.model.num_classes else None
  return experiment.sample(model, rng, num, num_steps=num_steps, sampler=config.eval.sampler,
                           labels=labels, guidance_w=config.eval.get("guidance_w", 0.0),
                           guidance_interval=config.eval.get("guidance_interval", ()),
                           guide=guide, solver_options=config.eval.get("solver"))


VDM = Family(
    build_model=_build,
    default_config=lambda saved: common.base_config(),
    loss_and_grads=lambda g, p, b, r, c: experiment.loss_and_grads(g, p, b, r, c.model),
    eval_terms=lambda m, b, r, c: experiment.per_example_vlb(m, b, r, c.model),
    sample=_sample,
    ode_terms=lambda m, b, r, c, **kw: experiment.per_example_ode_nll(m, b, r, c.model, **kw),
)
