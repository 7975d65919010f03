"""Keys of a distillation pipeline config (`python -m launch.distill --config ...`).

The model, data and mesh come from the teacher's workdir; this config says how to distil:
which stages, how long each trains, with what optimizer, and how students are sampled.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.distill = ml_collections.ConfigDict(dict(
      guided=False,             # True: first a w-conditioned student (guided distillation)
      start_steps=256,          # the teacher's sampling steps; students take half, ...
      end_steps=1,              # ... down to this many (a power-of-two fraction of start)
      train_steps=50_000,       # updates per halving
      guided_train_steps=50_000,  # updates of the guided stage one
      weighting="truncated_snr",  # max(SNR, 1) ||x - x_hat||^2; or snr_plus_one
      clip="static",            # the x-hat hook of the students' sampling
      target_clip="none",       # ... and of the teacher's targets: none, as in Algorithm 2
      allow_eps_teacher=False,  # eps-teachers distil badly below 8 steps (paper sec. 4)
      sampler="ddim",           # students' N-step sampler: ddim or stochastic
      w_min=0.0, w_max=4.0,     # guidance weights drawn for w-conditioned students
      sample_w=1.0,             # the guidance weight samples and summaries use
      teacher_step=0,           # teacher checkpoint step (0: latest)
      eval_samples=256,         # images per summary (sample quality and the PNG grid)
      fid_weights="",           # non-digits data: FID with evaluation/inception.py's Inception file
  ))
  # Salimans & Ho: Adam, lr annealed linearly to 0 within each stage, no EMA.
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw",
      lr=5e-5, warmup_steps=0, decay="linear", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
      grad_clip=1.0, ema_decay=0.0))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=128, grad_accum=1, compute_dtype="float32", nan_policy="error",
      log_every=100, checkpoint_every=5_000, keep_checkpoints=2))
  return c
