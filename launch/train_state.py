"""The train state (a plain pytree), the optimizer, and the train step shared by every family.

state = {"step": int32[], "params": nnx.State, "opt_state": optax state, "ema": nnx.State,
         "rng": uint32 key data}

With optim.phema.enabled, the optimizer chain ends in vdm.posthoc_ema.power_ema, so the
opt_state also holds the post-hoc EMA profiles (EDM2), one params-shaped tree per
optim.phema.stds: every reader that rebuilds the optimizer from the saved config restores
them, and the non-finite guard skips them with the update.

A family supplies `loss_and_grads(params, batch, rng) -> (loss, metrics, grads)`; this module
adds gradient accumulation over micro-batches, the optimizer update, the EMA, and the
non-finite guard: a NaN/Inf loss or gradient leaves the state unchanged and reports
`nonfinite = 1`, so a poisoned update is never applied (the trainer then stops or skips).
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from vdm import posthoc_ema


def learning_rate_schedule(cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to cfg.lr, then constant, cosine or linear decay to 0 at total_steps."""
  warmup = max(int(cfg.warmup_steps), 0)
  rest = max(total_steps - warmup, 1)
  decays = {
      "constant": optax.constant_schedule(cfg.lr),
      "cosine": optax.cosine_decay_schedule(cfg.lr, rest),
      "linear": optax.linear_schedule(cfg.lr, 0.0, rest),
  }
  if cfg.decay not in decays:
    raise ValueError(f"unknown optim.decay {cfg.decay!r}; choose one of {sorted(decays)}")
  if warmup == 0:
    return decays[cfg.decay]
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decays[cfg.decay]],
                              [warmup])


def weight_decay_mask(params):
  """Decay matrices and conv kernels only: biases, norm scales and 1-D/scalar params are exempt."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


OPTIMIZERS = ("adamw", "adafactor")


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
  """cfg.name (default adamw) with warmup + decay, global-norm clipping and a weight-decay
  mask.

  "adafactor" (Shazeer & Stern 2018; Imagen trains its 2B base model with it) keeps factored
  second moments (a row and a column vector per matrix) and no first moment, so its state
  is a small fraction of Adam's two full copies of the parameters. Its step is the plain
  learning rate times the normalised update (no relative-to-parameter-scale step, no update
  clipping), so cfg.lr means what it means for Adam.

  cfg.phema.enabled (default off) appends the post-hoc EMA profiles of cfg.phema.stds
  (`phema_stds`).
  """
  name = cfg.get("name", "adamw")
  schedule = learning_rate_schedule(cfg, total_steps)
  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  if name == "adamw":
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=weight_decay_mask))
  elif name == "adafactor":
    parts.append(optax.adafactor(schedule, multiply_by_parameter_scale=False,
                                 clipping_threshold=None, momentum=None,
                                 weight_decay_rate=cfg.weight_decay or None,
                                 weight_decay_mask=weight_decay_mask))
  else:
    raise ValueError(f"unknown optim.name {name!r}; choose one of {OPTIMIZERS}")
  stds = phema_stds(cfg)
  if stds:
    parts.append(posthoc_ema.power_ema(stds))
  return optax.chain(*parts)


def phema_stds(cfg) -> tuple[float, ...]:
  """The post-hoc EMA stds that config.optim `cfg` tracks: () when optim.phema is absent
  (configs older than it) or disabled; a clear error for stds no power function has."""
  phema = cfg.get("phema")
  if phema is None or not phema.get("enabled", False):
    return ()
  stds = tuple(float(s) for s in phema.stds)
  if not stds:
    raise ValueError("optim.phema.enabled needs at least one std in optim.phema.stds, e.g. "
                     "(0.05, 0.10) as in EDM2")
  try:
    posthoc_ema.exponent_of_std(stds)
  except ValueError as e:
    raise ValueError(f"optim.phema.stds={stds}: {e}") from None
  return stds


def init_state(params, tx: optax.GradientTransformation, seed: int) -> dict:
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "ema": jax.tree.map(jnp.copy, params),
          "rng": jax.random.key_data(jax.random.key(seed))}


def ema_decay_at(step, decay: float):
  """EMA decay warmed up as min(decay, (1 + step) / (10 + step)), so early averages are not
  dominated by the random init (as in the TF/JAX diffusion codebases)."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def _micro_batches(batch, num: int):
  """[B, ...] -> [num, B / num, ...], micro-batch j holding examples j, j + num, ..., so each
  micro-batch spans every data-parallel shard."""
  def split(a):
    if a.shape[0] % num:
      raise ValueError(f"batch size {a.shape[0]} is not divisible by train.grad_accum={num}")
    return jnp.swapaxes(a.reshape((a.shape[0] // num, num) + a.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(loss_and_grads: Callable, tx: optax.GradientTransformation, *,
                    ema_decay: float, grad_accum: int = 1, param_shardings=None) -> Callable:
  """Returns step(state, batch, *frozen) -> (state, metrics), to be jitted by the trainer.

  `frozen` are untrained inputs of the loss (e.g. a frozen T5 encoder's weights), passed as
  arguments rather than closed over so that they are sharded, not baked into the program.
  `param_shardings` (the params' shardings, optional): the gradients and the
  gradient-accumulation sum are constrained to them, so under FSDP each micro-batch's
  gradients are reduce-scattered into the parameters' shards and the sum carried across
  micro-batches is sharded like the parameters, never a whole copy per device.
  """

  def like_params(grads):
    if param_shardings is None:
      return grads
    return jax.lax.with_sharding_constraint(grads, param_shardings)

  def grads_of(params, batch, rng, *frozen):
    if grad_accum == 1:
      loss, metrics, grads = loss_and_grads(params, batch, rng, *frozen)
      return loss, metrics, like_params(grads)

    def body(carry, micro):
      i, (loss, metrics, grads) = carry[0], carry[1]
      l, m, g = loss_and_grads(params, micro, jax.random.fold_in(rng, i), *frozen)
      add = lambda a, b: jax.tree.map(jnp.add, a, b)
      return (i + 1, (loss + l, add(metrics, m), like_params(add(grads, like_params(g))))), None

    micro = _micro_batches(batch, grad_accum)
    first = jax.tree.map(lambda a: a[0], micro)
    shapes = jax.eval_shape(loss_and_grads, params, first, rng, *frozen)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    zeros = (zeros[0], zeros[1], like_params(zeros[2]))
    (_, totals), _ = jax.lax.scan(body, (0, zeros), micro)
    loss, metrics, grads = jax.tree.map(lambda a: a / grad_accum, totals)
    return loss, metrics, like_params(grads)

  def step(state, batch, *frozen):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    loss, metrics, grads = grads_of(state["params"], batch, rng, *frozen)
    finite = jnp.isfinite(loss) & _all_finite(grads)

    def apply(trained):
      params, opt_state, ema = trained
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      d = ema_decay_at(state["step"], ema_decay)
      ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
      return params, opt_state, ema

    # A non-finite update is never applied; the step counter still moves on (skip policy).
    # One lax.cond over the whole update, not a jnp.where per leaf: the per-leaf select made
    # XLA copy the all-leaves finiteness test into every fusion, so the optimized HLO grew
    # quadratically with depth (bench/README.md, "Compile time against depth").
    trained = (state["params"], state["opt_state"], state["ema"])
    params, opt_state, ema = jax.lax.cond(finite, apply, lambda t: t, trained)
    new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "ema": ema,
           "rng": state["rng"]}
    metrics = dict(metrics, grad_norm=optax.global_norm(grads),
                   nonfinite=1.0 - finite.astype(jnp.float32))
    return new, metrics

  return step
