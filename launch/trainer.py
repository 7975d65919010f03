"""The one training loop, for every model family, on one CPU or a TPU pod.

  python -m launch.train --config configs/vdm/digits.py --workdir runs/digits

Sections: setup (processes, mesh, data, model) -> state (sharded init or restore) -> compile
(ahead of time, against the batch shape) -> loop (step, log, evaluate, sample, checkpoint).
Running the same command again in the same workdir resumes from the latest checkpoint,
including the data iterator, so the resumed run sees exactly the batches the uninterrupted
one would have.
"""

import dataclasses
import logging
import math
import os
import time

import jax
import numpy as np
from flax import nnx

from launch import checkpoint as checkpoint_lib
from launch import distributed, families, images, mesh as mesh_lib, metrics as metrics_lib
from launch import config_flags, train_state
from launch.data import pipeline
from vdm import likelihood


@dataclasses.dataclass
class Setup:
  """Everything derived from a config that training, evaluation and sampling share."""
  config: object
  family: families.Family
  mesh: jax.sharding.Mesh
  source: object            # the training split's source (metadata: levels, shape, classes)
  graphdef: object
  tx: object
  abstract_state: dict      # ShapeDtypeStruct leaves carrying their shardings
  state_shardings: dict
  workdir: str | None = None
  frozen: tuple = ()         # (graphdef, state, shardings) of a frozen module, e.g. T5


def _check_config(config):
  if config.train.batch_size % config.train.grad_accum:
    raise ValueError(f"train.batch_size={config.train.batch_size} must be divisible by "
                     f"train.grad_accum={config.train.grad_accum}")
  if config.train.nan_policy not in ("error", "skip"):
    raise ValueError(f"train.nan_policy must be 'error' or 'skip', got "
                     f"{config.train.nan_policy!r}")


def data_source(config, split, workdir=None):
  """A split's source; a family may wrap it (e.g. Imagen adds cached text embeddings)."""
  family = families.get_family(config.family)
  source = family.get_source(config, split) if family.get_source else None
  if source is None:
    source = pipeline.get_source(config.data.name, split, data_dir=config.data.data_dir or None)
  return family.wrap_source(config, source, split, workdir) if family.wrap_source else source


