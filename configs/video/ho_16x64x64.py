r"""Ho et al. 2022 ("Video Diffusion Models"), text-to-video: 16 frames of 64x64 from T5 text.

  python -m launch.train --config configs/video/ho_16x64x64.py \
      --config.data.name=video_jsonl:/data/videos/{split}.jsonl --workdir gs://bucket/ho16
  python -m launch.train --config configs/video/ho_16x64x64.py:large ...
  python -m launch.train --config configs/video/ho_16x64x64.py:runlocal --workdir /tmp/smoke
  python -m launch.aot --config configs/video/ho_16x64x64.py --topology v5p:2x2x2

The paper's small (ho_small_16x64x64, base channels 128) or large (ho_large_16x64x64, 256)
space-time U-Net of appendix A on 16-frame clips at 64x64, frame stride 1, conditioned on
text, with joint image-video training (sec. 3.2; their Table 4 adds 0, 4 or 8 independent
images to each 16-frame clip; our image examples are whole examples, a third of the batch
here, so the share of image frames is that of 8 images per clip, 8 / 24). Text: T5-XXL embeddings (4096-d; the paper used BERT-large
embeddings, appendix A) through Imagen's conditioning; encode them once with
`python -m launch.encode_text` and pass --config.data.text_cache=DIR. Data: any folder of
video files with a JSONL of captions (video_jsonl:, launch/data/video_files.py) or a tfds
video dataset (tfds_video:NAME), decoded at 64x64.

What the paper gives and what we chose: the architecture (appendix A); v-parameterization
and cosine schedule as in Imagen (the paper predicts eps with the cosine schedule of
Nichol & Dhariwal; v is what Imagen Video, its successor, used); the optimizer and batch are
ours (Adam, lr 3e-4, batch 128, EMA 0.9999): their text-to-video run's values are not
listed in the paper.

arg "runlocal": the same shape of stage on the embedded moving digits with a tiny net.
"""

from configs.video import moving_digits
from configs.video.common import stage_config


def get_config(arg=None):
  if arg == "runlocal":
    return moving_digits.get_config("runlocal")
  if arg not in (None, "small", "large"):
    raise ValueError(f"unknown arg {arg!r}: use small (default), large or runlocal")
  size = arg or "small"
  c = stage_config(num_frames=16, resolution=64, unet_preset=f"ho_{size}_16x64x64",
                   text_dim=4096)
  c.data.update(dict(name="video_jsonl:/path/to/videos/{split}.jsonl", train_split="train",
                     eval_split="val", t5="hf:/models/t5-v1_1-xxl", max_length=128,
                     worker_count=8))
  c.data.video_options.update(dict(num_frames=16, frame_stride=1, frame_size=64))
  c.model.joint_image_fraction = 1 / 3
  c.optim.update(dict(lr=3e-4, warmup_steps=10_000, decay="constant", b2=0.999,
                      weight_decay=0.0, grad_clip=1.0, ema_decay=0.9999))
  c.train.update(dict(batch_size=128, num_steps=500_000, compute_dtype="bfloat16",
                      log_every=100, eval_every=0, sample_every=10_000,
                      checkpoint_every=5_000))
  c.eval.update(dict(num_samples=16, sample_steps=256, guidance_w=3.0))
  c.mesh.update(dict(ici=(1, -1, 1), rules="fsdp"))
  return c
