"""Working with a trained workdir: rebuild its setup from the saved config and restore its
state, load its EMA model (a distillation teacher, a cascade stage), evaluate bits/dim and
draw samples. The trainer uses the same evaluation and sampling during training; the entry
points (evaluate, sample, distill, the cascade) use them on finished runs.
"""

import logging
import math
import os

import jax
import numpy as np
from flax import nnx

from launch import checkpoint as checkpoint_lib
from launch import config_flags, distributed, families, fs, images, mesh as mesh_lib, videos
from launch import setup as setup_lib
from launch.data import pipeline
from vdm import guidance, likelihood


def evaluate_bpd(setup: setup_lib.Setup, params, *, split: str, rng, method: str = "vlb",
                 **ode_options) -> dict:
  """Full-pass bits/dim of a split with the given (usually EMA) params, from the VLB or (method
  "ode") the probability-flow ODE with options num_steps and hutchinson."""
  config = setup.config
  source = setup_lib.data_source(config, split, setup.workdir)
  if config.eval.max_examples:
    source = FirstExamples(source, config.eval.max_examples)
  if method == "vlb" and setup.family.eval_terms is not None:
    per_example, term_names = setup.family.eval_terms, likelihood.TERMS
  elif method == "ode" and setup.family.ode_terms is not None:
    per_example = lambda m, b, r, c: setup.family.ode_terms(m, b, r, c, **ode_options)
    term_names = ("ode",)
  else:
    raise ValueError(f"unknown likelihood method {method!r} for family {config.family!r}")

  def terms_and_mask(p, b, r):
    terms = per_example(setup_lib.model_with(setup, p), b, r, config)
    return dict(terms, mask=b["mask"])   # the global mask, as the terms cover every process
  # Replicated outputs, so that every process can read all examples' terms. Compiled once
  # per setup and method (periodic evaluations reuse it).
  terms = setup_lib.cached_jit(setup, ("eval", method, tuple(sorted(ode_options.items()))),
                      terms_and_mask, out_shardings=mesh_lib.replicated(setup.mesh))
  batches = pipeline.epoch_iterator(source, global_batch_size=config.eval.batch_size)
  num_dims = math.prod(source.image_shape)
  return likelihood.vlb_bits_per_dim(
      lambda b, r: terms(params, setup_lib.put_batch(setup, b), r), batches, rng,
      num_time_samples=config.eval.num_time_samples, num_dims=num_dims, terms=term_names)


def load_workdir(workdir: str, step: int | None = None, overrides: dict | None = None,
                 devices=None, with_frozen: bool = True):
  """(setup, state, checkpointer) of a trained workdir, rebuilt from the config saved beside
  its checkpoint (on a mesh of `devices`, default all); `overrides` ({"eval.sampler":
  "ancestral", ...}) change that config first."""
  setup, ckpt = _setup_of_workdir(workdir, step, overrides, devices, with_frozen)
  state, _ = ckpt.restore(setup.abstract_state, step)
  return setup, state, ckpt


def _setup_of_workdir(workdir, step, overrides, devices, with_frozen):
  """(setup, checkpointer) of a trained workdir: the config saved beside its checkpoint,
  completed with the family's defaults and then the overrides, built on a mesh of
  `devices`; nothing restored yet."""
  ckpt = checkpoint_lib.Checkpointer(workdir, save_every=1, keep=1_000_000,
                                     read_only=True)
  if ckpt.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}; train "
                            f"first with: python -m launch.train --config ... --workdir {workdir}")
  config = ckpt.restore_config(step).unlock()
  family = families.get_family(config.family)
  if family.default_config is not None:
    added = config_flags.fill_missing(config, family.default_config(config))
    if added:
      logging.info("Config saved in %s predates %s; using their defaults.", workdir, added)
  for key, value in (overrides or {}).items():
    if value is not None:
      *parents, leaf = key.split(".")
      node = config
      for name in parents:
        node = node[name]
      node[leaf] = value
  frozen = frozen_module(config) if with_frozen else None
  return setup_lib.build(config, devices, workdir=workdir, frozen_module=frozen), ckpt


def load_ema_model(workdir: str, step: int | None = None, devices=None):
  """(the EMA model of a trained workdir, its config): a distillation teacher, a cascade
  stage. Weights only: the optimizer state (twice the parameters, for Adam) is never read,
  and a distillation workdir's own teacher is not loaded (no chain of loads)."""
  setup, ckpt = _setup_of_workdir(workdir, step, None, devices, with_frozen=False)
  ema = ckpt.restore_items(setup.abstract_state, ("ema",), step)["ema"]
  ckpt.close()
  return nnx.merge(setup.graphdef, ema), setup.config


def frozen_module(config):
  """The config's family's frozen module (T5 for in-step text, a distillation teacher)."""
  family = families.get_family(config.family)
  return family.frozen_init(config, load_ema_model) if family.frozen_init else None


class FirstExamples:
  """The first n examples of a source (quick evaluations: eval.max_examples; small splits)."""

  def __init__(self, source, n):
    self.source, self.n = source, min(n, len(source))
    pipeline.copy_metadata(self, source)

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return self.source[i]

  def __repr__(self):   # grain checks a source's repr when restoring an iterator
    return f"FirstExamples({self.source!r}, {self.n})"


