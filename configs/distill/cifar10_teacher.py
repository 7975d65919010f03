r"""The CIFAR-10 teacher of progressive distillation (Salimans & Ho 2022, sec. 5): a
DDPM-style U-Net (Ho et al. 2020: 128 channels, multipliers 1,2,2,2, attention at 16x16,
dropout) with the cosine schedule, the mixed x & eps ("both") parameterization and the
truncated-SNR weighting, the combination the paper distils best.

  python -m launch.train --config configs/distill/cifar10_teacher.py --workdir gs://b/cifar_teacher
  python -m launch.train --config configs/distill/cifar10_teacher.py:runlocal --workdir /tmp/smoke

Then configs/distill/cifar10.py. Needs cifar10 prepared as ArrayRecord (README, "Datasets").
"""

from configs.vdm.common import base_config, make_runlocal


def get_config(arg=None):
  c = base_config()
  c.data.update(dict(name="cifar10", train_split="train", eval_split="test", random_flip=True))
  c.model.update(dict(net="unet", parameterization="both", weighting="truncated_snr",
                      variance_minimization=False))
  c.model.schedule.update(dict(name="cosine", logsnr_min=-20.0, logsnr_max=20.0))
  c.model.unet.update(dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=3,
                           attn_resolutions=(16,), dropout=0.2, num_heads=1))
  c.optim.update(dict(lr=2e-4, warmup_steps=5_000, b2=0.999, weight_decay=0.0,
                      ema_decay=0.9999, grad_clip=1.0))
  c.train.update(dict(batch_size=128, num_steps=800_000, eval_every=50_000))
  c.eval.update(dict(batch_size=512, sample_steps=8192, sampler="ddim"))
  if arg == "runlocal":
    make_runlocal(c, "synthetic:32x32x3")
    c.model.unet.update(dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=()))
  return c
