"""Running a trained Imagen cascade: base stage, then each super-resolution stage.

Used by `launch.sample_cascade` (PNG grids for prompts) and `launch.evaluate_cascade`
(prompt alignment and Frechet distance over a guidance sweep).
"""

import jax
import jax.numpy as jnp
import numpy as np

from imagen import experiment as imagen_experiment
from launch import encode_text, mesh as mesh_lib, trainer


def per_stage(values, n, name, cast):
  if len(values) not in (1, n):
    raise ValueError(f"--{name} needs 1 or {n} values (one per stage), got {values}")
  return [cast(v) for v in (values * n if len(values) == 1 else values)]


def run_cascade(stages, prompts, *, num_per_prompt, steps, guidance, samplers_, aug_levels,
                threshold, seed):
  """Returns the list of each stage's images in [-1, 1] ([N, H, W, C] numpy)."""
  loaded = [trainer.load_workdir(w) for w in stages]
  base_config = loaded[0][0].config
  text_encoder = encode_text.load_text_encoder(base_config.data.t5,
                                               max_length=base_config.data.max_length)
  captions = [p for p in prompts for _ in range(num_per_prompt)]
  emb, mask = text_encoder(captions)
  cond_text = {"text_emb": jnp.asarray(np.asarray(emb, np.float32)),
               "text_mask": jnp.asarray(mask, jnp.int32)}
  outputs, previous = [], None
  for i, (setup, state, ckpt) in enumerate(loaded):
    ckpt.close()
    model = trainer.model_with(setup, state["ema"])
    cond = dict(cond_text)
    if model.lowres_size:
      if previous is None:
        raise ValueError(f"stage {stages[i]} is a super-resolution stage; put a base first")
      cond.update(imagen_experiment.lowres_cond(model, jnp.asarray(previous),
                                                jax.random.key(seed + 100 + i),
                                                jnp.full((len(captions),), aug_levels[i])))
    fn = jax.jit(lambda m_state, c, r, setup=setup, i=i: imagen_experiment.sample(
        trainer.model_with(setup, m_state), r, c, len(captions), num_steps=steps[i],
        guidance_w=guidance[i], sampler=samplers_[i], threshold=threshold),
        out_shardings=mesh_lib.replicated(setup.mesh))
    previous = np.asarray(jax.device_get(fn(state["ema"], cond, jax.random.key(seed + i))))
    outputs.append(previous)
  return outputs, [setup.config for setup, _, _ in loaded], [s for s, _, _ in loaded]
