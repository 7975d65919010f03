"""Pieces shared by the VDM configs: every key the trainer and the VDM experiment read.

Each experiment file calls `base_config()` and changes what differs; unknown keys given on
the command line are an error (see launch/config_flags.py).
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.family = "vdm"
  c.seed = 0

  c.data = ml_collections.ConfigDict(dict(
      name="digits", data_dir="", train_split="train", eval_split="test", worker_count=0,
      random_flip=False))

  c.model = ml_collections.ConfigDict(dict(
      net="score_unet",               # or "unet" (multi-resolution, ADM style)
      parameterization="eps",         # eps | x | v
      num_classes=0,                  # > 0: class-conditional on batch["label"]
      p_uncond=0.0,                   # class-conditional: null label this often (for CFG)
      guidance_embedding=False,       # the net also takes cond["guidance_w"] (distillation)
      self_condition=False,           # the net also sees its previous x-hat (Chen et al. 2022)
      weighting="elbo",               # see vdm.losses.WEIGHTINGS; elbo trains the VLB
      weighting_params=ml_collections.ConfigDict(dict(
          sigmoid_bias=0.0, edm_mean=2.4, edm_std=2.4, sigma_data=0.5, min_snr_gamma=5.0)),
      antithetic_time=True,           # low-discrepancy t across the batch (VDM app. I.1)
      num_steps_train=0,              # 0: continuous-time VLB; T > 0: T-step VLB
      variance_minimization=True,     # learned schedules descend the loss variance
      schedule=ml_collections.ConfigDict(dict(
          name="learned_net", logsnr_min=-5.0, logsnr_max=13.3, pin_endpoints=False,
          n_features=1024, resolution=32, base=64, resolution_at_data=32)),
      # scan_layers: identical blocks run by lax.scan over stacked parameters (one compiled
      # block; False unrolls them, same parameters); remat: none | block | dots
      # (vdm/nets/stack.py).
      score_unet=ml_collections.ConfigDict(dict(
          ch=128, n_layer=32, dropout=0.1, with_attention=False, fourier_min=6,
          fourier_max=7, scan_layers=True, remat="none")),
      unet=ml_collections.ConfigDict(dict(
          ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
          dropout=0.1, num_heads=1, scan_layers=True, remat="none")),
  ))

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw",                   # or "adafactor" (factored second moments, less memory)
      lr=2e-4, warmup_steps=100, decay="constant", b1=0.9, b2=0.99, eps=1e-8,
      weight_decay=0.01, grad_clip=1.0, ema_decay=0.9999,
      # Post-hoc EMA (EDM2): track power-function EMAs of these relative stds and snapshot
      # them every snapshot_every steps (and at the last step); `python -m launch.phema`
      # then reconstructs the EMA of any std from the snapshots.
      phema=ml_collections.ConfigDict(dict(enabled=False, stds=(0.05, 0.10),
                                           snapshot_every=5000))))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=128, num_steps=10_000_000, grad_accum=1, compute_dtype="float32",
      nan_policy="error",             # error: stop with a message; skip: drop the update
      log_every=100, eval_every=10_000, sample_every=10_000, checkpoint_every=5_000,
      keep_checkpoints=3))

  c.eval = ml_collections.ConfigDict(dict(
      # sampler: one of vdm.samplers.SAMPLERS (ddim, ancestral, heun, dpmpp_2m, pc);
      # sample_steps is its budget of network evaluations (samplers.nfe: the exact count).
      batch_size=256, num_time_samples=1, num_samples=64, sample_steps=256, sampler="ddim",
      guidance_w=0.0,                 # class-conditional sampling: (1 + w) cond - w uncond
      guidance_interval=(),           # (lo, hi) in logsnr: guide only there; (): everywhere
      max_examples=0,                 # 0: the whole split
      # Options of the solvers (vdm.solvers.SolverOptions): EDM Heun's churn, s_tmin,
      # s_tmax, s_noise, rho; PC's Langevin snr and corrector_steps; DPM-Solver++(2M)'s
      # grid ("t": uniform in t, "logsnr": uniform in logsnr).
      solver=ml_collections.ConfigDict(dict(
          churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, rho=7.0, snr=0.16,
          corrector_steps=1, grid="t"))))

  c.mesh = ml_collections.ConfigDict(dict(
      ici=(-1, 1, 1), dcn=(1, 1, 1), rules="data_parallel"))
  return c


def make_runlocal(c: ml_collections.ConfigDict, data_name: str | None = None):
  """The `:runlocal` smoke variant: a tiny model and a few steps, seconds on a CPU."""
  if data_name:
    c.data.name = data_name
  c.model.score_unet.update(dict(ch=8, n_layer=1))
  c.model.schedule.n_features = 8
  c.train.update(dict(batch_size=8, num_steps=4, log_every=2, eval_every=4, sample_every=4,
                      checkpoint_every=2))
  c.eval.update(dict(batch_size=8, num_samples=4, sample_steps=4, max_examples=16))
  return c


def imagenet_config(resolution: int, arg=None) -> ml_collections.ConfigDict:
  """VDM on downsampled ImageNet at 32 or 64 (Kingma et al. 2021, appendix B)."""
  c = base_config()
  c.data.update(dict(name=f"downsampled_imagenet/{resolution}x{resolution}",
                     train_split="train", eval_split="validation"))
  c.model.schedule.update(dict(name="learned_net", logsnr_min=-5.0, logsnr_max=13.3))
  c.model.score_unet.update(dict(ch=256, n_layer=32, dropout=0.0, fourier_min=6,
                                 fourier_max=7))
  c.optim.update(dict(lr=2e-4, warmup_steps=0, b2=0.99, weight_decay=0.01, ema_decay=0.9999))
  c.train.update(dict(batch_size=512, num_steps=2_000_000))
  c.eval.update(dict(batch_size=512))
  if arg == "runlocal":
    make_runlocal(c, f"synthetic:{resolution}x{resolution}x3")
  return c
