"""Scanned layers: runs of identical blocks with stacked parameters, and a remat switch.

A deep net built from N identical blocks compiles N copies of the block body when it is
unrolled; XLA's compile time and HLO size then grow with N (the CIFAR-10 VDM score U-Net
has 32 + 33 blocks). Here the N blocks are created once with `nnx.vmap`, so every block
parameter carries a leading [N] axis, and the blocks run either with `jax.lax.scan` over
that stacked state (one compiled block body, whatever N) or with an unrolled Python loop
over slices of the same state. Both modes share one parameter layout, hence one
checkpoint layout: `scan` is a compile-time choice, not a model change.

Sharding: the stacked axis has the logical name None (`nnx.PARTITION_NAME` metadata of the
vmap), so the mesh rules shard every block's own axes exactly as before and replicate the
layer axis (a block's weights are split within the block, not across blocks).

Remat (activation recomputation in the backward pass, `jax.checkpoint` around one block):
  "none"   keep every activation of the forward pass (fastest, most memory);
  "block"  save only each block's inputs; recompute the block in the backward pass;
  "dots"   also save the results of matmuls without batch dimensions
           (`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`: dense layers and
           the q/k/v/out projections of attention). Convolutions are not dots, so in a conv
           U-Net this saves little beyond "block".
All three give the same values and gradients (tests/test_scanned_layers.py).

`stacked` builds the N blocks and `run_stacked` applies them (`imagen/t5.py`'s encoder
layers); `Stack` is the two as one module (the score U-Net's down and up stacks). `Chain`
is a sequence of blocks built from per-block specs in which each maximal run of equal
specs becomes a `Stack` and a block whose neighbours differ stays a plain module (the ADM
and Efficient U-Nets, whose first block of a level may change the channel count).
"""

from typing import Any, Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

REMAT_POLICIES = ("none", "block", "dots")

# Block body: fn(block, carry, x) -> (carry, y). `x` is the block's slice of xs (or None),
# `y` its output to collect (or None).
Body = Callable[[nnx.Module, Any, Any], tuple[Any, Any]]


def check_remat(remat: str) -> str:
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r} is not a remat policy; choose one of {REMAT_POLICIES} "
                     "('none': no recomputation, 'block': jax.checkpoint of each block, "
                     "'dots': also save matmul results)")
  return remat


def checkpointed(fn: Callable, remat: str, *, scanned: bool) -> Callable:
  """`fn` wrapped in `jax.checkpoint` for the remat policy ("none" returns fn itself).

  Under `lax.scan` the scan already keeps XLA from merging recomputation with the forward
  pass, so CSE prevention is off there, as JAX recommends.
  """
  if check_remat(remat) == "none":
    return fn
  policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "dots"
            else None)
  return jax.checkpoint(fn, policy=policy, prevent_cse=not scanned)


