"""Sampling a trained Imagen cascade: the base stage from text, then each super-resolution
stage from text and the previous stage's output (Saharia et al. 2022, sec. 2.5).

Image stages chain images [N, H, W, C]; video stages (Imagen Video, Ho et al. 2022b) chain
clips [N, F, H, W, C]: a temporal SR stage takes the previous clips at its lower frame count,
a spatial one at its lower frame size (imagen/video_sr.py brings them to the stage's shape),
each noise-augmented to the stage's aug_level.

Pure of where it runs: `place` puts a host batch onto devices (the launch side shards it over
the mesh's data axes, padding the batch) and `compile_fn(fn, *args)` compiles a stage, so the
same loop samples on one CPU and on a pod slice. Per stage: the number of sampling steps,
the guidance weight w (on text only: the low-res input is kept in both branches) and the
logsnr interval where it applies (None: everywhere), the sampler, the x-hat hook and, for SR
stages, the noise-augmentation level of the input; optionally a guide model per stage, which
autoguides at weight w instead (vdm/guidance.py). A distilled student that takes w as an
input (guided distillation) gets it in its conditioning instead of a second pass.
"""

import collections
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen import experiment, video_experiment

StageSettings = collections.namedtuple(
    "StageSettings",
    ["steps", "guidance_w", "sampler", "aug_level", "threshold", "guidance_interval"],
    defaults=(None,))
CascadeOutput = collections.namedtuple(
    "CascadeOutput", ["images", "compile_seconds", "sample_seconds"])


def sample_stage(model: experiment.ImagenStage, cond: dict, rng, num: int, s: StageSettings,
                 guide=None):
  """`num` images (or clips, for a video stage) in [-1, 1] from one stage; cond holds the
  text and, for an SR stage, "lowres_image" (the previous stage's images or clips),
  noise-augmented here to s.aug_level; `guide`: a model of the same kind that autoguides."""
  k_aug, k_sample = jax.random.split(rng)
  cond = model.sampling_cond(cond, num)     # e.g. a video stage's frame rate
  guidance_w = s.guidance_w
  if takes_guidance_weight(model):   # a guided-distilled student: w is an input, one pass
    cond, guidance_w = {**cond, "guidance_w": jnp.full((num,), s.guidance_w)}, 0.0
  if "lowres_image" in cond:
    cond = dict(cond)
    lowres, t_aug = cond.pop("lowres_image"), jnp.full((num,), s.aug_level)
    if isinstance(model, video_experiment.VideoStage):
      cond.update(model.lowres_cond(lowres, k_aug, t_aug))
    else:
      cond.update(experiment.lowres_cond(model, lowres, k_aug, t_aug))
  return experiment.sample(model, k_sample, cond, num, num_steps=s.steps,
                           guidance_w=guidance_w, sampler=s.sampler, threshold=s.threshold,
                           guidance_interval=s.guidance_interval, guide=guide)


def takes_guidance_weight(model) -> bool:
  """Whether a stage's net takes the guidance weight w as an input (a student of guided
  distillation, Meng et al. 2023): it is sampled with w in its conditioning and no
  unconditional pass."""
  return "guidance_w" in model.net.cond_keys


def is_super_resolution(model) -> bool:
  """Whether a stage conditions on the previous stage's output (image SR, video SSR / TSR)."""
  return bool(model.lowres_size or getattr(model, "lowres_frames", 0))


def run_cascade(stages, text_cond: dict, num: int, settings, *, seed: int,
                place=lambda tree: tree,
                compile_fn=lambda fn, *args: jax.jit(fn).lower(*args).compile(),
                guides=None):
  """Runs every stage; returns a CascadeOutput of per-stage host images [num, H, W, C] (clips
  [num, F, H, W, C] for video stages) and compile / sampling seconds.

  stages: (graphdef, params) of each stage's model, base first; text_cond: host arrays
  text_emb [num, L, D] and text_mask [num, L]; settings: a StageSettings per stage; guides:
  per stage None or the (graphdef, params) of its autoguidance guide (default: none)."""
  outputs, previous, compile_s, sample_s = [], None, [], []
  guides = list(guides or [None] * len(stages))
  if len(guides) != len(stages):
    raise ValueError(f"guides has {len(guides)} entries for {len(stages)} stages (one per "
                     "stage, None where a stage has no guide)")
  for i, ((graphdef, params), s) in enumerate(zip(stages, settings)):
    cond = dict(text_cond)
    if is_super_resolution(nnx.merge(graphdef, params)):
      if previous is None:
        raise ValueError(f"stage {i} is a super-resolution stage; put a base stage first")
      cond["lowres_image"] = previous
    cond = place(cond)
    padded = jax.tree.leaves(cond)[0].shape[0]   # `place` may pad the batch

    def stage_fn(p, c, rng, *g, graphdef=graphdef, s=s, guide=guides[i]):
      guide_model = nnx.merge(guide[0], g[0]) if guide is not None else None
      return sample_stage(nnx.merge(graphdef, p), c, rng, padded, s, guide_model)

    args = (params, cond, jax.random.key(seed + i)) + (
        (guides[i][1],) if guides[i] is not None else ())
    start = time.perf_counter()
    fn = compile_fn(stage_fn, *args)
    compile_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    previous = np.asarray(jax.device_get(fn(*args)))[:num]
    sample_s.append(time.perf_counter() - start)
    outputs.append(previous)
  return CascadeOutput(outputs, compile_s, sample_s)
