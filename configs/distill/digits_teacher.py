r"""The digits teacher of progressive distillation: the README's digits VDM
(configs/vdm/digits.py: learned schedule, VLB loss, bits/dim) in the v-parameterization.

  python -m launch.train --config configs/distill/digits_teacher.py --workdir runs/digits_v
  python -m launch.train --config configs/distill/digits_teacher.py:runlocal --workdir /tmp/smoke

Then configs/distill/digits.py. Students of few steps need an output that stays well
conditioned where alpha -> 0: an eps-teacher's x-hat = (z - sigma eps-hat) / alpha blows up
there, so Salimans & Ho (2022, sec. 4) distil v, x or "both" networks, never eps.
"""

from configs.vdm import digits


def get_config(arg=None):
  c = digits.get_config(arg)
  c.model.parameterization = "v"
  return c
