"""The launch side of a trained Imagen cascade: load each stage's workdir, encode the
prompts with the base stage's text encoder, and run `imagen.cascade.run_cascade` with the
prompts' batch sharded over the mesh's data axes (padded to a multiple of them), so a
cascade samples the same images on one device and on a pod slice.

Used by `launch.sample_cascade` (PNG grids for prompts) and `launch.evaluate_cascade`
(prompt alignment and Frechet distance over a guidance sweep).
"""

import collections
import logging

import jax
import numpy as np
from flax import nnx

from imagen import cascade, video_experiment
from launch import checkpoint as checkpoint_lib
from launch import config_flags, fs
from launch import mesh as mesh_lib
from launch import text_encoder as text_encoder_lib
from launch import images, videos
from launch import workdir as workdir_lib
from vdm import losses

CascadeResult = collections.namedtuple(
    "CascadeResult", ["images", "configs", "setups", "params", "text_cond", "compile_seconds",
                      "sample_seconds"])


def read_prompts(prompts, prompts_file) -> list[str]:
  """The prompts of --prompts (a list) or --prompts_file (one per line)."""
  if prompts_file:
    if not fs.path(prompts_file).is_file():
      raise config_flags.InputError(f"--prompts_file {prompts_file} does not exist: pass a "
                                    "text file with one prompt per line.")
    text = fs.path(prompts_file).read_text(encoding="utf-8")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
  prompts = list(prompts or [])
  if not prompts:
    raise config_flags.InputError("no prompts: pass --prompts 'a prompt,another prompt' or "
                                  "--prompts_file with one prompt per line.")
  return prompts


def stage_family(config) -> str:
  """The family a stage samples as: its own, or its teacher's for a distilled student."""
  return config.distill.base_family if config.family == "distill" else config.family


def video_stage_config(workdir: str, command: str):
  """The config saved in a video stage's workdir (read before anything is sampled), or in a
  distilled student's of a video stage; a clear error for a run of another family."""
  with checkpoint_lib.Checkpointer(workdir, save_every=1, keep=1, read_only=True) as ckpt:
    config = ckpt.restore_config()
  if stage_family(config) != "video":
    raise config_flags.InputError(
        f"{workdir} is a {config.family!r} run; {command} takes video stages (family "
        "'video'); sample image runs with python -m launch.sample (VDM, distilled students) "
        "or python -m launch.sample_cascade --stages ... (Imagen stages)")
  return config


def per_stage(values, n, name, cast):
  """A per-stage flag: one value for every stage, or one per stage."""
  if len(values) not in (1, n):
    raise ValueError(f"--{name} needs 1 or {n} values (one per stage), got {values}")
  return [cast(v) for v in (values * n if len(values) == 1 else values)]


