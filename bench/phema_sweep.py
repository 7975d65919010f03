r"""Post-hoc EMA sweep (run by hand): bits/dim and sample quality against the EMA length.

  python bench/phema_sweep.py --workdir runs/phema_digits \
      --std 0.02,0.035,0.05,0.075,0.10,0.15,0.20 [--num 594] [--steps 64] [--seed 0]
      [--step N] [--num_time_samples K]

For a digits run trained with optim.phema.enabled, reconstructs the EMA of each --std
(`python -m launch.phema`, writing <workdir>/phema_std<std>; existing ones are reused) and
scores it, beside the run's own EMA (optim.ema_decay, with the trainer's warm-up; its
relative std is computed from its weights) and the raw parameters of the last checkpoint
(with --step: all at that step, which must be a snapshot and a checkpoint step):

- bits/dim of the eval split exactly as `python -m launch.evaluate [--num_time_samples K]`
  computes it (same config, same key), so every row sees the same examples and (t, eps)
  draws;
- FD: the Frechet distance of --num DDIM samples (--steps steps) to the 297 real test
  digits in the features of evaluation/digits_classifier.py, drawn in batches of at most
  297 (batch k with key fold_in(seed, k)), the same keys for every row.

Prints one JSON line per row and a Markdown table (EDM2 fig. 5's shape: quality against
sigma_rel).
"""

import argparse
import json
import os
import sys
import time


def ema_relative_std(decay: float, num_steps: int) -> float:
  """Relative std (EDM2's sigma_rel) of the trainer's EMA after `num_steps` updates: the
  std of the update times weighted by their EMA weights, over num_steps. Update tau uses
  decay min(decay, tau / (9 + tau)) (launch/train_state.ema_decay_at at step tau - 1)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  w = np.zeros(num_steps)
  for tau in range(1, num_steps + 1):
    d = min(decay, tau / (9.0 + tau))
    w *= d
    w[tau - 1] += 1.0 - d
  w /= w.sum()   # the init's leftover weight prod(d) is negligible here
  x = (np.arange(1, num_steps + 1) - 0.5) / num_steps
  mean = np.sum(w * x)
  return float(np.sqrt(np.sum(w * (x - mean) ** 2)))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="A digits run trained with phema.")
  p.add_argument("--std", default="0.02,0.035,0.05,0.075,0.10,0.15,0.20")
  p.add_argument("--num", type=int, default=594, help="Samples per row for the FD.")
  p.add_argument("--steps", type=int, default=64, help="DDIM steps per sample.")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--max_error", type=float, default=0.05)
  p.add_argument("--step", type=int, default=None, help="Snapshot and checkpoint step "
                 "(default: the last).")
  p.add_argument("--num_time_samples", type=int, default=None, help="(t, eps) draws per "
                 "example for bits/dim (default: the config's eval.num_time_samples).")
  args = p.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from evaluation import digits_classifier  # pylint: disable=g-import-not-at-top
  from launch import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from launch import fs, metric_writer, phema  # pylint: disable=g-import-not-at-top
  from launch import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  metric_writer.setup_logging()

  stds = phema.parse_stds(args.std)
  outs = [phema.output_dir(args.workdir, s, args.step) for s in stds]
  todo = [s for s, out in zip(stds, outs) if not checkpoint_lib.saved_steps(out)]
  if todo:
    setup, step, totals, reports = phema.reconstruct(args.workdir, todo, args.step,
                                                     max_error=args.max_error)
    out_setup = phema.output_setup(setup)
    for std, params, report in zip(todo, totals, reports):
      phema.write_workdir(out_setup, step, params,
                          phema.output_dir(args.workdir, std, args.step), report)

  # One setup (the run's) for every row, so evaluation and sampling compile once.
  setup, state, ckpt = workdir_lib.load_workdir(
      args.workdir, args.step, {"eval.num_time_samples": args.num_time_samples})
  ckpt.close()
  config = setup.config
  if config.data.name != "digits":
    raise SystemExit(f"{args.workdir} is not a digits run: the FD here needs the digits")
  last = int(jax.device_get(state["step"]))
  rows = [("raw params", None, None, state["params"]),
          (f"training EMA (decay {config.optim.ema_decay})",
           ema_relative_std(config.optim.ema_decay, last), None, state["ema"])]
  for std, out in zip(stds, outs):
    reader = checkpoint_lib.Checkpointer(out, save_every=1, keep=1, read_only=True)
    ema = reader.restore_items(setup.abstract_state, ("ema",))["ema"]
    reader.close()
    report = json.loads((fs.path(out) / "phema.json").read_text(encoding="utf-8"))
    rows.append((f"post-hoc EMA std {std:g}", std, report["relative_profile_error"], ema))

  results = []
  for name, std, error, params in rows:
    start = time.perf_counter()
    bpd = workdir_lib.evaluate_bpd(setup, params, split=config.data.eval_split,
                                   rng=jax.random.key(config.seed + 2))
    chunks, k = [], 0
    while sum(len(c) for c in chunks) < args.num:
      key = jax.random.fold_in(jax.random.key(args.seed), k)
      chunks.append(workdir_lib.sample_images(setup, params, key, num=args.num,
                                              num_steps=args.steps))   # <= 297 each
      k += 1
    samples = np.concatenate(chunks)[:args.num]
    fd = digits_classifier.digits_frechet_distance(
        digits_classifier.upsample_to_digits(samples), num_levels=setup.source.num_levels)
    row = {"row": name, "std": std, "profile_error": error, "step": last,
           "bpd": round(float(bpd["bpd"]), 4), "bpd_stderr": round(float(bpd["bpd_stderr"]), 4),
           "num_time_samples": config.eval.num_time_samples,
           "fd": round(float(fd), 3), "num": len(samples), "ddim_steps": args.steps,
           "seconds": round(time.perf_counter() - start, 1)}
    results.append(row)
    print(json.dumps(row), flush=True)

  print("\n| EMA | sigma_rel | profile error | bits/dim | FD |")
  print("|---|---|---|---|---|")
  for r in results:
    std = "" if r["std"] is None else f"{r['std']:.3f}"
    err = "" if r["profile_error"] is None else f"{r['profile_error']:.4f}"
    print(f"| {r['row']} | {std} | {err} | {r['bpd']:.4f} | {r['fd']:.3f} |")
  return results


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
