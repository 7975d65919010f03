r"""Progressive distillation on CIFAR-10 as in Salimans & Ho 2022 (sec. 5, app. E): a teacher
sampled with 8192 DDIM steps halved 13 times down to 1 step, 50k updates per halving at batch
128, Adam with lr 5e-5 annealed linearly to 0 in each stage, no EMA, truncated-SNR weighting.

  python -m launch.train --config configs/distill/cifar10_teacher.py --workdir gs://b/cifar_teacher
  python -m launch.distill --teacher gs://b/cifar_teacher --config configs/distill/cifar10.py \
      --workdir gs://b/cifar_distill --config.distill.fid_weights=inception_fid.safetensors
  python -m launch.distill --teacher /tmp/smoke --config configs/distill/cifar10.py:runlocal \
      --workdir /tmp/smoke_distill
"""

from configs.distill.common import base_config


def get_config(arg=None):
  c = base_config()
  c.distill.update(dict(start_steps=8192, end_steps=1, train_steps=50_000, eval_samples=10_000,
                        weighting="truncated_snr", clip="static"))
  c.optim.update(dict(lr=5e-5, decay="linear", ema_decay=0.0))
  c.train.update(dict(batch_size=128, checkpoint_every=5_000))
  if arg == "runlocal":
    c.distill.update(dict(start_steps=4, train_steps=4, eval_samples=8))
    c.train.update(dict(batch_size=8, log_every=2, checkpoint_every=2))
  return c
