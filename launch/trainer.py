"""The one training loop, for every model family, on one CPU or a TPU pod.

  python -m launch.train --config configs/vdm/digits.py --workdir runs/digits

Sections: setup (processes, mesh, data, model) -> state (sharded init or restore) -> compile
(ahead of time, against the batch shape) -> loop (step, log, evaluate, sample, checkpoint).
Running the same command again in the same workdir resumes from the latest checkpoint,
including the data iterator, so the resumed run sees exactly the batches the uninterrupted
one would have. With optim.phema.enabled the loop also saves post-hoc EMA snapshots
(launch/phema_snapshots.py) for `python -m launch.phema`.
"""

import logging
import time

import jax
import numpy as np

from launch import checkpoint as checkpoint_lib
from launch import config_flags, distributed, families, mesh as mesh_lib, metric_writer
from launch import phema_snapshots, train_state
from launch import flops as flops_lib
from launch import fs
from launch import setup as setup_lib
from launch import workdir as workdir_lib
from launch.data import pipeline


# ------------------------------------------------------------------------------ training


def trace_step(setup: setup_lib.Setup, example_batch: dict) -> jax.stages.Traced:
  """The train step, jitted with explicit shardings and donated state, traced on abstract
  arguments (the state, a global batch shaped like `example_batch`, the frozen modules)."""
  config = setup.config
  step = train_state.make_train_step(
      lambda p, b, r, *f: setup.family.loss_and_grads(setup.graphdef, p, b, r, config,
                                                      *setup_lib.frozen_modules(setup, *f)),
      setup.tx, ema_decay=config.optim.ema_decay, grad_accum=config.train.grad_accum,
      param_shardings=setup.state_shardings["params"])
  b_sh = setup_lib.batch_shardings(setup, example_batch)
  f_sh = (setup.frozen[2],) if setup.frozen else ()
  jitted = jax.jit(step, in_shardings=(setup.state_shardings, b_sh) + f_sh,
                   out_shardings=(setup.state_shardings, mesh_lib.replicated(setup.mesh)),
                   donate_argnums=0)
  global_shape = lambda v: (config.train.batch_size,) + np.shape(v)[1:]
  abstract_batch = {k: jax.ShapeDtypeStruct(global_shape(v), np.asarray(v).dtype, sharding=s)
                    for (k, v), s in zip(example_batch.items(), b_sh.values())}
  return jitted.trace(setup.abstract_state, abstract_batch, *setup_lib.frozen_args(setup))


def compile_step(setup: setup_lib.Setup, example_batch: dict):
  """The train step compiled ahead of time: (compiled, seconds of tracing and compiling)."""
  _, compiled, seconds = trace_and_compile_step(setup, example_batch)
  return compiled, seconds


def trace_and_compile_step(setup: setup_lib.Setup, example_batch: dict):
  """(trace_step's trace, the step compiled from it, seconds of both): the trace gives the
  model FLOPs (model_flops_per_device), the compiled step runs."""
  start = time.perf_counter()
  traced = trace_step(setup, example_batch)
  compiled = traced.lower().compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  mem = ""
  if memory is not None:
    mem = (f", temp {getattr(memory, 'temp_size_in_bytes', 0) / 2**20:.1f} MiB, arguments "
           f"{getattr(memory, 'argument_size_in_bytes', 0) / 2**20:.1f} MiB")
  xla = flops_lib.flops_per_step(compiled)
  logging.info("Compiled the train step in %.1f s%s%s", seconds, mem,
               f", {xla / 1e9:.4g} GFLOP per step per device (XLA cost analysis, loops "
               f"counted once)" if xla else "")
  return traced, compiled, seconds


def model_flops_per_device(traced, mesh) -> float:
  """Model FLOPs of one traced step per device: launch/flops.py's jaxpr count (loops counted
  per trip) / the mesh's devices, the work being split evenly over the mesh."""
  return flops_lib.jaxpr_flops(traced.jaxpr) / mesh.devices.size


