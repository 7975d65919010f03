r"""Imagen Video (Ho et al. 2022b, "Imagen Video: High Definition Video Generation with
Diffusion Models"): the 7-stage text-to-video cascade, one arg per stage.

  python -m launch.train --config configs/video/imagen_video.py:base \
      --config.data.name=video_jsonl:/data/videos/{split}.jsonl \
      --config.data.text_cache=gs://bucket/t5xxl_cache --workdir gs://bucket/iv_base
  ... :tsr1, :ssr1, :ssr2, :tsr2, :tsr3, :ssr3 (each its own workdir, same data)
  python -m launch.sample_cascade --stages W_base,W_tsr1,W_ssr1,W_ssr2,W_tsr2,W_tsr3,W_ssr3 \
      --prompts "..." --aug_level 0,0.33 (GIF + MP4 + PNG filmstrip per stage)
  python -m launch.train --config configs/video/imagen_video.py:tsr1_runlocal --workdir /tmp/x

The cascade (sec. 2.2, figure 6), frames x width x height at a frame rate:
  stage  output            input                      temporal layers   spatial attention
  base   16 x 40x24  3 fps   text                     attention         self + text, 12/6/3
  tsr1   32 x 40x24  6 fps   16 frames (TSR 2x)       convolution       text at 3
  ssr1   32 x 80x48  6 fps   40x24 (SSR 2x)           convolution       self + text at 6
  ssr2   32 x 320x192 6 fps  80x48 (SSR 4x)           convolution       self + text at 24
  tsr2   64 x 320x192 12 fps 32 frames (TSR 2x)       convolution       text at 24
  tsr3  128 x 320x192 24 fps 64 frames (TSR 2x)       convolution       text at 24
  ssr3  128 x 1280x768 24 fps 320x192 (SSR 4x)        convolution       text at 96 (24 in its 192x320 training crops)
(spatial attention sizes are frame heights: the levels of a 24-high frame are 24, 12, 6, 3).
What the paper says (sec. 2.3): the base model uses temporal attention, the SR models
temporal convolutions ("for memory efficiency ... instead of attention"); "the base model and
the first two SSR models have spatial attention in addition to spatial convolutions", and the
models at the highest resolution are fully convolutional (ssr3, which the paper trains on
random crops: here 192x320 crops of its 768x1280 frames, the matching 48x80 crops of its
input, the same window in all 128 frames; it samples whole frames). Every model: v-parameterization
(sec. 2.4), noise conditioning augmentation of its input (sec. 2.5; sampled at a fixed SNR
"such as 3 or 5": t_aug = 1/3 is SNR 3 on the cosine schedule), classifier-free guidance
(sec. 2.6), T5-XXL text (4096-d, frozen; encode once with `python -m launch.encode_text`).
SR inputs: bilinear frames (SSR), known frames at their times with the others repeating the
previous known frame (TSR; the paper: "by repeating frames or by filling in blank frames",
model.tsr_fill=blank for the other), imagen/video_sr.py. Text cross-attention at the lowest
level of the stages without spatial self-attention follows Imagen's 256->1024 model
(figure A.31), since the paper gives no layer-level detail.

Widths: the paper gives 11.6B diffusion-model parameters in all and no per-model split. Ours:
the base in Imagen's base layout (multipliers 1, 2, 3, 4, 3 blocks per level) at width 1024,
5.81B; every SR stage in Imagen's SR layout (1, 2, 4, 8; 2, 4, 8, 8 blocks) at width 176,
0.98-1.00B each (tests/test_video_cascade.py counts them with nnx.eval_shape):
  base 5.810B, tsr1 0.980B, ssr1 0.996B, ssr2 0.996B, tsr2 0.980B, tsr3 0.980B,
  ssr3 0.980B: total 11.72B (paper: 11.6B).

Data: clips of 128 frames at 24 fps, 1280x768 (5.3 s); each stage takes every k-th frame
and area-downsamples (the base: every 8th frame, 32x32 pixel means). `video_jsonl` crops
frames square when given a frame_size, so store the videos at 1280x768 and leave
video_options.frame_size unset. Optimizer and batch are ours (the paper gives none): Adam,
lr 1e-4, 10k warmup, batch 256, EMA 0.9999.

Args: base, tsr1, ssr1, ssr2, tsr2, tsr3, ssr3; each with _runlocal, which runs that kind of
stage (base, TSR or SSR) of configs/video/digits_cascade.py on the moving digits.
"""

