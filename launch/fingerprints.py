"""Exact integer fingerprints of a train state's arrays, stored beside every checkpoint.

OCDBT checksums its b-tree nodes but not the array chunks, so a flipped byte inside a chunk
restores silently with a wrong value; comparing these fingerprints after every restore
catches it. A fingerprint is an integer sum over the array's bits, independent of the mesh
and of the reduction order: saved on 8 devices, restored on 1, it is the same.
"""

from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np


def _fingerprintable(dtype) -> bool:
  """Whether `_words` can view this dtype's bits (not sub-byte types such as int4)."""
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or dtype == np.bool_:
    return True
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return True
  if jnp.issubdtype(dtype, jnp.floating):
    bits = jnp.finfo(dtype).bits
  elif jnp.issubdtype(dtype, jnp.integer):
    bits = jnp.iinfo(dtype).bits
  else:
    return False
  return bits == 8 * np.dtype(dtype).itemsize and bits in (8, 16, 32, 64)


def _words(x):
  """The bits of `x` as uint32 words (no rounding: bitcasts, then widening)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return _words(jax.random.key_data(x))
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    return jnp.stack([_words(x.real), _words(x.imag)])
  size = x.dtype.itemsize
  if size in (4, 8):  # 8-byte types gain a trailing axis of two words
    return lax.bitcast_convert_type(x, jnp.uint32)
  narrow = {1: jnp.uint8, 2: jnp.uint16}[size]
  return lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)


def _fingerprint(x):
  """sum_i (2 i + 1) w_i mod 2^32 over the row-major word index i.

  The weights are odd, hence invertible mod 2^32: changing any single word changes the
  sum, and weighting by position makes moved or swapped words count as well. Integer
  arithmetic makes it exact whatever the sharding and reduction order, so a state saved
  on 8 devices and restored on 1 has the same fingerprint.
  """
  w = _words(x)
  index = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(w.ndim)):
    index += lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= w.shape[axis]
  return jnp.sum((2 * index + 1) * w, dtype=jnp.uint32)


_fingerprints_jit = jax.jit(lambda xs: [_fingerprint(x) for x in xs])


def state_fingerprints(state) -> dict[str, dict[str, Any]]:
  """{leaf path: {"dtype", "shape", "fingerprint"}} for every array leaf of `state`.

  Leaves are grouped by the devices they live on (one jitted call per group), since one
  jitted computation cannot mix arrays committed to different device sets.
  """
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  groups: dict[frozenset, list] = {}
  for path, leaf in leaves:
    if not _fingerprintable(leaf.dtype):
      continue
    if not isinstance(leaf, jax.Array):
      leaf = jnp.asarray(leaf)
    groups.setdefault(frozenset(leaf.sharding.device_set), []).append((path, leaf))
  out = {}
  for members in groups.values():
    values = jax.device_get(_fingerprints_jit([leaf for _, leaf in members]))
    for (path, leaf), value in zip(members, values):
      out[jax.tree_util.keystr(path)] = {
          "dtype": str(leaf.dtype), "shape": list(leaf.shape), "fingerprint": int(value)}
  return out
