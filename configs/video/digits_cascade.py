r"""An Imagen Video-style cascade on the embedded moving digits (Ho et al. 2022b, sec. 2.2):
a base stage of 8 frames of 16x16, a temporal super-resolution stage to 16 frames, and a
spatial one to 32x32, all from the same data, moving_digits:16x32x32 (16 frames of 32x32)
with the digits drawn twice as large (16x16, digit_scale 2), so the base sees the 8x8
digits of configs/video/moving_digits.py moving 1 pixel per frame across 16x16, as there.

  python -m launch.train --config configs/video/digits_cascade.py:base --workdir runs/vbase
  python -m launch.train --config configs/video/digits_cascade.py:tsr --workdir runs/vtsr
  python -m launch.train --config configs/video/digits_cascade.py:ssr --workdir runs/vssr
  python -m launch.sample_cascade --stages runs/vbase,runs/vtsr,runs/vssr \
      --prompts "the digit 3 moving left" --steps 64,32,32 --guidance 1,0,0 --aug_level 0,0.1,0.1

  base  8 frames of 16x16 (every 2nd data frame, 2x2 pixel means), from text; temporal
        attention at 8x8 and 4x4, temporal convolutions at 16x16 (configs/video/moving_digits)
  tsr   16 frames of 16x16 from the base's 8 (known frames at 0, 2, 4, ..., each repeated once)
  ssr   16 frames of 32x32 from 16 frames of 16x16 (bilinear)
The SR stages mix frames by temporal convolutions only, as Imagen Video's SR stages do
(sec. 2.3), with text cross-attention at the lowest level; the SSR stage also has spatial
self-attention there (the paper's first SSR stages do). Each SR input is noise-augmented,
t_aug ~ U[0, 0.5) in training (model.max_aug_level), model.sample_aug_level at sampling.

Args: base, tsr, ssr; each with _runlocal (base_runlocal, ...): a tiny net and 4 steps.
"""

from configs.video import moving_digits
from configs.video.common import stage_config

DATA = "moving_digits:16x32x32"
DIGIT_SCALE = 2
STAGES = ("base", "tsr", "ssr")


def _sr_stage(*, num_frames: int, resolution: int, lowres_size: int = 0,
              lowres_frames: int = 0):
  c = stage_config(num_frames=num_frames, resolution=resolution, unet_preset="tiny_video",
                   text_dim=32, lowres_size=lowres_size, lowres_frames=lowres_frames)
  sizes = (resolution, resolution // 2, resolution // 4)
  c.model.unet_overrides.update(dict(
      ch=16, ch_mult=(1, 2, 2), num_res_blocks=(1, 1, 1),
      attn_resolutions=sizes[2:] if lowres_size else (), cross_attn_resolutions=sizes[2:],
      temporal_attn_resolutions=(), temporal_conv_resolutions=sizes, num_heads=4))
  c.data.video_options.update(dict(videos_per_digit=4))
  # Sized for this CPU as the base is (README "Video"): a conditioned stage learns fast, so
  # small batches at a raised lr; the 32x32 SSR stage is the slowest per clip.
  c.optim.update(dict(lr=2e-3, warmup_steps=50, decay="cosine", ema_decay=0.995,
                      weight_decay=0.0))
  # TSR: 1600 steps (800 left its in-between frames jittering across the motion: axis
  # accuracy 0.57 against 0.91 at 1600, README); SSR: 1600 steps at batch 8 (800 left a
  # speckled background: FD 6.5 against 4.8).
  batch, steps = (8 if lowres_size else 16), 1600
  c.train.update(dict(batch_size=batch, num_steps=steps, log_every=50, eval_every=0,
                      sample_every=steps // 2, checkpoint_every=steps // 4))
  c.eval.update(dict(num_samples=16, sample_steps=32, guidance_w=0.0))
  return c


def get_config(arg=None):
  stage, _, local = (arg or "").partition("_")
  if stage not in STAGES or local not in ("", "runlocal"):
    raise ValueError(f"unknown arg {arg!r}: use one of {STAGES}, optionally with _runlocal "
                     "(e.g. tsr_runlocal)")
  if stage == "base":
    c = moving_digits.get_config(local or None)
  elif stage == "tsr":
    c = _sr_stage(num_frames=16, resolution=16, lowres_frames=8)
  else:
    c = _sr_stage(num_frames=16, resolution=32, lowres_size=16)
  c.data.name = DATA
  c.data.video_options.digit_scale = DIGIT_SCALE
  if local and stage != "base":
    res = c.model.resolution
    c.model.unet_overrides.update(dict(
        ch=8, ch_mult=(1, 2), num_res_blocks=(1, 1), attn_resolutions=(),
        cross_attn_resolutions=(res // 2,), temporal_conv_resolutions=(res, res // 2),
        num_heads=2))
    c.data.video_options.videos_per_digit = 1
    c.train.update(dict(batch_size=8, num_steps=4, log_every=2, sample_every=4,
                        checkpoint_every=2))
    c.eval.update(dict(num_samples=4, sample_steps=4))
  return c
