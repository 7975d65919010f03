"""Bits per dimension of a whole dataset split from the VLB.

Unlike the reference code (100 random batches), every example of the split is visited
exactly once, with K independent draws of (t, eps) each. Reported: the mean bits/dim, its
standard error over examples (each example's K draws averaged first, so the error covers
both data and estimator noise), and the three VLB terms separately.

The caller supplies the batches (with a "mask" marking real examples, as
`launch.data.pipeline.epoch_iterator` yields them) and a jitted function returning the
per-example terms; this module does only the bookkeeping, so it runs the same under one
device or a mesh.
"""

import math
from typing import Callable, Iterable

import jax
import numpy as np

TERMS = ("recon", "prior", "diffusion")


def vlb_bits_per_dim(per_example_terms: Callable, batches: Iterable[dict], rng, *,
                     num_time_samples: int, num_dims: int, progress: Callable | None = None,
                     terms: tuple = TERMS) -> dict:
  """Full-pass VLB in bits/dim (or any per-example negative log-likelihood split into `terms`,
  e.g. terms=("ode",) for the probability-flow ODE bound of vdm.ode_likelihood).

  per_example_terms(batch, rng) -> {"recon", "prior", "diffusion"}: arrays [B] in nats,
    optionally with "mask" [B] (then used instead of batch["mask"]).
  Returns {"bpd", "bpd_stderr", "bpd_<term>" for each term, "num_examples"}.
  """
  if num_time_samples < 1:
    raise ValueError(f"num_time_samples must be >= 1, got {num_time_samples}")
  to_bits = 1.0 / (num_dims * math.log(2.0))
  per_term = {name: [] for name in terms}
  for i, batch in enumerate(batches):
    mask = np.asarray(batch["mask"], bool)
    sums = {name: 0.0 for name in terms}
    for k in range(num_time_samples):
      key = jax.random.fold_in(jax.random.fold_in(rng, i), k)
      values = jax.device_get(per_example_terms(batch, key))
      # Under several processes the values cover the global batch: they carry its mask.
      mask = np.asarray(values.get("mask", mask), bool)
      for name in terms:
        sums[name] = sums[name] + np.asarray(values[name], np.float64)
    for name in terms:
      per_term[name].append(sums[name][mask] / num_time_samples)
    if progress is not None:
      progress(i + 1, int(sum(len(a) for a in per_term[terms[0]])))
  per_term = {name: np.concatenate(v) * to_bits for name, v in per_term.items()}
  total = sum(per_term.values())
  n = total.shape[0]
  if n == 0:
    raise ValueError("the evaluation split has no examples")
  result = {f"bpd_{name}": float(v.mean()) for name, v in per_term.items()}
  result.update(bpd=float(total.mean()),
                bpd_stderr=float(total.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
                num_examples=n)
  return result
