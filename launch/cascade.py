"""Running a trained Imagen cascade: base stage, then each super-resolution stage.

Used by `launch.sample_cascade` (PNG grids for prompts) and `launch.evaluate_cascade`
(prompt alignment and Frechet distance over a guidance sweep). The batch of prompts is
sharded over the mesh's data axes (padded to a multiple of them), so a cascade samples the
same images on one device and on a pod slice.
"""

import collections
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from imagen import experiment as imagen_experiment
from launch import encode_text, mesh as mesh_lib, trainer


def per_stage(values, n, name, cast):
  if len(values) not in (1, n):
    raise ValueError(f"--{name} needs 1 or {n} values (one per stage), got {values}")
  return [cast(v) for v in (values * n if len(values) == 1 else values)]


def shard_batch(mesh, tree, num_shards: int):
  """Host arrays (the same on every process) -> global arrays split over the data axes,
  their leading dim padded with copies of the last row to a multiple of num_shards."""
  def one(x):
    x = np.asarray(x)
    pad = -x.shape[0] % num_shards
    x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x
    sharding = mesh_lib.batch_sharding(mesh, x.ndim)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(one, tree)


CascadeResult = collections.namedtuple(
    "CascadeResult", ["images", "configs", "setups", "compile_seconds", "sample_seconds"])


def run_cascade(stages, prompts, *, num_per_prompt, steps, guidance, samplers_, aug_levels,
                threshold, seed, devices=None):
  """A CascadeResult: each stage's images in [-1, 1] ([N, H, W, C] numpy, N = prompts x
  num_per_prompt), configs, setups, and per stage the seconds spent compiling and sampling
  (text encoding excluded). `devices`: the mesh's devices (default all)."""
  loaded = [trainer.load_workdir(w, devices=devices) for w in stages]
  base_config = loaded[0][0].config
  text_encoder = encode_text.load_text_encoder(base_config.data.t5,
                                               max_length=base_config.data.max_length)
  captions = [p for p in prompts for _ in range(num_per_prompt)]
  num = len(captions)
  emb, mask = text_encoder(captions)
  cond_text = {"text_emb": np.asarray(emb, np.float32), "text_mask": np.asarray(mask, np.int32)}
  outputs, previous, compile_s, sample_s = [], None, [], []
  for i, (setup, state, ckpt) in enumerate(loaded):
    ckpt.close()
    model = trainer.model_with(setup, state["ema"])
    cond = dict(cond_text)
    if model.lowres_size:
      if previous is None:
        raise ValueError(f"stage {stages[i]} is a super-resolution stage; put a base first")
      cond["lowres_image"] = previous
    shards = mesh_lib.batch_shards(setup.mesh)
    cond = shard_batch(setup.mesh, cond, shards)
    padded = num + (-num % shards)

    def stage_fn(m_state, c, rng, setup=setup, i=i):
      m = trainer.model_with(setup, m_state)
      k_aug, k_sample = jax.random.split(rng)
      if "lowres_image" in c:
        c = dict(c)
        lowres = c.pop("lowres_image")
        c.update(imagen_experiment.lowres_cond(m, lowres, k_aug,
                                               jnp.full((padded,), aug_levels[i])))
      return imagen_experiment.sample(m, k_sample, c, padded, num_steps=steps[i],
                                      guidance_w=guidance[i], sampler=samplers_[i],
                                      threshold=threshold)

    args = (state["ema"], cond, jax.random.key(seed + i))
    start = time.perf_counter()
    fn = jax.jit(stage_fn, out_shardings=mesh_lib.replicated(setup.mesh)).lower(*args).compile()
    compile_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    previous = np.asarray(jax.device_get(fn(*args)))[:num]
    sample_s.append(time.perf_counter() - start)
    logging.info("Stage %d (%s): %d images at %dx%d, %d steps in %.2f s (compile %.1f s)", i,
                 stages[i], num, previous.shape[1], previous.shape[2], steps[i], sample_s[-1],
                 compile_s[-1])
    outputs.append(previous)
  return CascadeResult(outputs, [setup.config for setup, _, _ in loaded],
                       [s for s, _, _ in loaded], compile_s, sample_s)
