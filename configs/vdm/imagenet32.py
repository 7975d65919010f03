r"""VDM on downsampled ImageNet 32x32 (Kingma et al. 2021, appendix B).

  python -m launch.train --config configs/vdm/imagenet32.py --workdir gs://BUCKET/vdm_in32
  python -m launch.train --config configs/vdm/imagenet32.py:runlocal --workdir /tmp/smoke

Needs downsampled_imagenet/32x32 as ArrayRecord under $TFDS_DATA_DIR (see README).
"""

from configs.vdm.common import base_config


def get_config(arg=None):
  c = base_config()
  c.data.update(dict(name="downsampled_imagenet/32x32", train_split="train",
                     eval_split="validation"))
  c.model.schedule.update(dict(name="learned_net", logsnr_min=-5.0, logsnr_max=13.3))
  c.model.score_unet.update(dict(ch=256, n_layer=32, dropout=0.0, fourier_min=6,
                                 fourier_max=7))
  c.optim.update(dict(lr=2e-4, warmup_steps=0, b2=0.99, weight_decay=0.01, ema_decay=0.9999))
  c.train.update(dict(batch_size=512, num_steps=2_000_000))
  c.eval.update(dict(batch_size=512))
  if arg == "runlocal":
    c.data.name = "synthetic:32x32x3"
    c.model.score_unet.update(dict(ch=8, n_layer=1))
    c.model.schedule.n_features = 8
    c.train.update(dict(batch_size=8, num_steps=4, log_every=2, eval_every=4, sample_every=4,
                        checkpoint_every=2))
    c.eval.update(dict(batch_size=8, num_samples=4, sample_steps=4, max_examples=16))
  return c
