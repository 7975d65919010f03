"""The distillation pipeline behind `python -m launch.distill`: the stage plan, each stage's
training config, the student's start from its teacher, per-stage summaries, and the loop
that runs (or resumes) the stages. See launch/distill.py for the command and the layout of
its workdir.
"""

import json
import time

import jax
import numpy as np
from absl import logging
from flax import nnx

from distill import experiment
from evaluation import digits_classifier, inception
from evaluation import video as video_eval
from launch import checkpoint as checkpoint_lib
from launch import cascade, config_flags, distributed, families, fs, images, trainer
from launch import setup as setup_lib
from launch import workdir as workdir_lib
from launch.families import distill as distill_family


# --------------------------------------------------------------------------------- stages


def plan(d) -> list[dict]:
  """The stages: [guided stage one] + halvings start_steps / 2 ... end_steps."""
  start, end = int(d.start_steps), int(d.end_steps)
  if end < 1 or start <= end or start % end or (start // end) & (start // end - 1):
    raise ValueError(f"distill.start_steps={start} must be end_steps={end} times a power of "
                     "two greater than 1 (each stage halves the number of steps)")
  stages = [{"name": "guided", "kind": "guided", "steps": start}] if d.guided else []
  n = start // 2
  while n >= end:
    stages.append({"name": f"n{n}", "kind": "progressive", "steps": n})
    n //= 2
  for k, stage in enumerate(stages):
    stage["dir"] = f"stage{k:02d}_{stage['name']}"
  return stages


def stage_config(teacher_config, dcfg, stage: dict, teacher_dir: str, original_teacher: str):
  """The training config of one stage: the teacher's model and data, the pipeline's
  optimizer and loop settings, and the `distill` section the family reads."""
  c = config_flags.config_from_json(config_flags.config_to_json(teacher_config)).unlock()
  base_family = c.family if c.family != "distill" else c.distill.base_family
  d = dcfg.distill
  # A guided pipeline's students take w; so does every teacher after stage one.
  teacher_w = bool(c.model.get("guidance_embedding", False)) or (
      d.guided and teacher_dir != original_teacher)
  c.family = "distill"
  c.seed = dcfg.seed
  c.optim = dcfg.optim
  for key, value in dcfg.train.items():
    c.train[key] = value
  c.train.update(dict(num_steps=d.guided_train_steps if stage["kind"] == "guided"
                      else d.train_steps, eval_every=0, sample_every=0))
  c.eval.sample_steps = stage["steps"]
  c.model.guidance_embedding = teacher_w or d.guided
  if base_family in distill_family.TEXT_FAMILIES and not c.data.text_cache:
    c.data.text_cache = fs.join(original_teacher, "text_cache")  # encoded once
  c.distill = dict(
      kind=stage["kind"], base_family=base_family, teacher=teacher_dir,
      teacher_step=d.teacher_step if teacher_dir == original_teacher else 0,
      teacher_guidance_embedding=teacher_w, student_steps=stage["steps"],
      weighting=d.weighting, clip=d.clip, target_clip=d.target_clip,
      allow_eps_teacher=d.allow_eps_teacher, sampler=d.sampler, w_min=d.w_min, w_max=d.w_max,
      sample_w=d.sample_w)
  return c


def seed_student(config, workdir: str, devices=None):
  """Writes step 0 of a stage: params (and EMA) copied from the teacher; parameters the
  teacher lacks (a new guidance-weight embedding, zero-initialised) keep their init."""
  setup = setup_lib.build(config, devices, workdir=workdir)
  state = setup.init()
  teacher, _ = workdir_lib.load_ema_model(config.distill.teacher,
                                          config.distill.teacher_step or None)
  from_teacher = nnx.state(teacher, nnx.Param).to_pure_dict()

  def copy(student, source, path=""):
    out = {}
    for key, value in student.items():
      if isinstance(value, dict):
        out[key] = copy(value, source.get(key, {}), f"{path}/{key}")
      elif key in source:
        if np.shape(source[key]) != np.shape(value):
          raise ValueError(f"teacher parameter {path}/{key} has shape {np.shape(source[key])}, "
                           f"the student's {np.shape(value)}: not the same architecture")
        out[key] = source[key]
      else:
        out[key] = value
    return out

  params = state["params"]
  nnx.replace_by_pure_dict(params, copy(params.to_pure_dict(), from_teacher))
  state = dict(state, params=params, ema=jax.tree.map(lambda a: a, params))
  state = jax.device_put(state, setup.state_shardings)
  ckpt = checkpoint_lib.Checkpointer(workdir, save_every=1, keep=config.train.keep_checkpoints)
  ckpt.save(0, state, config=config, force=True)
  ckpt.close()


# ------------------------------------------------------------------------------- summaries


def _conditional(config) -> bool:
  base = cascade.stage_family(config)
  return base in distill_family.TEXT_FAMILIES or bool(config.model.get("num_classes"))


def sample_quality(setup, params, num: int, num_steps: int, seed: int, fid_weights: str = ""):
  """(integer samples, report). Digits: FD in the small classifier's features, and class
  accuracy for conditional models. Moving digits (video stages): the video measures of
  evaluation/video.py. Other data: FID against the first `num` images of the eval split
  when `fid_weights` (evaluation/inception.py's Inception file) is given, else {}."""
  samples = workdir_lib.sample_images(setup, params, jax.random.key(seed), num=num,
                                      num_steps=num_steps)
  config = setup.config
  levels = setup.source.num_levels
  if samples.ndim == 5:
    return samples, video_quality(config, samples, levels)
  if config.data.name != "digits":
    if not fid_weights:
      return samples, {}
    source = setup_lib.data_source(config, config.data.eval_split, setup.workdir)
    real = np.stack([np.asarray(source[i]["image"]) for i in range(len(samples))])
    return samples, {"fid": inception.fid_from_images(images.to_uint8(samples, levels),
                                                      images.to_uint8(real, levels),
                                                      fid_weights)}
  labels = None
  if _conditional(config):
    source = setup_lib.data_source(config, config.data.eval_split, setup.workdir)
    labels = np.array([int(source[i]["label"]) for i in range(len(samples))])
  ints = digits_classifier.upsample_to_digits(samples)
  return samples, digits_classifier.digits_report(ints, labels, num_levels=levels)


def video_quality(config, clips: np.ndarray, levels: int) -> dict:
  """Alignment, direction accuracy, consistency and FD of clips sampled for the first
  len(clips) captions of the eval split (as workdir_lib.sample_images draws them), against
  those real clips at the clips' frame times and scale; {} for data other than the moving
  digits, whose measures need the digits classifier."""
  if not config.data.name.startswith("moving_digits"):
    return {}
  source = families.get_family("video").get_source(config, config.data.eval_split)
  examples = [source[i] for i in range(len(clips))]
  real = np.stack([np.asarray(e["video"]) for e in examples]).astype(np.int32)
  big, real = video_eval.at_reference_scale(clips, real)
  return video_eval.video_report(big, [e["caption"] for e in examples], reference=real,
                                 num_levels=levels,
                                 digit_scale=getattr(source, "digit_scale", 1))


def teacher_quality(teacher_dir: str, num: int, num_steps: int, dcfg, cache: dict,
                    devices=None) -> dict:
  """The original teacher's sample quality with `num_steps` DDIM steps (guided at sample_w
  for a guided pipeline): the baseline a student must beat. `cache` keeps the restored
  teacher and each step count's report across calls."""
  if "teacher" not in cache:   # restored once per pipeline run
    overrides = {"eval.sampler": "ddim"}
    if dcfg.distill.guided:
      overrides["eval.guidance_w"] = dcfg.distill.sample_w
    setup, state, ckpt = workdir_lib.load_workdir(teacher_dir, dcfg.distill.teacher_step or None,
                                                  overrides, devices, with_frozen=False)
    ckpt.close()
    cache["teacher"] = (setup, state["ema"])
  if num_steps not in cache:
    setup, params = cache["teacher"]
    cache[num_steps] = sample_quality(setup, params, num, num_steps, dcfg.seed,
                                      dcfg.distill.fid_weights)[1]
  return cache[num_steps]


def summarize(stage: dict, workdir: str, dcfg, teacher_dir: str, cache: dict,
              train_seconds: float, devices=None) -> dict:
  setup, state, ckpt = workdir_lib.load_workdir(workdir, devices=devices, with_frozen=False)
  ckpt.close()
  num = int(dcfg.distill.eval_samples)
  start = time.perf_counter()
  samples, report = sample_quality(setup, state["ema"], num, stage["steps"], dcfg.seed,
                                   dcfg.distill.fid_weights)
  sample_seconds = time.perf_counter() - start
  png = fs.join(workdir, f"samples_{stage['steps']}steps.png")
  if distributed.is_main_process():
    workdir_lib.write_samples(setup, samples, png)   # a grid; clips: also GIF and MP4
  row = {"stage": stage["dir"], "kind": stage["kind"], "student_steps": stage["steps"],
         "train_steps": int(jax.device_get(state["step"])), "train_seconds": round(train_seconds, 1),
         "sample_seconds": round(sample_seconds, 2), "samples_png": png,
         "sampler": dcfg.distill.sampler}
  row.update({f"student_{k}": v for k, v in report.items()})
  if report:
    row.update({f"teacher_ddim_{k}": v for k, v in teacher_quality(
        teacher_dir, num, stage["steps"], dcfg, cache, devices).items()})
  return row


def table(rows) -> str:
  keys = ["stage", "student_steps", "student_fd", "teacher_ddim_fd", "student_fid",
          "teacher_ddim_fid", "student_accuracy", "teacher_ddim_accuracy",
          "student_alignment", "teacher_ddim_alignment", "student_direction_accuracy",
          "teacher_ddim_direction_accuracy", "train_seconds", "sample_seconds"]
  keys = [k for k in keys if any(k in r for r in rows)]
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  for r in rows:
    cells = [f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


# ------------------------------------------------------------------------------- pipeline


def run_pipeline(dcfg, teacher: str, workdir: str, devices=None) -> list[dict]:
  """Runs (or resumes) every stage; returns the per-stage summaries. devices: the mesh's
  devices (default all)."""
  if dcfg.distill.fid_weights:   # fail now, not after the first stage has trained
    inception.check_inception_file(dcfg.distill.fid_weights)
  teacher, workdir = fs.join(teacher), fs.join(workdir)   # absolute; gs:// kept
  teacher_ckpt = checkpoint_lib.Checkpointer(teacher, save_every=1, keep=1_000_000,
                                             read_only=True)
  if teacher_ckpt.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint in {teacher}/checkpoints: train the teacher first "
                            "(python -m launch.train --config ... --workdir TEACHER)")
  teacher_config = teacher_ckpt.restore_config(dcfg.distill.teacher_step or None)
  teacher_ckpt.close()
  if teacher_config.family == "distill":
    raise ValueError(f"{teacher} is a distillation stage; pass the original teacher")
  if dcfg.distill.guided and not _conditional(teacher_config):
    raise ValueError("guided distillation needs a conditional teacher trained with "
                     "conditioning dropout (e.g. configs/vdm/digits_cond.py)")
  stages = plan(dcfg.distill)
  for stage in stages:   # every stage's settings, before the first one trains
    experiment.check_settings(stage["kind"], stage["steps"],
                              teacher_config.model.parameterization,
                              dcfg.distill.allow_eps_teacher)
  fs.require_writable(workdir)   # a missing bucket or no credentials: fail before training
  rows, previous, cache = [], teacher, {}
  for stage in stages:
    stage_dir = fs.join(workdir, stage["dir"])
    summary_path = fs.path(stage_dir) / "summary.json"
    if summary_path.exists():
      rows.append(json.loads(summary_path.read_text(encoding="utf-8")))
      logging.info("Stage %s done already: %s", stage["dir"], rows[-1])
      previous = stage_dir
      continue
    config = stage_config(teacher_config, dcfg, stage, previous, teacher)
    probe = checkpoint_lib.Checkpointer(stage_dir, save_every=1, keep=1_000_000,
                                        read_only=True)
    fresh = probe.latest_step() is None
    probe.close()
    if fresh:
      logging.info("Stage %s: student initialised from %s", stage["dir"], previous)
      seed_student(config, stage_dir, devices)
    logging.info("Stage %s: %s, %d sampling steps, %d updates", stage["dir"], stage["kind"],
                 stage["steps"], config.train.num_steps)
    start = time.perf_counter()
    trainer.train(config, stage_dir, devices)
    row = summarize(stage, stage_dir, dcfg, teacher, cache, time.perf_counter() - start,
                    devices)
    if distributed.is_main_process():
      fs.write_atomic(summary_path, json.dumps(row, indent=1))
    logging.info("Stage %s summary: %s", stage["dir"], row)
    rows.append(row)
    previous = stage_dir
  reference = {"stage": "teacher", "student_steps": int(dcfg.distill.start_steps)}
  if rows and ("student_fd" in rows[-1] or "student_fid" in rows[-1]):   # teacher's own row
    reference.update({f"teacher_ddim_{k}": v for k, v in teacher_quality(
        teacher, int(dcfg.distill.eval_samples), reference["student_steps"], dcfg, cache,
        devices).items()})
  if distributed.is_main_process():
    fs.write_atomic(fs.path(workdir) / "summary.jsonl",
                    "".join(json.dumps(r) + "\n" for r in [reference] + rows))
  return rows
