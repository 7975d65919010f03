r"""Video measures of a trained moving-digits video stage, swept over the guidance weight.

  python -m launch.evaluate_video --workdir runs/video --guidance 0,1,3 \
      [--num 297] [--steps 64] [--sampler ddim] [--seed 0] [--gif_dir DIR]
      [--extend_to 16 --w_r 0,2 [--num_known 4]]

The prompts are the captions of the first --num clips of the stage's eval split (the test
digits, "the digit 3 moving left" in its several phrasings), one sampled clip per caption at
each weight w. Scored by evaluation/video.py: alignment (share of frames classified as the
prompt's digit), direction accuracy (the centre-of-mass track moves the way the prompt
says), identity consistency (frames agree on the digit) and FD, the Frechet distance to the
same number of real eval clips in the digits classifier's features plus motion features
(not FVD). The real clips' own measures are the first row (guidance_w null): what a perfect
sampler approaches. Rows are printed as JSON and appended to WORKDIR/video_eval.jsonl;
--gif_dir writes the first 16 clips of each weight as GIF.

--extend_to N also continues each weight's clips to N frames by reconstruction guidance
(launch.sample_video --extend_to) at each --w_r (0 is the replacement method) and scores the
longer clips: alignment, direction and consistency over all N frames (no FD: the real clips
are shorter). Ho et al. (sec. 3.1) report that replacement loses coherence with the given
frames; here that shows as lower consistency and direction accuracy.
"""

import json

import numpy as np
from absl import flags

from evaluation import video as video_eval
from imagen import video_experiment
from launch import cascade, distributed, families, fs, metric_writer, videos
from launch import checkpoint as checkpoint_lib
from launch import config_flags
from vdm import losses

_WORKDIR = flags.DEFINE_string("workdir", None, "A video stage's training workdir.",
                               required=True)
_GUIDANCE = flags.DEFINE_list("guidance", ["0", "1", "3"], "Guidance weights to sweep.")
_NUM = flags.DEFINE_integer("num", 297, "Clips per weight (the first captions of the eval "
                            "split; 297 = the whole moving-digits test split).")
_STEPS = flags.DEFINE_integer("steps", 64, "Sampling steps.")
_SAMPLER = flags.DEFINE_enum("sampler", "ddim", ["ddim", "ancestral"], "Sampler.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_GIF_DIR = flags.DEFINE_string("gif_dir", None, "Write the first 16 clips per weight here.")
_EXTEND_TO = flags.DEFINE_integer("extend_to", 0, "Also extend the clips to this many frames.")
_W_R = flags.DEFINE_list("w_r", ["0", "2"], "Reconstruction guidance weights of the extension.")
_NUM_KNOWN = flags.DEFINE_integer("num_known", None, "Frames each extension window is "
                                  "conditioned on (default: half the clip length).")
flags.register_validator("num", lambda n: n >= 2, "--num is the number of clips per weight; "
                         "a Frechet distance needs at least 2: pass e.g. --num 297.")


def eval_clips(workdir: str, num: int):
  """(captions, integer clips [N, F, H, W, C], num_levels) of the first `num` examples of
  the stage's eval split, at the stage's frame count and resolution."""
  config = cascade.video_stage_config(workdir, "launch.evaluate_video")
  source = families.get_family("video").get_source(config, config.data.eval_split)
  examples = [source[i] for i in range(min(num, len(source)))]
  clips = np.stack([e["video"] for e in examples]).astype(np.int32)
  m = config.model
  clips = clips[:, ::clips.shape[1] // m.num_frames]
  height, width = video_experiment.frame_size(m)
  if tuple(clips.shape[2:4]) != (height, width):
    raise config_flags.InputError(f"the stage samples {height}x{width} frames but its data "
                                  f"has {clips.shape[2]}x{clips.shape[3]}: the measures need "
                                  "clips at the data's size")
  return [e["caption"] for e in examples], clips, source.num_levels


def main(argv):
  del argv
  metric_writer.setup_logging()
  try:
    weights = [float(w) for w in _GUIDANCE.value]
  except ValueError:
    raise config_flags.InputError(f"--guidance takes numbers, got {_GUIDANCE.value}") from None
  checkpoint_lib.require_checkpoint(_WORKDIR.value)
  distributed.initialize()
  prompts, real, levels = eval_clips(_WORKDIR.value, _NUM.value)
  rows = [{"guidance_w": None, "num_videos": len(real),
           **video_eval.video_report(real, prompts, num_levels=levels)}]
  print(json.dumps(rows[0]))
  for w in weights:
    result = cascade.run_cascade([_WORKDIR.value], prompts, num_per_prompt=1,
                                 steps=[_STEPS.value], guidance=[w], samplers_=[_SAMPLER.value],
                                 aug_levels=[0.0], threshold="dynamic", seed=_SEED.value)
    clips = np.asarray(losses.x_to_int(result.images[-1], levels))
    # FD against the real clips of the same captions: equal N, the same for every weight.
    row = {"guidance_w": w, "num_videos": len(clips), "steps": _STEPS.value,
           "sample_seconds": result.sample_seconds[-1],
           **video_eval.video_report(clips, prompts, reference=real, num_levels=levels)}
    print(json.dumps(row))
    rows.append(row)
    for w_r in ([float(v) for v in _W_R.value] if _EXTEND_TO.value else []):
      longer = cascade.extend_clips(
          result, result.images[-1], total_frames=_EXTEND_TO.value,
          num_known=_NUM_KNOWN.value or clips.shape[1] // 2, num_steps=_STEPS.value,
          guidance_w=w, w_r=w_r, sampler=_SAMPLER.value, threshold="dynamic",
          seed=_SEED.value + 1)
      longer = np.asarray(losses.x_to_int(longer, levels))
      row = {"guidance_w": w, "extend_to": _EXTEND_TO.value, "w_r": w_r,
             **video_eval.video_report(longer, prompts, num_levels=levels)}
      print(json.dumps(row))
      rows.append(row)
    if _GIF_DIR.value and distributed.is_main_process():
      videos.write_gif(fs.join(_GIF_DIR.value, f"samples_w{w:g}.gif"), clips[:16], levels,
                       columns=4)
  if distributed.is_main_process():
    for row in rows:
      fs.append_line(fs.join(_WORKDIR.value, "video_eval.jsonl"), json.dumps(row))


def run():
  config_flags.run_main(main, checkpoint_lib.CheckpointError)


if __name__ == "__main__":
  run()