def sample_images(setup: setup_lib.Setup, params, rng, *, num: int, num_steps: int,
                  guide: nnx.Module | None = None) -> np.ndarray:
  """`num` samples as integer levels, gathered on every process. Conditional families take
  their conditioning (labels, captions) from the first `num` examples of the eval split.
  `guide` (see `load_guide`): a weaker model of the same family that autoguides at weight
  config.eval.guidance_w in place of classifier-free guidance."""
  config = setup.config
  source = setup_lib.data_source(config, config.data.eval_split, setup.workdir)
  examples = [source[i] for i in range(min(num, len(source)))]
  keys = [k for k in setup.family.batch_keys if k in examples[0]]
  host = {k: np.stack([np.asarray(e[k]) for e in examples]) for k in keys}
  for key in ("image", "video"):
    if key in host:
      host[key] = host[key].astype(np.int32)
  replicated = mesh_lib.replicated(setup.mesh)
  batch = {k: jax.make_array_from_process_local_data(replicated, v) for k, v in host.items()}
  guide_graphdef, guide_state = nnx.split(guide) if guide is not None else (None, None)
  # The eval section (sampler, solver options, guidance) is part of the key: a setup whose
  # config.eval was changed after loading must not reuse the previous sampler.
  fn = setup_lib.cached_jit(setup, ("sample", num_steps, guide_graphdef,
                                    config.eval.to_json_best_effort(sort_keys=True)),
                   lambda p, b, r, g, *f: setup.family.sample(
                       setup_lib.model_with(setup, p), r, b, config,
                       *setup_lib.frozen_modules(setup, *f), num_steps=num_steps,
                       **({} if g is None else {"guide": nnx.merge(guide_graphdef, g)})),
                   out_shardings=replicated)
  return np.asarray(jax.device_get(fn(params, batch, rng, guide_state,
                                      *setup_lib.frozen_args(setup))))


def parse_guidance_interval(text: str | None, flag: str = "--guidance_interval"):
  """A guidance interval from the command line: "lo,hi" in logsnr, "sigma:lo,hi" in EDM's
  sigma (converted by vdm.guidance.logsnr_interval_from_sigma), "none" or "" for guidance
  everywhere ((), which overrides the config), None (flag not given) for the config's."""
  if text is None:
    return None
  spec = text.strip().lower()
  if spec in ("", "none", "all"):
    return ()
  in_sigma = spec.startswith("sigma:")
  try:
    ends = tuple(float(v) for v in spec.removeprefix("sigma:").split(","))
    if len(ends) != 2:
      raise ValueError(f"two ends needed, got {len(ends)}")
    return (guidance.logsnr_interval_from_sigma(*ends) if in_sigma
            else guidance.check_interval(ends))
  except ValueError as e:
    raise config_flags.InputError(
        f"{flag} {text!r}: {e}. Pass lo,hi in logsnr (e.g. {flag}=-2.13,2.55), "
        f"sigma:lo,hi in EDM's sigma (e.g. {flag}=sigma:0.28,2.9), or none.") from None


def load_guide(setup: setup_lib.Setup, workdir: str, guide_workdir: str | None = None,
               guide_step: int | None = None) -> nnx.Module:
  """The autoguidance guide of the run in `workdir` (loaded as `setup`): the EMA model of
  `guide_workdir` (default: `workdir` itself) at `guide_step` (default: its latest), read
  only. Checked to be of the same family and data shape as the main model."""
  guide_workdir = guide_workdir or workdir
  if guide_workdir == workdir and guide_step is None:
    raise config_flags.InputError("a guide needs --guide_workdir (another run) or "
                                  "--guide_step (an earlier checkpoint of this run)")
  checkpoint_lib.require_checkpoint(guide_workdir, guide_step, flag="--guide_workdir",
                                   step_flag="--guide_step")
  guide, guide_config = load_ema_model(guide_workdir, guide_step,
                                       devices=setup.mesh.devices.flatten().tolist())
  main = setup_lib.model_with(setup, setup.abstract_state["ema"])
  found = (guide_config.family, tuple(guide.image_shape), guide.num_levels)
  wanted = (setup.config.family, tuple(main.image_shape), main.num_levels)
  if found != wanted:
    raise config_flags.InputError(
        f"the guide {guide_workdir} (step {guide_step or 'latest'}) is family / data shape / "
        f"levels {found} but the model is {wanted}: autoguidance needs a guide of the same "
        "family trained on the same data (a smaller or shorter run of the same config)")
  return guide


def write_samples(setup: setup_lib.Setup, samples, path: str) -> list[str]:
  """Writes samples a person can look at: images as a PNG grid at `path`; videos
  [N, F, H, W, C] as an animated GIF and an MP4 beside it (same name) and a PNG filmstrip
  (one row per video) at `path`. Returns the files written (none on other processes)."""
  if not distributed.is_main_process():
    return []
  levels = setup.source.num_levels
  if np.ndim(samples) == 5:
    p = fs.path(path)
    written = videos.write_clips(p.parent, p.name.removesuffix(".png"), samples, levels)
  else:
    written = [images.write_grid(path, samples, levels)]
  logging.info("Wrote %s", ", ".join(written))
  return written


def preview(samples, num_levels: int) -> np.ndarray:
  """One uint8 [H, W, C] image of samples for TensorBoard: the grid of images, or of each
  video's first frame."""
  if np.ndim(samples) == 5:
    return videos.first_frames(samples, num_levels, scale=videos.default_scale(samples))
  return images.make_grid(samples, num_levels,
                          scale=images.default_scale(np.shape(samples)[1]))
