r"""Class-conditional VDM on the digits with classifier-free guidance training (the label is
dropped 10% of the time): the teacher of the guided-distillation default.

  python -m launch.train --config configs/vdm/digits_cond.py --workdir runs/digits_cond
  python -m launch.train --config configs/vdm/digits_cond.py:runlocal --workdir /tmp/smoke

Same model as configs/vdm/digits.py plus a class embedding, in the v-parameterization:
distilled students down to a few steps need an output that stays well-conditioned where
alpha -> 0, which eps-prediction is not (Salimans & Ho 2022, sec. 4).
"""

from configs.vdm import digits


def get_config(arg=None):
  c = digits.get_config(arg)
  c.model.update(dict(num_classes=10, p_uncond=0.1, parameterization="v"))
  c.eval.guidance_w = 1.0
  return c
