r"""Progressive distillation of the digits model in the v-parameterization
(configs/distill/digits_teacher.py): from its 64-step DDIM sampler down to 1 step, 6
halvings, minutes each on 2 CPU cores. Targets come from the unclipped teacher (Algorithm 2
of Salimans & Ho; --config.distill.target_clip=static for the clipped variant).

  python -m launch.train --config configs/distill/digits_teacher.py --workdir runs/digits_v
  python -m launch.distill --teacher runs/digits_v --config configs/distill/digits.py \
      --workdir runs/digits_v_distill
  python -m launch.distill --teacher /tmp/smoke --config configs/distill/digits.py:runlocal \
      --workdir /tmp/smoke_distill
"""

from configs.distill.common import base_config


def get_config(arg=None):
  c = base_config()
  c.distill.update(dict(start_steps=64, end_steps=1, train_steps=400, eval_samples=297))
  c.optim.update(dict(lr=5e-4))
  c.train.update(dict(batch_size=64, log_every=100, checkpoint_every=200))
  if arg == "runlocal":
    c.distill.update(dict(start_steps=4, end_steps=1, train_steps=4, eval_samples=16))
    c.train.update(dict(batch_size=16, log_every=2, checkpoint_every=2))
  return c
