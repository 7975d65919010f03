"""The "distill" family: a student trained by the generic trainer against a frozen teacher.

A distillation stage's config is its teacher's config (any family: VDM, class-conditional
VDM, an Imagen stage) plus a `distill` section; `config.distill.base_family` names the
teacher's family, whose model and data are reused unchanged. The teacher is the trainer's
frozen module: its EMA weights, restored from `distill.teacher` (a workdir), enter the
compiled step as a sharded argument. The loss and sampling are `distill/experiment.py`.
"""

from distill import experiment
from launch.families.base import Family

# Teachers conditioned on T5 text (an Imagen stage, a video stage): their students read the
# teacher's text cache.
TEXT_FAMILIES = ("imagen", "video")


def _check(config):
  if config.optim.weight_decay:
    raise ValueError("distillation needs optim.weight_decay=0: decay would move the teacher's "
                     "noise schedule, which the student must keep (its sampling grid)")
  return config.distill


def make_family(bases: dict) -> Family:
  """The distill family over the base families it can distil (name -> Family)."""

  def base(config) -> Family:
    name = config.distill.base_family
    if name not in bases:
      raise ValueError(f"cannot distil a {name!r} teacher; supported: {sorted(bases)}")
    return bases[name]

  def loss_and_grads(graphdef, params, batch, rng, config, teacher):
    return experiment.loss_and_grads(graphdef, params, batch, rng, _check(config),
                                     config.model, teacher)

  def sample(model, rng, batch, config, teacher=None, *, num_steps, guide=None):
    del teacher
    if guide is not None:
      raise ValueError("autoguidance (a guide model) is not supported for distilled students: "
                       "sample the teacher's workdir with the guide instead")
    return experiment.sample(model, rng, batch, config.distill, config.model,
                             num_steps=num_steps)

  def frozen_init(config, load_ema_model):
    """The teacher's EMA model (a text-conditioned teacher reads the text cache, not T5)."""
    d = config.distill
    if d.base_family in TEXT_FAMILIES and config.data.text_source != "cache":
      raise ValueError(f"distilling a {d.base_family} stage needs cached text embeddings: set "
                       "--config.data.text_source=cache (the teacher's text_cache is reused)")
    return load_ema_model(d.teacher, d.teacher_step or None)[0]

  def get_source(config, split):
    b = base(config)
    return b.get_source(config, split) if b.get_source else None

  def wrap_source(config, source, split, workdir):
    b = base(config)
    return b.wrap_source(config, source, split, workdir) if b.wrap_source else source

  return Family(
      build_model=lambda config, source, rngs: base(config).build_model(config, source, rngs),
      loss_and_grads=loss_and_grads,
      sample=sample,
      get_source=get_source,
      wrap_source=wrap_source,
      frozen_init=frozen_init,
      default_config=lambda saved: base(saved).default_config(saved),
      batch_keys=tuple(dict.fromkeys(k for b in bases.values() for k in b.batch_keys)),
  )
