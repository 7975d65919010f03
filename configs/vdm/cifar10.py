r"""VDM on CIFAR-10, the paper's values (Kingma et al. 2021, appendix B).

  python -m launch.train --config configs/vdm/cifar10.py --workdir gs://BUCKET/vdm_cifar10
  python -m launch.train --config configs/vdm/cifar10.py:runlocal --workdir /tmp/smoke

Needs cifar10 prepared as ArrayRecord under $TFDS_DATA_DIR (see README, "Datasets").
"""

from configs.vdm.common import base_config, make_runlocal


def get_config(arg=None):
  c = base_config()
  c.data.update(dict(name="cifar10", train_split="train", eval_split="test"))
  c.model.schedule.update(dict(name="learned_net", logsnr_min=-5.0, logsnr_max=13.3))
  c.model.score_unet.update(dict(ch=128, n_layer=32, dropout=0.1, fourier_min=6,
                                 fourier_max=7))
  c.optim.update(dict(lr=2e-4, warmup_steps=0, b1=0.9, b2=0.99, weight_decay=0.01,
                      ema_decay=0.9999, grad_clip=1.0))
  c.train.update(dict(batch_size=128, num_steps=10_000_000))
  c.eval.update(dict(batch_size=512, num_time_samples=1))
  if arg == "runlocal":
    make_runlocal(c, "synthetic:32x32x3")
  return c