def build(config, devices=None, workdir=None, with_frozen: bool = True) -> Setup:
  """Mesh, data source, model definition and the abstract, sharded train state.

  devices: the devices of the mesh (default: all); tests pass a subset to compare meshes.
  workdir: where a family may keep derived data (Imagen's text-embedding cache).
  with_frozen: False skips the family's frozen module (e.g. to read a distilled student's
    weights without loading its teacher)."""
  distributed.initialize()
  _check_config(config)
  family = families.get_family(config.family)
  mesh = mesh_lib.make_mesh(config.mesh.ici, config.mesh.dcn, devices=devices)
  source = data_source(config, config.data.train_split, workdir)
  tx = train_state.make_optimizer(config.optim, config.train.num_steps)

  def init():
    model = family.build_model(config, source, nnx.Rngs(config.seed))
    _, params = nnx.split(model, nnx.Param)
    return train_state.init_state(params, tx, config.seed)

  abstract_model = nnx.eval_shape(lambda: family.build_model(config, source, nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract_model, nnx.Param)
  abstract = jax.eval_shape(init)
  param_sh = mesh_lib.param_shardings(abstract["params"], mesh, config.mesh.rules)
  shardings = {"step": mesh_lib.replicated(mesh), "params": param_sh,
               "opt_state": mesh_lib.tree_shardings_like(abstract["opt_state"], param_sh),
               "ema": param_sh, "rng": mesh_lib.replicated(mesh)}
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  frozen = ()
  if (with_frozen and family.frozen_init is not None and
      (module := family.frozen_init(config)) is not None):
    # A frozen module (e.g. the T5 encoder) goes into the step as a sharded argument.
    f_graphdef, f_state = nnx.split(module)
    f_shardings = mesh_lib.param_shardings(f_state, mesh, config.mesh.rules)
    frozen = (f_graphdef, jax.device_put(f_state, f_shardings), f_shardings)
  setup = Setup(config, family, mesh, source, graphdef, tx, abstract, shardings, workdir,
                frozen)
  setup.init = jax.jit(init, out_shardings=shardings)
  return setup


def batch_shardings(setup: Setup, batch: dict):
  return {k: mesh_lib.batch_sharding(setup.mesh, np.ndim(v)) for k, v in batch.items()}


def put_batch(setup: Setup, batch: dict) -> dict:
  """A per-process numpy batch -> global arrays sharded over the data axes."""
  batch = families.device_batch(batch, setup.family.batch_keys + ("mask",))
  return {k: jax.make_array_from_process_local_data(s, batch[k])
          for k, s in batch_shardings(setup, batch).items()}


def restore_or_init(setup: Setup, ckpt: checkpoint_lib.Checkpointer, data_iterator=None):
  """The latest checkpoint's state (onto this mesh) or a fresh sharded init."""
  if ckpt.latest_step() is not None:
    state, _ = ckpt.restore(setup.abstract_state, data_iterator=data_iterator)
    logging.info("Resumed from step %d in %s", int(state["step"]), ckpt.step_dir(
        ckpt.latest_step()))
    return state
  return setup.init()


def _cached_jit(setup: Setup, key, fn, **jit_kwargs):
  """jax.jit(fn) made once per (setup, key), so repeated evaluations do not retrace."""
  cache = setup.__dict__.setdefault("_jit_cache", {})
  if key not in cache:
    cache[key] = jax.jit(fn, **jit_kwargs)
  return cache[key]


def model_with(setup: Setup, params):
  return nnx.merge(setup.graphdef, params)


def frozen_args(setup: Setup) -> tuple:
  """The frozen module's state, as extra arguments of jitted functions (or none)."""
  return (setup.frozen[1],) if setup.frozen else ()


def frozen_modules(setup: Setup, *states) -> tuple:
  """Inside a jitted function: the frozen module rebuilt from its state argument."""
  return tuple(nnx.merge(setup.frozen[0], s) for s in states)


# ------------------------------------------------------------------ evaluation and sampling


def evaluate_bpd(setup: Setup, params, *, split: str, rng, method: str = "vlb",
                 **ode_options) -> dict:
  """Full-pass bits/dim of a split with the given (usually EMA) params, from the VLB or (method
  "ode") the probability-flow ODE with options num_steps and hutchinson."""
  config = setup.config
  source = data_source(config, split, setup.workdir)
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
    terms = per_example(model_with(setup, p), b, r, config)
    return dict(terms, mask=b["mask"])   # the global mask, as the terms cover every process
  # Replicated outputs, so that every process can read all examples' terms. Compiled once
  # per setup and method (periodic evaluations reuse it).
  terms = _cached_jit(setup, ("eval", method, tuple(sorted(ode_options.items()))),
                      terms_and_mask, out_shardings=mesh_lib.replicated(setup.mesh))
  batches = pipeline.epoch_iterator(source, global_batch_size=config.eval.batch_size)
  num_dims = math.prod(source.image_shape)
  return likelihood.vlb_bits_per_dim(
      lambda b, r: terms(params, put_batch(setup, b), r), batches, rng,
      num_time_samples=config.eval.num_time_samples, num_dims=num_dims, terms=term_names)


def load_workdir(workdir: str, step: int | None = None, overrides: dict | None = None,
                 devices=None, with_frozen: bool = True):
  """(setup, state, checkpointer) of a trained workdir, rebuilt from the config saved beside
  its checkpoint (on a mesh of `devices`, default all); `overrides` ({"eval.sampler":
  "ancestral", ...}) change that config first."""
  ckpt = checkpoint_lib.Checkpointer(workdir, save_every=1, keep=1_000_000)
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
  setup = build(config, devices, workdir=workdir, with_frozen=with_frozen)
  state, _ = ckpt.restore(setup.abstract_state, step)
  return setup, state, ckpt


class FirstExamples:
  """The first n examples of a source (quick evaluations: eval.max_examples; small splits)."""

  def __init__(self, source, n):
    self.source, self.n = source, min(n, len(source))
    self.num_levels, self.num_classes = source.num_levels, source.num_classes
    self.image_shape = source.image_shape

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return self.source[i]

  def __repr__(self):   # grain checks a source's repr when restoring an iterator
    return f"FirstExamples({self.source!r}, {self.n})"


def sample_images(setup: Setup, params, rng, *, num: int, num_steps: int) -> np.ndarray:
  """`num` samples as integer levels, gathered on every process. Conditional families take
  their conditioning (labels, captions) from the first `num` examples of the eval split."""
  config = setup.config
  source = data_source(config, config.data.eval_split, setup.workdir)
  examples = [source[i] for i in range(min(num, len(source)))]
  keys = [k for k in setup.family.batch_keys if k in examples[0]]
  host = {k: np.stack([np.asarray(e[k]) for e in examples]) for k in keys}
  if "image" in host:
    host["image"] = host["image"].astype(np.int32)
  replicated = mesh_lib.replicated(setup.mesh)
  batch = {k: jax.make_array_from_process_local_data(replicated, v) for k, v in host.items()}
  fn = _cached_jit(setup, ("sample", num_steps),
                   lambda p, b, r, *f: setup.family.sample(
                       model_with(setup, p), r, b, config, *frozen_modules(setup, *f),
                       num_steps=num_steps),
                   out_shardings=replicated)
  return np.asarray(jax.device_get(fn(params, batch, rng, *frozen_args(setup))))


def write_samples(setup: Setup, samples, path: str):
  if distributed.is_main_process():
    images.write_grid(path, samples, setup.source.num_levels)
    logging.info("Wrote %s", path)


# ------------------------------------------------------------------------------ training


def _compile_step(setup: Setup, example_batch: dict):
  """jit with explicit shardings and donated state, compiled ahead of time."""
  config = setup.config
  step = train_state.make_train_step(
      lambda p, b, r, *f: setup.family.loss_and_grads(setup.graphdef, p, b, r, config,
                                                      *frozen_modules(setup, *f)),
      setup.tx, ema_decay=config.optim.ema_decay, grad_accum=config.train.grad_accum)
  b_sh = batch_shardings(setup, example_batch)
  f_sh = (setup.frozen[2],) if setup.frozen else ()
  jitted = jax.jit(step, in_shardings=(setup.state_shardings, b_sh) + f_sh,
                   out_shardings=(setup.state_shardings, mesh_lib.replicated(setup.mesh)),
                   donate_argnums=0)
  global_shape = lambda v: (config.train.batch_size,) + np.shape(v)[1:]
  abstract_batch = {k: jax.ShapeDtypeStruct(global_shape(v), np.asarray(v).dtype, sharding=s)
                    for (k, v), s in zip(example_batch.items(), b_sh.values())}
  start = time.perf_counter()
  compiled = jitted.lower(setup.abstract_state, abstract_batch, *frozen_args(setup)).compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  mem = ""
  if memory is not None:
    mem = (f", temp {getattr(memory, 'temp_size_in_bytes', 0) / 2**20:.1f} MiB, arguments "
           f"{getattr(memory, 'argument_size_in_bytes', 0) / 2**20:.1f} MiB")
  logging.info("Compiled the train step in %.1f s%s", seconds, mem)
  return compiled, seconds


def _nonfinite_error(step, metrics, ckpt):
  ckpt.wait()  # commit the in-flight async save: the raise would otherwise lose that step
  return FloatingPointError(
      f"Non-finite loss or gradient at step {step} (loss={float(metrics['loss'])}). The update "
      f"was not applied and no checkpoint contains it; the latest checkpoint is step "
      f"{ckpt.latest_step()}. Lower optim.lr or optim.grad_clip, check the data, or pass "
      f"--config.train.nan_policy=skip to skip such updates.")


def train(config, workdir: str, devices=None) -> dict:
  """Trains until config.train.num_steps; returns the last evaluation's metrics."""
  # ----------------------------------------------------------------------------- setup
  setup = build(config, devices, workdir)
  cfg = config.train
  logging.info("Mesh: %s", mesh_lib.describe(setup.mesh))
  loader = pipeline.make_loader(setup.source, global_batch_size=cfg.batch_size, seed=config.seed,
                                worker_count=config.data.worker_count)
  data_iter = iter(loader)
  ckpt = checkpoint_lib.Checkpointer(workdir, save_every=cfg.checkpoint_every,
                                     keep=cfg.keep_checkpoints)
  ckpt.install_sigterm_handler()
  writer = metrics_lib.MetricWriter(workdir)

  # ----------------------------------------------------------------------------- state
  state = restore_or_init(setup, ckpt, data_iterator=data_iter)
  start_step = int(jax.device_get(state["step"]))
  num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  logging.info("Parameters: %.2fM; starting at step %d of %d", num_params / 1e6, start_step,
               cfg.num_steps)

  # --------------------------------------------------------------------------- compile
  first = next(data_iter) if start_step < cfg.num_steps else None
  compiled = None
  if first is not None:
    compiled, compile_s = _compile_step(
        setup, families.device_batch(first, setup.family.batch_keys))
    writer.write(start_step, {"compile_seconds": compile_s})

  # ------------------------------------------------------------------------------ loop
  progress = metrics_lib.Progress(start_step, cfg.num_steps, cfg.batch_size)
  eval_rng = jax.random.key(config.seed + 1)
  last_eval, pending = {}, None
  step = start_step
  try:
    while step < cfg.num_steps:
      batch = first if first is not None else next(data_iter)
      first = None
      state, metrics = compiled(state, put_batch(setup, batch), *frozen_args(setup))
      step += 1
      # Check the previous step's metrics after dispatching this one (keeps the device busy).
      if pending is not None and cfg.nan_policy == "error" and pending[1]["nonfinite"] > 0:
        raise _nonfinite_error(pending[0], pending[1], ckpt)
      pending = (step, metrics)
      boundary = lambda every: every and (step % every == 0 or step == cfg.num_steps)
      if boundary(cfg.log_every) or boundary(cfg.checkpoint_every) or ckpt.preemption_requested(step):
        metrics = jax.device_get(metrics)
        pending = (step, metrics)
        if cfg.nan_policy == "error" and metrics["nonfinite"] > 0:
          raise _nonfinite_error(step, metrics, ckpt)
      if boundary(cfg.log_every):
        ckpt.check()
        writer.write(step, metrics, prefix="train/")
        if distributed.is_main_process():
          shown = {k: metrics[k] for k in ("loss", "bpd", "grad_norm") if k in metrics}
          logging.info(progress.line(step, shown))
      if boundary(cfg.eval_every) and setup.family.eval_terms is not None:
        last_eval = evaluate_bpd(setup, state["ema"], split=config.data.eval_split,
                                 rng=jax.random.fold_in(eval_rng, step))
        writer.write(step, last_eval, prefix="eval/")
        logging.info("Eval at step %d: %.4f +- %.4f bits/dim (recon %.4f, prior %.4f, "
                     "diffusion %.4f) over %d examples", step, last_eval["bpd"],
                     last_eval["bpd_stderr"], last_eval["bpd_recon"], last_eval["bpd_prior"],
                     last_eval["bpd_diffusion"], last_eval["num_examples"])
      if boundary(cfg.sample_every):
        samples = sample_images(setup, state["ema"], jax.random.fold_in(jax.random.fold_in(eval_rng, step), 1),
                                num=config.eval.num_samples, num_steps=config.eval.sample_steps)
        write_samples(setup, samples, os.path.join(workdir, "samples", f"step_{step:08d}.png"))
      ckpt.save(step, state, data_state=data_iter, config=config,
                force=step == cfg.num_steps)
      if ckpt.preemption_requested(step):
        # A SIGTERM that landed just after save() above: save now (a no-op if saved already).
        ckpt.save(step, state, data_state=data_iter, config=config, force=True)
        logging.warning("Preemption requested: saved step %d, exiting.", step)
        break
  finally:
    # Also on errors: finish an in-flight async save (earlier steps stay restorable) and
    # give the SIGTERM handler back.
    ckpt.close()
    writer.close()
  return last_eval