def per_stage_intervals(text: str | None, n: int, flag: str = "--guidance_interval"):
  """--guidance_interval of a cascade: None when not given (each stage's config decides),
  else n intervals from one spec for every stage or one per stage separated by ';'
  ("-2.1,2.5;none": the base guided in [-2.1, 2.5], the SR stage everywhere)."""
  if text is None:
    return None
  specs = text.split(";")
  if len(specs) not in (1, n):
    raise config_flags.InputError(
        f"{flag} {text!r} has {len(specs)} intervals for {n} stages: pass one for all, or "
        f"one per stage separated by ';' (e.g. {flag}='-2.1,2.5;none')")
  return [workdir_lib.parse_guidance_interval(spec, flag) for spec in specs * (n // len(specs))]


def per_stage_guides(workdirs: str | None, steps: str | None, stages) -> list | None:
  """--guide_workdir / --guide_step of a cascade: per stage None (classifier-free guidance)
  or (guide workdir or None for the stage's own, step or None for the latest), from one
  value for every stage or one per stage separated by ';' ("none" or empty: no guide);
  None when neither flag is given. Each guide's checkpoint is checked now."""
  if workdirs is None and steps is None:
    return None
  n = len(stages)

  def split(text, flag):
    parts = [p.strip() for p in (text or "").split(";")]
    if len(parts) not in (1, n):
      raise config_flags.InputError(f"{flag} {text!r} has {len(parts)} entries for {n} "
                                    f"stages: pass one for all, or one per stage separated "
                                    f"by ';' (none for a stage without a guide)")
    return [None if p.lower() in ("", "none") else p for p in parts * (n // len(parts))]

  dirs = split(workdirs, "--guide_workdir")
  try:
    step_list = [None if v is None else int(v) for v in split(steps, "--guide_step")]
  except ValueError:
    raise config_flags.InputError(f"--guide_step {steps!r}: whole numbers (or none), one "
                                  "for all stages or one per stage separated by ';'") from None
  guides = []
  for stage, d, step in zip(stages, dirs, step_list):
    if d is None and step is None:
      guides.append(None)
      continue
    checkpoint_lib.require_checkpoint(d or stage, step, flag="--guide_workdir",
                                      step_flag="--guide_step")
    guides.append((d, step))
  return guides


def run_cascade(stages, prompts, *, num_per_prompt, steps, guidance, samplers_, aug_levels,
                threshold, seed, devices=None, guidance_intervals=None, guides=None):
  """A CascadeResult: each stage's images in [-1, 1] ([N, H, W, C] numpy, N = prompts x
  num_per_prompt; clips [N, F, H, W, C] for video stages), configs, setups, EMA params, the
  prompts' text conditioning (host arrays, one row per sample), and per stage the seconds
  spent compiling and sampling (text encoding excluded). `devices`: the mesh's devices
  (default all). Per stage (lists, default none): guidance_intervals, the logsnr interval
  (lo, hi) of its guidance, () for everywhere, None for its config's
  eval.guidance_interval; guides, None or (guide workdir or None for the stage's own, step
  or None for the latest): the EMA model that autoguides the stage at its weight."""
  # No frozen modules: prompts are encoded here, and a distilled student needs no teacher.
  loaded = [workdir_lib.load_workdir(w, devices=devices, with_frozen=False) for w in stages]
  for _, _, ckpt in loaded:
    ckpt.close()
  intervals = [None if v is None else tuple(v)
               for v in (guidance_intervals or [None] * len(stages))]
  intervals = [setup.config.eval.get("guidance_interval", ()) if v is None else v
               for v, (setup, _, _) in zip(intervals, loaded)]
  guide_models = [None if g is None else nnx.split(workdir_lib.load_guide(setup, w, *g))
                  for g, w, (setup, _, _) in zip(guides or [None] * len(stages), stages, loaded)]
  base_config = loaded[0][0].config
  text_encoder = text_encoder_lib.load_text_encoder(base_config.data.t5,
                                                    max_length=base_config.data.max_length)
  captions = [p for p in prompts for _ in range(num_per_prompt)]
  emb, mask = text_encoder(captions)
  text_cond = {"text_emb": np.asarray(emb, np.float32), "text_mask": np.asarray(mask, np.int32)}
  mesh = loaded[0][0].mesh
  shards = mesh_lib.batch_shards(mesh)
  settings = [cascade.StageSettings(steps[i], guidance[i], samplers_[i], aug_levels[i],
                                    threshold, tuple(intervals[i]) or None)
              for i in range(len(stages))]
  out = cascade.run_cascade(
      [(setup.graphdef, state["ema"]) for setup, state, _ in loaded], text_cond, len(captions),
      settings, seed=seed, place=lambda tree: mesh_lib.shard_batch(mesh, tree, shards),
      compile_fn=lambda fn, *args: jax.jit(
          fn, out_shardings=mesh_lib.replicated(mesh)).lower(*args).compile(),
      guides=guide_models)
  for i, x in enumerate(out.images):
    logging.info("Stage %d (%s): %d samples of %s, %d steps in %.2f s (compile %.1f s)", i,
                 stages[i], len(captions), "x".join(map(str, x.shape[1:])), steps[i],
                 out.sample_seconds[i], out.compile_seconds[i])
  return CascadeResult(out.images, [setup.config for setup, _, _ in loaded],
                       [setup for setup, _, _ in loaded],
                       [state["ema"] for _, state, _ in loaded], text_cond,
                       out.compile_seconds, out.sample_seconds)


def extend_clips(result: CascadeResult, clips, *, total_frames: int, num_known: int,
                 num_steps: int, guidance_w: float, w_r: float, sampler: str, threshold: str,
                 seed: int) -> np.ndarray:
  """The last stage's clips [N, F, ...] in [-1, 1] continued to `total_frames` by
  reconstruction guidance (imagen.video_experiment.extend), with the prompts' text."""
  setup, params = result.setups[-1], result.params[-1]
  fn = jax.jit(lambda p, x, c, rng: video_experiment.extend(
      nnx.merge(setup.graphdef, p), x, rng, c, total_frames=total_frames,
      num_known=num_known, num_steps=num_steps, guidance_w=guidance_w, w_r=w_r,
      sampler=sampler, threshold=threshold))
  return np.asarray(jax.device_get(fn(params, clips, result.text_cond, jax.random.key(seed))))


def write_stage(out_dir, i: int, x, num_levels: int, *, columns: int, fps: int = 8) -> list:
  """Writes stage i's samples x in [-1, 1]: images [N, H, W, C] as stageI_HxW.png (a grid of
  `columns` per row); clips [N, F, H, W, C] as stageI_FxHxW.gif / .mp4 (the grid playing
  at `fps`) and .png (a filmstrip). Returns the paths."""
  ints = np.asarray(losses.x_to_int(x, num_levels))
  name = f"stage{i}_" + "x".join(map(str, ints.shape[1:-1]))
  if ints.ndim == 4:
    return [images.write_grid(fs.join(out_dir, f"{name}.png"), ints, num_levels,
                              columns=columns)]
  return videos.write_clips(out_dir, name, ints, num_levels, fps=fps, columns=columns)
