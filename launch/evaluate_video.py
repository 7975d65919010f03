r"""Video measures of a trained moving-digits video stage or cascade, swept over guidance.

  python -m launch.evaluate_video --workdir runs/video --guidance 0,1,3 \
      [--num 297] [--steps 64] [--sampler ddim] [--seed 0] [--gif_dir DIR]
      [--extend_to 16 --w_r 0,2 [--num_known 4]]
  python -m launch.evaluate_video --stages runs/vbase,runs/vtsr,runs/vssr --guidance 0,1,3 \
      [--steps 32,32,32] [--aug_level 0,0.1,0.1] [--aug_sweep 0,0.1,0.2,0.4]

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

--stages scores a cascade (launch.cascade.run_cascade, guidance w on the base stage, the SR
stages unguided, each SR input augmented to --aug_level or to each level of --aug_sweep):
every stage's output is measured, the prompts and the real clips coming from the LAST
stage's eval split, as the data holds them (a cascade may end below the data's size). A
stage with fewer frames is compared with the real clips at its frame times (every k-th data
frame, as the stages subsample), and a smaller stage is enlarged to the data's size by pixel
repetition first, since the digits classifier reads digits at the data's scale (as
launch.evaluate_cascade scores the image base stage). Columns are
prefixed stage0_, stage1_, ...; rows are appended to the last stage's video_eval.jsonl.
"""

import json

import numpy as np
from absl import flags

from evaluation import video as video_eval
from imagen import video_experiment
from launch import cascade, distributed, families, fs, metric_writer, videos
from launch import checkpoint as checkpoint_lib
from launch import config_flags
from vdm import losses, samplers

_WORKDIR = flags.DEFINE_string("workdir", None, "A video stage's training workdir.")
_STAGES = flags.DEFINE_list("stages", None, "Or a video cascade: stage workdirs, base first.")
_AUG = flags.DEFINE_list("aug_level", ["0.0"], "--stages: SR augmentation level per stage.")
_AUG_SWEEP = flags.DEFINE_list("aug_sweep", None, "--stages: sweep every SR stage's "
                               "augmentation level over these values (overrides --aug_level).")
_GUIDANCE = flags.DEFINE_list("guidance", ["0", "1", "3"], "Guidance weights to sweep.")
_NUM = flags.DEFINE_integer("num", 297, "Clips per weight (the first captions of the eval "
                            "split; 297 = the whole moving-digits test split).")
_STEPS = flags.DEFINE_list("steps", ["64"], "Sampling steps (--stages: one per stage, or one "
                           "for all).")
