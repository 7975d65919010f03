"""Sharding constraints on activations, named by logical axes, applied by whoever owns the mesh.

Nets call `constrain(x, names)` at block boundaries, naming each dim of an activation with
the logical names of launch/mesh.py: "batch", "frames", "length", "height", "width",
"channels" (None for a dim no rule should touch). With no hook active this is the identity,
so a net never needs a mesh (one device, tests, numpy references). The launch side, which
holds the mesh and the logical-to-mesh rules, activates a hook while it traces a step:

    with sharding.use(hook):        # hook(x, names) -> x, e.g. jax.lax.with_sharding_constraint
      loss, metrics, grads = loss_and_grads(...)

Why. Under FSDP a conv kernel [3, 3, in, out] is split over the "fsdp" mesh axis on its
output channels and the activations are split over the same axis on the batch. Left to
propagate from the parameters, GSPMD sometimes keeps the kernel in place and moves the
activations instead: it all-gathers a micro-batch's activations, computes output-channel
shards, all-to-alls them back to batch shards, and in the backward pass all-reduces
activation-sized partial sums, which is megatron-style tensor parallelism with the batch
replicated, not ZeRO-3. Pinning every block's input and output to batch shards (channels
replicated) leaves the all-gather of the weights as the only cheap way through.
"""

import contextlib
import contextvars
from typing import Callable, Sequence

import jax

Hook = Callable[[jax.Array, tuple], jax.Array]

IMAGE = ("batch", "height", "width", "channels")    # NHWC activations
VIDEO = ("batch", "frames", "height", "width", "channels")
TOKENS = ("batch", "length", "channels")             # text tokens, attention sequences
VECTOR = ("batch", "channels")                      # per-example embeddings
FOLDED = ("batch", "frames")   # one dim holding a video's frames folded into its batch

_HOOK: contextvars.ContextVar[Hook | None] = contextvars.ContextVar("activation_sharding",
                                                                   default=None)


@contextlib.contextmanager
def use(hook: Hook | None):
  """Activates `hook(x, names) -> x` for the `constrain` calls traced inside the block."""
  token = _HOOK.set(hook)
  try:
    yield
  finally:
    _HOOK.reset(token)


def active() -> Hook | None:
  """The active hook, or None."""
  return _HOOK.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`x` under the active hook's sharding for the logical `names` (identity without a hook)."""
  hook = _HOOK.get()
  if hook is None:
    return x
  names = tuple(names)
  if len(names) != x.ndim:
    raise ValueError(f"activation of shape {tuple(x.shape)} given {len(names)} logical names "
                     f"{names}: give one name (or None) per dim")
  return hook(x, names)


def folding_frames(hook: Hook | None) -> Hook | None:
  """The hook for layers that see a video's frames folded into the batch ([B * F, ...],
  frame-minor): their "batch" dim is split as the batch and the frames both are (FOLDED),
  so a rule that splits the frames (launch/mesh.py "fsdp_frames") keeps them split through
  the per-frame layers instead of gathering every frame to every chip. Names that already
  hold "frames" (the unfolded [B, F, ...] views) pass through unchanged."""
  if hook is None:
    return None

  def folded(x, names):
    if "frames" not in names:
      names = tuple(FOLDED if n == "batch" else n for n in names)
    return hook(x, names)

  return folded