def _flops_and_peak(traced, mesh, cfg) -> dict:
  """Progress's flops_per_step (model FLOPs per device) and peak_flops (the table's peak of
  the mesh's device kind for train.compute_dtype, None when unknown)."""
  flops = model_flops_per_device(traced, mesh)
  logging.info("Model FLOPs (matmuls and convolutions, launch/flops.py): %.4g GFLOP per step "
               "per device", flops / 1e9)
  device = mesh.devices.flat[0]
  dtype = cfg.get("compute_dtype", "float32")
  peak = flops_lib.device_peak_flops(device, dtype)
  logging.info("Peak of a %s device for %s compute: %s", device.device_kind, dtype,
               f"{peak / 1e12:g} TFLOP/s (launch/flops.py)" if peak else
               "unknown (no MFU in the progress line)")
  return {"flops_per_step": flops, "peak_flops": peak}


def _nonfinite_error(step, metrics, ckpt):
  ckpt.wait()  # commit the in-flight async save: the raise would otherwise lose that step
  latest = ckpt.latest_step()
  saved = (f"the latest checkpoint is step {latest}, from which the same command resumes"
           if latest is not None else
           f"no checkpoint has been saved yet (the first is due at step {ckpt.save_every}), "
           "so rerunning the command trains from scratch")
  return FloatingPointError(
      f"Non-finite loss or gradient at step {step} (loss={float(metrics['loss'])}). The update "
      f"was not applied and no checkpoint contains it; {saved}. Lower the learning rate or "
      f"clip gradients (--config.optim.lr, --config.optim.grad_clip), check the data, or pass "
      f"--config.train.nan_policy=skip to skip such updates.")


def check_phema_resume(ckpt: checkpoint_lib.Checkpointer, config):
  """Resuming must keep the post-hoc EMA settings: the profiles restored from the checkpoint
  have the saved stds, and a profile cannot start mid-run (it weights every update since
  step 1), so enabling, disabling or changing optim.phema.stds on resume is an error."""
  if ckpt.latest_step() is None:
    return
  try:
    saved = train_state.phema_stds(ckpt.restore_config().optim)
  except checkpoint_lib.CheckpointError:
    return    # no readable config: the restore that follows reports what is wrong
  wanted = train_state.phema_stds(config.optim)
  if saved != wanted:
    describe = lambda stds: f"stds {list(stds)}" if stds else "disabled"
    raise config_flags.InputError(
        f"{ckpt.directory} was trained with post-hoc EMA {describe(saved)}, but this config "
        f"has {describe(wanted)}: the profiles average every update since step 1, so they "
        f"cannot be switched on, off or changed mid-run. Resume with the saved setting "
        f"(--config.optim.phema.enabled={bool(saved)}"
        + (f" --config.optim.phema.stds='{tuple(saved)}'" if saved else "")
        + "), or train in a fresh workdir.")


