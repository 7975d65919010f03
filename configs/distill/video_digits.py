r"""Guided distillation of a moving-digits video stage (configs/video/moving_digits.py), as
Imagen Video distilled all its stages (Ho et al. 2022b, sec. 2.7: guided stage one, then
halvings to 8 steps): w in [0, 4] folded into a w-conditioned student at the teacher's 32
DDIM steps, then 32 -> 16 -> 8, the guidance weight drawn per example. Each stage's summary
holds the video measures (alignment, direction accuracy, consistency, FD) of the student
and of the teacher sampled with as many DDIM steps, at w = sample_w.

  python -m launch.train --config configs/video/moving_digits.py --workdir runs/video
  python -m launch.distill --teacher runs/video --config configs/distill/video_digits.py \
      --workdir runs/video_distill
  python -m launch.evaluate_video --workdir runs/video_distill/stage02_n8 --guidance 1 --steps 8
  python -m launch.distill --teacher /tmp/smoke --config configs/distill/video_digits.py:runlocal \
      --workdir /tmp/smoke_distill
"""

from configs.distill.common import base_config


def get_config(arg=None):
  c = base_config()
  c.distill.update(dict(guided=True, start_steps=32, end_steps=8, train_steps=300,
                        guided_train_steps=300, w_min=0.0, w_max=4.0, sample_w=1.0,
                        eval_samples=100))
  c.optim.update(dict(lr=5e-4))
  c.train.update(dict(batch_size=16, log_every=50, checkpoint_every=150))
  if arg == "runlocal":
    c.distill.update(dict(start_steps=4, end_steps=2, train_steps=2, guided_train_steps=2,
                          eval_samples=4))
    c.train.update(dict(batch_size=8, log_every=1, checkpoint_every=2))
  return c
