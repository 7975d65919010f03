r"""Guided distillation of the class-conditional digits model (configs/vdm/digits_cond.py):
stage one folds classifier-free guidance (w in [0, 4]) into a w-conditioned student, then
progressive halvings from 64 steps down to 1, the guidance weight drawn per example.

  python -m launch.train --config configs/vdm/digits_cond.py --workdir runs/digits_cond
  python -m launch.distill --teacher runs/digits_cond --config configs/distill/digits_guided.py \
      --workdir runs/digits_guided
"""

from configs.distill import digits


def get_config(arg=None):
  c = digits.get_config(arg)
  c.distill.update(dict(guided=True, guided_train_steps=600 if arg != "runlocal" else 4,
                        w_min=0.0, w_max=4.0, sample_w=1.0))
  return c
