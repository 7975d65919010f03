r"""Text-to-image with a trained cascade: base stage, then each super-resolution stage.

  python -m launch.sample_cascade --stages runs/imagen_base,runs/imagen_sr \
      --prompts "a handwritten digit seven,the number 3" --num_per_prompt 4 \
      [--steps 64,32] [--guidance 3,0] [--sampler ddim,ddim] [--aug_level 0,0.1] \
      [--out runs/cascade]

Each stage is a training workdir (its saved config rebuilds the model; EMA params). Prompts
are encoded once, with the text encoder named by the base stage's config (data.t5: the same
encoder its text cache was made with), and every stage's images are written as a PNG grid.
Per-stage options take one value per stage, or one value for all.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from imagen import experiment as imagen_experiment
from launch import distributed, encode_text, images, mesh as mesh_lib, trainer
from launch import metrics as metrics_lib
from vdm import losses

_STAGES = flags.DEFINE_list("stages", None, "Stage workdirs, base first.", required=True)
_PROMPTS = flags.DEFINE_list("prompts", None, "Comma-separated prompts.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
_NUM = flags.DEFINE_integer("num_per_prompt", 4, "Images per prompt.")
_STEPS = flags.DEFINE_list("steps", ["64"], "Sampling steps per stage.")
_GUIDANCE = flags.DEFINE_list("guidance", ["1.0"], "Guidance weight w per stage "
                              "(guided = (1 + w) cond - w uncond; 0 = conditional).")
_SAMPLER = flags.DEFINE_list("sampler", ["ddim"], "ddim or ancestral, per stage.")
_AUG = flags.DEFINE_list("aug_level", ["0.0"], "Noise-augmentation level t_aug of the "
                         "low-resolution input, per SR stage (the base ignores it).")
_THRESHOLD = flags.DEFINE_enum("threshold", "dynamic", ["dynamic", "static", "none"],
                               "x-hat thresholding.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: the last stage's "
                           "workdir/cascade).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def per_stage(values, n, name, cast):
  if len(values) not in (1, n):
    raise ValueError(f"--{name} needs 1 or {n} values (one per stage), got {values}")
  return [cast(v) for v in (values * n if len(values) == 1 else values)]


def read_prompts() -> list[str]:
  if _PROMPTS_FILE.value:
    with open(_PROMPTS_FILE.value, encoding="utf-8") as f:
      prompts = [line.strip() for line in f if line.strip()]
  else:
    prompts = list(_PROMPTS.value or [])
  if not prompts:
    raise ValueError("no prompts: pass --prompts or --prompts_file")
  return prompts


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


def main(argv):
  del argv
  metrics_lib.setup_logging()
  distributed.initialize()
  stages, prompts = _STAGES.value, read_prompts()
  n = len(stages)
  outputs, _, setups = run_cascade(
      stages, prompts, num_per_prompt=_NUM.value,
      steps=per_stage(_STEPS.value, n, "steps", int),
      guidance=per_stage(_GUIDANCE.value, n, "guidance", float),
      samplers_=per_stage(_SAMPLER.value, n, "sampler", str),
      aug_levels=per_stage(_AUG.value, n, "aug_level", float),
      threshold=_THRESHOLD.value, seed=_SEED.value)
  out_dir = _OUT.value or os.path.join(stages[-1], "cascade")
  if distributed.is_main_process():
    for i, (x, setup) in enumerate(zip(outputs, setups)):
      levels = setup.source.num_levels
      path = os.path.join(out_dir, f"stage{i}_{x.shape[1]}x{x.shape[2]}.png")
      images.write_grid(path, np.asarray(losses.x_to_int(x, levels)), levels,
                        columns=_NUM.value)
      print(path)
    with open(os.path.join(out_dir, "prompts.txt"), "w", encoding="utf-8") as f:
      f.write("\n".join(prompts) + "\n")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
