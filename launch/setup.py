"""A run's setup, built from its config: mesh, data source, model definition, optimizer and
the abstract, sharded train state, plus the small helpers that put batches and frozen
modules onto that mesh. The trainer, the workdir helpers and the ahead-of-time compiler all
start here, so a model is built and sharded the same way wherever it runs.
"""

import dataclasses
import functools
import logging
import math

import jax
import numpy as np
from flax import nnx

from launch import checkpoint as checkpoint_lib
from launch import config_flags, distributed, families, mesh as mesh_lib, train_state
from launch.data import pipeline
from vdm.nets import sharding as activation_sharding


@dataclasses.dataclass
class Setup:
  """Everything derived from a config that training, evaluation and sampling share."""
  config: object
  family: families.Family   # the config's family, its functions bound to this mesh (on_mesh)
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


def check_batch_sizes(config, devices=None):
  """Raises config_flags.InputError, naming the batch size, the device and process counts
  and the fix, if the batches of a training run would not split evenly over the mesh.

  Every batch is sharded over the mesh's data axes (data x fsdp) and loaded in equal parts
  by the processes, so train.batch_size (and eval.batch_size, when training evaluates)
  must be a multiple of both counts. The training entry points call this before anything
  is built or written; `build` does not, since evaluating or sampling a trained run on
  other devices needs only its own batches to divide.
  """
  distributed.initialize()
  mesh = mesh_lib.make_mesh(config.mesh.ici, config.mesh.dcn, devices=devices)
  shards, processes = mesh_lib.batch_shards(mesh), jax.process_count()
  unit = math.lcm(shards, processes)
  keys = ["train.batch_size"] + (["eval.batch_size"] if config.train.eval_every else [])
  for key in keys:
    section, name = key.split(".")
    size = int(config[section][name])
    if size >= unit and size % unit == 0:
      continue
    sizes = sorted({max(unit, size // unit * unit), -(-size // unit) * unit})
    axes = " x ".join(f"{a}={mesh.shape[a]}" for a in mesh_lib.BATCH_AXES)
    raise config_flags.InputError(
        f"{key}={size} does not split evenly over this run's devices: the mesh has "
        f"{shards} batch shards ({axes}, over {mesh.devices.size} devices) and "
        f"{processes} process{'es' if processes > 1 else ''}, so the batch size must be a "
        f"multiple of {unit}. Pass e.g. "
        + " or ".join(f"--config.{key}={n}" for n in sizes)
        + ", or change the mesh (mesh.ici in the config).")


def data_source(config, split, workdir=None):
  """A split's source; a family may wrap it (e.g. Imagen adds cached text embeddings)."""
  family = families.get_family(config.family)
  source = family.get_source(config, split) if family.get_source else None
  if source is None:
    source = pipeline.get_source(config.data.name, split, data_dir=config.data.data_dir or None)
  return family.wrap_source(config, source, split, workdir) if family.wrap_source else source


def build(config, devices=None, workdir=None, frozen_module=None, source=None) -> Setup:
  """Mesh, data source, model definition and the abstract, sharded train state.

  devices: the devices of the mesh (default: all); tests pass a subset to compare meshes,
    `launch.aot` the devices of a TPU topology description.
  workdir: where a family may keep derived data (Imagen's text-embedding cache).
  frozen_module: the family's frozen module (T5, a distillation teacher; see
    `launch.workdir.frozen_module`), sharded here by the config's rules, or None. An
    abstract module (`nnx.eval_shape`) stays abstract: its state gets shardings, no values.
  source: the training split's source (default: `data_source` of config.data.train_split);
    only its metadata (levels, image shape, classes) shapes the model."""
  distributed.initialize()
  _check_config(config)
  family = families.get_family(config.family)
  mesh = mesh_lib.make_mesh(config.mesh.ici, config.mesh.dcn, devices=devices)
  if source is None:
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
  family = on_mesh(family, mesh, config.mesh.rules, param_sh)
  frozen = ()
  if frozen_module is not None:
    # A frozen module (e.g. the T5 encoder) goes into the step as a sharded argument.
    f_graphdef, f_state = nnx.split(frozen_module)
    f_shardings = mesh_lib.param_shardings(f_state, mesh, config.mesh.rules)
    frozen = (f_graphdef, jax.tree.map(_place, f_state, f_shardings), f_shardings)
  setup = Setup(config, family, mesh, source, graphdef, tx, abstract, shardings, workdir,
                frozen)
  setup.init = jax.jit(init, out_shardings=shardings)
  return setup


def on_mesh(family: families.Family, mesh, rules, param_sh) -> families.Family:
  """The family with its functions traced under the mesh's activation shardings, and the
  gradients of `loss_and_grads` constrained to the parameters' shardings.

  Nets name their activations at block boundaries (`vdm.nets.sharding.constrain`); here
  those names get this mesh's shardings (`mesh.activation_hook`) whenever the trainer, the
  evaluator, the sampler or `launch.aot` traces a family function. Under FSDP this keeps the
  batch split and the channels whole, so GSPMD all-gathers the weights, as ZeRO-3 means,
  instead of all-gathering activations around convs whose kernels are split over "fsdp"
  and all-reducing activation-sized partial sums in the backward pass. Each call's
  gradients are pinned to the parameters' shardings, so they are reduced into shards, never
  held whole, and the gradient-accumulation sum of `train_state.make_train_step` adds
  sharded terms.
  """
  hook = mesh_lib.activation_hook(mesh, rules)

  def traced_on_mesh(fn):
    if fn is None:
      return None

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
      with activation_sharding.use(hook):
        return fn(*args, **kwargs)
    return wrapped

  loss_and_grads = traced_on_mesh(family.loss_and_grads)

  @functools.wraps(family.loss_and_grads)
  def constrained_loss_and_grads(*args, **kwargs):
    loss, metrics, grads = loss_and_grads(*args, **kwargs)
    return loss, metrics, jax.lax.with_sharding_constraint(grads, param_sh)

  return dataclasses.replace(
      family, loss_and_grads=constrained_loss_and_grads, sample=traced_on_mesh(family.sample),
      eval_terms=traced_on_mesh(family.eval_terms), ode_terms=traced_on_mesh(family.ode_terms))


def _place(value, sharding):
  """A frozen array onto its shards; an abstract one (ShapeDtypeStruct) just gets them."""
  if isinstance(value, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
  return jax.device_put(value, sharding)


def batch_shardings(setup: Setup, batch: dict):
  return {k: mesh_lib.input_sharding(setup.mesh, k, np.shape(v), setup.config.mesh.rules)
          for k, v in batch.items()}


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


def cached_jit(setup: Setup, key, fn, **jit_kwargs):
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