def stacked(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
  """`make(rngs)` built n times as one module whose parameters have a leading [n] axis.

  Each block gets its own split of every rng stream (`nnx.split_rngs`); the [n] axis has
  the logical name None (replicated by every mesh rule set).
  """
  if n < 1:
    raise ValueError(f"a stack needs at least one block, got n={n}")

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
  def build(rngs):
    return make(rngs)

  return build(rngs)


def block_keys(key: jax.Array | None, n: int) -> jax.Array | None:
  """n dropout keys stacked on a leading axis (scan xs), or None when `key` is None."""
  return None if key is None else jax.random.split(key, n)


def _unstack(tree, n: int) -> list:
  """The n slices of a tree along the leading axis, by one `unstack` per leaf: its gradient
  is one `stack`, where n separate slices a[i] would each add a zero-padded full-size
  array (O(n^2) memory traffic in the backward pass)."""
  leaves, treedef = jax.tree.flatten(tree)
  columns = [jnp.unstack(leaf) for leaf in leaves]
  return [treedef.unflatten([c[i] for c in columns]) for i in range(n)]


def _stack(trees: Sequence):
  return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def run_stacked(blocks: nnx.Module, fn: Body, carry, xs=None, *, scan: bool = True,
                remat: str = "none"):
  """Applies the n blocks of `stacked(...)`: `carry, y_i = fn(block_i, carry, x_i)`.

  x_i is slice i of every leaf of xs (leading axis n; xs may be None). Returns (carry, ys),
  the y_i stacked on a new leading axis (None if fn returns None). `scan=True` runs one
  `jax.lax.scan` over the stacked state (one compiled block body); `scan=False` an unrolled
  loop over slices of the same state. One block is the blocks' graph merged with a slice
  of their state; a functional scan (rather than nnx.scan) keeps this callable with the
  net's state closed over under jax.jit.
  """
  graphdef, state = nnx.split(blocks)
  n = jax.tree.leaves(state)[0].shape[0]

  def step(carry, state_x):
    block_state, x = state_x
    return fn(nnx.merge(graphdef, block_state), carry, x)

  step = checkpointed(step, remat, scanned=scan)
  if scan:
    return jax.lax.scan(step, carry, (state, xs))
  ys = []
  for state_x in _unstack((state, xs), n):
    carry, y = step(carry, state_x)
    ys.append(y)
  return carry, (None if ys[0] is None else _stack(ys))


class Stack(nnx.Module):
  """n blocks made by `make(rngs)`, stacked (`stacked`), applied in order (`run_stacked`).

  `stack(fn, carry, xs=None)` -> (carry, ys) with `carry, y_i = fn(block_i, carry, x_i)`.

  Args:
    make: builds one block from rngs (called once, under nnx.vmap).
    n: number of blocks (>= 1).
    scan: run with jax.lax.scan (one compiled body) or an unrolled loop (same result).
    remat: "none" | "block" | "dots" (see the module docstring).
  """

  def __init__(self, make: Callable[[nnx.Rngs], nnx.Module], n: int, *, scan: bool = True,
               remat: str = "none", rngs: nnx.Rngs):
    self.n, self.scan, self.remat = int(n), bool(scan), check_remat(remat)
    self.layers = stacked(make, n, rngs)

  def __len__(self):
    return self.n

  def __call__(self, fn: Body, carry, xs=None):
    return run_stacked(self.layers, fn, carry, xs, scan=self.scan, remat=self.remat)


def runs(specs: Sequence[Hashable]) -> list[tuple[Hashable, int]]:
  """Maximal runs of equal consecutive specs: [a, a, b, a] -> [(a, 2), (b, 1), (a, 1)]."""
  out = []
  for spec in specs:
    if out and out[-1][0] == spec:
      out[-1] = (spec, out[-1][1] + 1)
    else:
      out.append((spec, 1))
  return out


class Chain(nnx.Module):
  """Blocks `make(spec_i, rngs)` applied in order; each run of >= 2 equal specs is a Stack.

  `chain(fn, carry, xs=None)` -> (carry, ys): `carry, y_i = fn(block_i, carry, x_i)` over
  all len(specs) blocks. Unlike a Stack, xs is a sequence with one pytree per block (or
  None) and ys a list with one output per block, since blocks of different specs may take
  and give differently shaped values; within a run they are stacked for the scan, so equal
  specs must mean equally shaped x_i (put whatever fixes those shapes into the spec). A
  block alone in its run is a plain module (no stacked axis), run under the same remat.
  """

  def __init__(self, make: Callable[[Hashable, nnx.Rngs], nnx.Module],
               specs: Sequence[Hashable], *, scan: bool = True, remat: str = "none",
               rngs: nnx.Rngs):
    self.remat = check_remat(remat)
    self.lengths = tuple(n for _, n in runs(specs))
    self.segments = nnx.List([
        Stack(lambda r, s=spec: make(s, r), n, scan=scan, remat=remat, rngs=rngs) if n > 1
        else make(spec, rngs)
        for spec, n in runs(specs)])

  def __len__(self):
    return sum(self.lengths)

  def __call__(self, fn: Body, carry, xs: Sequence | None = None):
    xs = [None] * len(self) if xs is None else list(xs)
    if len(xs) != len(self):
      raise ValueError(f"Chain of {len(self)} blocks got {len(xs)} per-block inputs")
    ys, start = [], 0
    for segment, n in zip(self.segments, self.lengths):
      seg_xs = xs[start:start + n]
      start += n
      if isinstance(segment, Stack):
        carry, y = segment(fn, carry, _stack(seg_xs))
        ys += [None] * n if y is None else _unstack(y, n)
      else:
        graphdef, state = nnx.split(segment)
        step = checkpointed(lambda c, sx, g=graphdef: fn(nnx.merge(g, sx[0]), c, sx[1]),
                            self.remat, scanned=False)
        carry, y = step(carry, (state, seg_xs[0]))
        ys.append(y)
    return carry, ys
