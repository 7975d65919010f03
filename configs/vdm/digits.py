r"""VDM on scikit-learn's bundled digits (8x8, 17 grey levels): the embedded default.

  python -m launch.train --config configs/vdm/digits.py --workdir runs/digits
  python -m launch.train --config configs/vdm/digits.py:runlocal --workdir /tmp/smoke

Schedule end and Fourier features come from the 17 levels (vdm.experiment.settings_for_levels):
logsnr_max = 2 log(3 * 17) = 7.9 puts the t=0 noise at 1/6 of the level gap, and exponents
2..3 resolve that gap, where VDM's CIFAR values (13.3; 6, 7) would waste the model on noise
levels far below it.
"""

from configs.vdm.common import base_config


def get_config(arg=None):
  c = base_config()
  c.data.name = "digits"
  c.model.schedule.logsnr_max = 7.9
  c.model.schedule.logsnr_min = -5.0
  c.model.schedule.n_features = 64
  c.model.score_unet.update(dict(ch=32, n_layer=4, dropout=0.0, fourier_min=2, fourier_max=3))
  c.optim.update(dict(lr=2e-3, warmup_steps=100, decay="cosine", ema_decay=0.995,
                      weight_decay=0.0))
  c.train.update(dict(batch_size=64, num_steps=3000, log_every=100, eval_every=1500,
                      sample_every=1500, checkpoint_every=500))
  c.eval.update(dict(batch_size=297, num_time_samples=4, num_samples=100, sample_steps=200))
  if arg == "runlocal":   # seconds, for smoke tests
    c.model.score_unet.update(dict(ch=8, n_layer=1))
    c.model.schedule.n_features = 8
    c.train.update(dict(batch_size=16, num_steps=6, log_every=2, eval_every=6, sample_every=6,
                        checkpoint_every=3))
    c.eval.update(dict(batch_size=64, num_time_samples=1, num_samples=16, sample_steps=8,
                       max_examples=64))
  return c