_SAMPLER = flags.DEFINE_enum("sampler", "ddim", samplers.SAMPLERS, "Sampler.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_GIF_DIR = flags.DEFINE_string("gif_dir", None, "Write the first 16 clips per weight here.")
_EXTEND_TO = flags.DEFINE_integer("extend_to", 0, "Also extend the clips to this many frames.")
_W_R = flags.DEFINE_list("w_r", ["0", "2"], "Reconstruction guidance weights of the extension.")
_NUM_KNOWN = flags.DEFINE_integer("num_known", None, "Frames each extension window is "
                                  "conditioned on (default: half the clip length).")
flags.register_validator("stages", lambda s: s is None or len(s) >= 1,
                         "--stages lists stage workdirs, base first.")
flags.mark_flags_as_mutual_exclusive(["workdir", "stages"], required=True)
flags.register_validator("num", lambda n: n >= 2, "--num is the number of clips per weight; "
                         "a Frechet distance needs at least 2: pass e.g. --num 297.")
flags.register_multi_flags_validator(
    ["extend_to", "sampler"],
    lambda f: not f["extend_to"] or f["sampler"] in samplers.STEP_SAMPLERS,
    f"--extend_to extends clips by reconstruction guidance, which steps with "
    f"{samplers.STEP_SAMPLERS}: pass --sampler ddim or ancestral")


def eval_clips(workdir: str, num: int, *, at_stage: bool = True):
  """(captions, integer clips [N, F, H, W, C], measure options {num_levels, digit_scale} for
  evaluation.video.video_report) of the first `num` examples of
  the stage's eval split: at the stage's frame count and size (`at_stage`; then they must
  match the data's size), else as the data holds them (a cascade's stages are compared with
  them at their own frame times by evaluation.video.at_reference_scale)."""
  config = cascade.video_stage_config(workdir, "launch.evaluate_video")
  source = families.get_family("video").get_source(config, config.data.eval_split)
  examples = [source[i] for i in range(min(num, len(source)))]
  clips = np.stack([e["video"] for e in examples]).astype(np.int32)
  scale = dict(num_levels=source.num_levels, digit_scale=getattr(source, "digit_scale", 1))
  if not at_stage:
    return [e["caption"] for e in examples], clips, scale
  m = config.model
  clips = clips[:, ::clips.shape[1] // m.num_frames]
  height, width = video_experiment.frame_size(m)
  if tuple(clips.shape[2:4]) != (height, width):
    raise config_flags.InputError(f"the stage samples {height}x{width} frames but its data "
                                  f"has {clips.shape[2]}x{clips.shape[3]}: the measures need "
                                  "clips at the data's size; score a cascade ending at the "
                                  "data's size with --stages")
  return [e["caption"] for e in examples], clips, scale


def _numbers(values, flag, cast=float):
  try:
    return [cast(v) for v in values]
  except ValueError:
    raise config_flags.InputError(f"--{flag} takes numbers, got {values}") from None


def evaluate_stage(workdir: str, weights, num_steps: int) -> list[dict]:
  """The rows of one stage: the real clips, then each weight (and its extensions)."""
  prompts, real, scale = eval_clips(workdir, _NUM.value)
  levels = scale["num_levels"]
  rows = [{"guidance_w": None, "num_videos": len(real),
           **video_eval.video_report(real, prompts, **scale)}]
  print(json.dumps(rows[0]))
  for w in weights:
    result = cascade.run_cascade([workdir], prompts, num_per_prompt=1,
                                 steps=[num_steps], guidance=[w], samplers_=[_SAMPLER.value],
                                 aug_levels=[0.0], threshold="dynamic", seed=_SEED.value)
    clips = np.asarray(losses.x_to_int(result.images[-1], levels))
    # FD against the real clips of the same captions: equal N, the same for every weight.
    row = {"guidance_w": w, "num_videos": len(clips), "steps": num_steps,
           "sample_seconds": result.sample_seconds[-1],
           **video_eval.video_report(clips, prompts, reference=real, **scale)}
    print(json.dumps(row))
    rows.append(row)
    for w_r in ([float(v) for v in _W_R.value] if _EXTEND_TO.value else []):
      longer = cascade.extend_clips(
          result, result.images[-1], total_frames=_EXTEND_TO.value,
          num_known=_NUM_KNOWN.value or clips.shape[1] // 2, num_steps=num_steps,
          guidance_w=w, w_r=w_r, sampler=_SAMPLER.value, threshold="dynamic",
          seed=_SEED.value + 1)
      longer = np.asarray(losses.x_to_int(longer, levels))
      row = {"guidance_w": w, "extend_to": _EXTEND_TO.value, "w_r": w_r,
             **video_eval.video_report(longer, prompts, **scale)}
      print(json.dumps(row))
      rows.append(row)
    _write_gif(clips, levels, f"samples_w{w:g}.gif")
  return rows


def evaluate_stages(stages, weights, steps, aug_settings) -> list[dict]:
  """The rows of a cascade: per weight and SR augmentation setting, every stage's measures."""
  prompts, real, scale = eval_clips(stages[-1], _NUM.value, at_stage=False)
  levels = scale["num_levels"]
  n = len(stages)
  rows = [{"guidance_w": None, "num_videos": len(real),   # the data: what a cascade approaches
           **video_eval.video_report(real, prompts, **scale)}]
  print(json.dumps(rows[0]))
  for w, aug_levels in [(v, a) for v in weights for a in aug_settings]:
    result = cascade.run_cascade(stages, prompts, num_per_prompt=1, steps=steps,
                                 guidance=[w] + [0.0] * (n - 1), samplers_=[_SAMPLER.value] * n,
                                 aug_levels=aug_levels, threshold="dynamic", seed=_SEED.value)
    row = {"guidance_w": w, "aug_levels": aug_levels, "steps": steps,
           "num_videos": len(prompts), "sample_seconds": result.sample_seconds}
    for i, x in enumerate(result.images):
      try:
        clips, reference = video_eval.at_reference_scale(np.asarray(losses.x_to_int(x, levels)),
                                                         real)
      except ValueError as e:
        raise config_flags.InputError(f"{e}: --stages must be one cascade (base first) over "
                                      "the same data") from None
      report = video_eval.video_report(clips, prompts, reference=reference, **scale)
      row.update({f"stage{i}_{k}": v for k, v in report.items()})
    print(json.dumps(row))
    rows.append(row)
    _write_gif(np.asarray(losses.x_to_int(result.images[-1], levels)), levels,
               f"cascade_w{w:g}_aug{aug_levels[-1]:g}.gif")
  return rows


def _write_gif(clips, levels, name):
  if _GIF_DIR.value and distributed.is_main_process():
    videos.write_gif(fs.join(_GIF_DIR.value, name), clips[:16], levels, columns=4)


def main(argv):
  del argv
  metric_writer.setup_logging()
  weights = _numbers(_GUIDANCE.value, "guidance")
  stages = _STAGES.value or [_WORKDIR.value]
  try:
    steps = cascade.per_stage(_STEPS.value, len(stages), "steps", int)
    aug_settings = ([[0.0] + [float(a)] * (len(stages) - 1) for a in _AUG_SWEEP.value]
                    if _AUG_SWEEP.value else
                    [cascade.per_stage(_AUG.value, len(stages), "aug_level", float)])
  except ValueError as e:
    raise config_flags.InputError(
        f"{e}. --steps takes whole numbers, --aug_level and --aug_sweep numbers; per-stage "
        "flags take one value per stage or one for all.") from None
  for stage in stages:
    checkpoint_lib.require_checkpoint(stage, flag="--stages entry" if _STAGES.value else
                                      "--workdir")
  distributed.initialize()
  if _STAGES.value:
    if _EXTEND_TO.value:
      raise config_flags.InputError("--extend_to extends one stage's clips: use it with "
                                    "--workdir, not --stages")
    rows = evaluate_stages(stages, weights, steps, aug_settings)
  else:
    rows = evaluate_stage(stages[0], weights, steps[0])
  if distributed.is_main_process():
    for row in rows:
      fs.append_line(fs.join(stages[-1], "video_eval.jsonl"), json.dumps(row))


def run():
  config_flags.run_main(main, checkpoint_lib.CheckpointError)


if __name__ == "__main__":
  run()