def train(config, workdir: str, devices=None) -> dict:
  """Trains until config.train.num_steps; returns the last evaluation's metrics."""
  # ----------------------------------------------------------------------------- setup
  fs.require_writable(workdir)    # a missing bucket or no credentials: fail before any work
  setup = setup_lib.build(config, devices, workdir, workdir_lib.frozen_module(config))
  cfg = config.train
  logging.info("Mesh: %s", mesh_lib.describe(setup.mesh))
  loader = pipeline.make_loader(setup.source, global_batch_size=cfg.batch_size, seed=config.seed,
                                worker_count=config.data.worker_count)
  data_iter = iter(loader)
  ckpt = checkpoint_lib.Checkpointer(workdir, save_every=cfg.checkpoint_every,
                                     keep=cfg.keep_checkpoints)
  ckpt.install_sigterm_handler()
  check_phema_resume(ckpt, config)
  snapshots = None
  if train_state.phema_stds(config.optim):
    snapshots = phema_snapshots.Writer(workdir, config.optim.phema.snapshot_every,
                                       cfg.num_steps)

  # ----------------------------------------------------------------------------- state
  state = setup_lib.restore_or_init(setup, ckpt, data_iterator=data_iter)
  start_step = int(jax.device_get(state["step"]))
  writer = metric_writer.MetricWriter(workdir, resume_step=start_step)  # drops re-run rows
  num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  logging.info("Parameters: %.2fM; starting at step %d of %d", num_params / 1e6, start_step,
               cfg.num_steps)

  # --------------------------------------------------------------------------- compile
  first = next(data_iter) if start_step < cfg.num_steps else None
  compiled, flops_and_peak = None, {}
  if first is not None:
    traced, compiled, compile_s = trace_and_compile_step(
        setup, families.device_batch(first, setup.family.batch_keys))
    flops_and_peak = _flops_and_peak(traced, setup.mesh, cfg)
    xla_flops = flops_lib.flops_per_step(compiled)
    writer.write(start_step, {"compile_seconds": compile_s,
                              "flops_per_step_per_device": flops_and_peak["flops_per_step"],
                              **({"xla_flops_per_step_per_device": xla_flops}
                                 if xla_flops else {})})

  # ------------------------------------------------------------------------------ loop
  progress = metric_writer.Progress(start_step, cfg.num_steps, cfg.batch_size, **flops_and_peak)
  frozen = setup_lib.frozen_args(setup)
  eval_rng = jax.random.key(config.seed + 1)
  last_eval, pending = {}, None
  step = start_step
  try:
    while step < cfg.num_steps:
      batch = first if first is not None else next(data_iter)
      first = None
      state, metrics = compiled(state, setup_lib.put_batch(setup, batch), *frozen)
      step += 1
      # Check the previous step's metrics after dispatching this one (keeps the device busy).
      if pending is not None and cfg.nan_policy == "error" and pending[1]["nonfinite"] > 0:
        raise _nonfinite_error(pending[0], pending[1], ckpt)
      pending = (step, metrics)
      boundary = lambda every: every and (step % every == 0 or step == cfg.num_steps)
      if (boundary(cfg.log_every) or boundary(cfg.checkpoint_every)
          or ckpt.preemption_requested(step)):
        metrics = jax.device_get(metrics)
        pending = (step, metrics)
        if cfg.nan_policy == "error" and metrics["nonfinite"] > 0:
          raise _nonfinite_error(step, metrics, ckpt)
      if boundary(cfg.log_every):
        ckpt.check()
        if snapshots is not None:
          snapshots.check()
        shown = {k: metrics[k] for k in ("loss", "bpd", "grad_norm") if k in metrics}
        line = progress.line(step, shown)  # also measures steps/s, TFLOP/s and MFU
        writer.write(step, {**metrics, **progress.throughput}, prefix="train/")
        if distributed.is_main_process():
          logging.info(line)
      if boundary(cfg.eval_every) and setup.family.eval_terms is not None:
        last_eval = workdir_lib.evaluate_bpd(setup, state["ema"], split=config.data.eval_split,
                                             rng=jax.random.fold_in(eval_rng, step))
        writer.write(step, last_eval, prefix="eval/")
        logging.info("Eval at step %d: %.4f +- %.4f bits/dim (recon %.4f, prior %.4f, "
                     "diffusion %.4f) over %d examples", step, last_eval["bpd"],
                     last_eval["bpd_stderr"], last_eval["bpd_recon"], last_eval["bpd_prior"],
                     last_eval["bpd_diffusion"], last_eval["num_examples"])
      if boundary(cfg.sample_every):
        sample_rng = jax.random.fold_in(jax.random.fold_in(eval_rng, step), 1)
        samples = workdir_lib.sample_images(setup, state["ema"], sample_rng,
                                            num=config.eval.num_samples,
                                            num_steps=config.eval.sample_steps)
        workdir_lib.write_samples(setup, samples,
                                  fs.join(workdir, "samples", f"step_{step:08d}.png"))
        writer.write_image(step, "samples", workdir_lib.preview(samples,
                                                                setup.source.num_levels))
      if ckpt.save(step, state, data_state=data_iter, config=config,
                   force=step == cfg.num_steps):
        writer.flush()   # metrics up to a checkpoint are on disk (GCS) when it is
      if snapshots is not None:
        snapshots.maybe_save(step, state, config)
      if ckpt.preemption_requested(step):
        # A SIGTERM that landed just after save() above: save now (a no-op if saved already).
        ckpt.save(step, state, data_state=data_iter, config=config, force=True)
        logging.warning("Preemption requested: saved step %d, exiting.", step)
        break
  finally:
    # Also on errors: finish an in-flight async save (earlier steps stay restorable) and
    # give the SIGTERM handler back.
    ckpt.close()
    if snapshots is not None:
      snapshots.close()
    writer.close()
  return last_eval