from configs.video import digits_cascade
from configs.video.common import stage_config

T5_XXL_DIM = 4096
# name: (frames, (H, W), fps, lowres_frames, lowres_size)
STAGES = {
    "base": (16, (24, 40), 3, 0, 0),
    "tsr1": (32, (24, 40), 6, 16, 0),
    "ssr1": (32, (48, 80), 6, 0, 24),
    "ssr2": (32, (192, 320), 6, 0, 48),
    "tsr2": (64, (192, 320), 12, 32, 0),
    "tsr3": (128, (192, 320), 24, 64, 0),
    "ssr3": (128, (768, 1280), 24, 0, 192),
}
SPATIAL_ATTENTION = ("base", "ssr1", "ssr2")   # sec. 2.3
# Stages trained on random crops, (H, W) in their own pixels (a quarter of each side, as
# Imagen trains its 256 -> 1024 stage on 256 x 256 crops; the paper gives no size).
CROPS = {"ssr3": (192, 320)}
PAPER_TOTAL_PARAMS = 11.6e9


def _unet(name: str, height: int) -> dict:
  """The Video U-Net of a stage (imagen.video_unet.VideoUNet kwargs over tiny_video)."""
  if name == "base":
    sizes = (height, height // 2, height // 4, height // 8)
    return dict(channels=3, ch=1024, ch_mult=(1, 2, 3, 4), num_res_blocks=(3, 3, 3, 3),
                attn_resolutions=sizes[1:], cross_attn_resolutions=sizes[1:],
                temporal_attn_resolutions=sizes, temporal_conv_resolutions=(),
                head_dim=64, num_heads=8, emb_ch=None, fps_cond=False)
  sizes = (height, height // 2, height // 4, height // 8)
  return dict(channels=3, ch=176, ch_mult=(1, 2, 4, 8), num_res_blocks=(2, 4, 8, 8),
              attn_resolutions=sizes[3:] if name in SPATIAL_ATTENTION else (),
              cross_attn_resolutions=sizes[3:], temporal_attn_resolutions=(),
              temporal_conv_resolutions=sizes, head_dim=64, num_heads=8, emb_ch=None,
              fps_cond=False)


def get_config(arg=None):
  name, _, local = (arg or "base").partition("_")
  if name not in STAGES or local not in ("", "runlocal"):
    raise ValueError(f"unknown arg {arg!r}: use one of {tuple(STAGES)}, optionally with "
                     "_runlocal (e.g. ssr2_runlocal)")
  if local:
    return digits_cascade.get_config(f"{name[:3]}_runlocal")
  frames, (height, width), fps, lowres_frames, lowres_size = STAGES[name]
  c = stage_config(num_frames=frames, resolution=(height, width), unet_preset="tiny_video",
                   text_dim=T5_XXL_DIM, lowres_size=lowres_size, lowres_frames=lowres_frames)
  crop = CROPS.get(name, ())
  # Level sizes are named at the training size (the crop's), as for Imagen's crop stage.
  c.model.unet_overrides.update(_unet(name, crop[0] if crop else height))
  c.model.crop_size = crop
  c.model.fps = float(fps)           # documentation of the stage's rate; fps_cond is off
  c.model.sample_aug_level = 1 / 3 if name != "base" else 0.0
  c.data.update(dict(name="video_jsonl:/path/to/videos/{split}.jsonl", train_split="train",
                     eval_split="val", t5="hf:/models/t5-v1_1-xxl", max_length=128,
                     worker_count=8))
  c.data.video_options.update(dict(num_frames=128, frame_stride=1))
  c.optim.update(dict(lr=1e-4, warmup_steps=10_000, decay="constant", b2=0.999,
                      weight_decay=0.0, grad_clip=1.0, ema_decay=0.9999))
  c.train.update(dict(batch_size=256, num_steps=1_000_000, compute_dtype="bfloat16",
                      log_every=100, eval_every=0, sample_every=10_000,
                      checkpoint_every=5_000))
  c.eval.update(dict(num_samples=8, sample_steps=256, guidance_w=6.0 if name == "base"
                     else 0.0))
  c.mesh.update(dict(ici=(1, -1, 1), rules="fsdp"))
  return c
