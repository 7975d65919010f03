r"""Sample quality against network evaluations for every sampler (run by hand).

  python bench/solvers_fd.py --workdir runs/digits_v --nfe 4,8,16,32,64 --num 891 \
      [--samplers ancestral,ddim,heun,dpmpp_2m,pc] [--seed 0] [--option churn=0,rho=7]

For each sampler and each budget in --nfe, draws --num samples from the EMA model of a
trained digits workdir with `launch.workdir.sample_images` (sampling steps = the budget;
`vdm.samplers.nfe` is the number of evaluations actually spent: Heun and PC may spend one
fewer) and scores them by the Frechet distance to the 297 real test digits in the features
of evaluation/digits_classifier.py (as launch.distill_pipeline.sample_quality does). Samples
are drawn in batches of at most 297 (sample_images takes one conditioning batch from the
eval split), batch k with key fold_in(seed, k). Solver options are the workdir's
config.eval.solver, changed by --option key=value,... Prints one JSON line per run and a
Markdown table at the end.
"""

import argparse
import json
import sys
import time

SAMPLERS = ("ancestral", "ddim", "heun", "dpmpp_2m", "pc")


def _options(text: str) -> dict:
  out = {}
  for item in filter(None, text.split(",")):
    key, _, value = item.partition("=")
    out[key.strip()] = value.strip() if key.strip() == "grid" else float(value)
  if "corrector_steps" in out:
    out["corrector_steps"] = int(out["corrector_steps"])
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="A trained digits workdir (read only).")
  p.add_argument("--nfe", default="4,8,16,32,64", help="Evaluation budgets.")
  p.add_argument("--num", type=int, default=891, help="Samples per run.")
  p.add_argument("--samplers", default=",".join(SAMPLERS))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--option", default="", help="Solver options, key=value,...")
  args = p.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from evaluation import digits_classifier  # pylint: disable=g-import-not-at-top
  from launch import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from vdm import samplers  # pylint: disable=g-import-not-at-top

  budgets = [int(n) for n in args.nfe.split(",")]
  names = args.samplers.split(",")
  for name in names:
    if name not in samplers.SAMPLERS:
      raise SystemExit(f"unknown sampler {name!r}; choose from {samplers.SAMPLERS}")
  rows = []
  for name in names:
    overrides = {"eval.sampler": name}
    overrides.update({f"eval.solver.{k}": v for k, v in _options(args.option).items()})
    # One setup per sampler: sample_images caches its compiled sampler per step count.
    setup, state, ckpt = workdir_lib.load_workdir(args.workdir, overrides=overrides)
    ckpt.close()
    if setup.config.data.name != "digits":
      raise SystemExit(f"{args.workdir} is not a digits run: the FD here needs the digits")
    options = setup.config.eval.solver.to_dict()
    levels = setup.source.num_levels
    for budget in budgets:
      start, chunks, k = time.perf_counter(), [], 0
      while sum(len(c) for c in chunks) < args.num:
        key = jax.random.fold_in(jax.random.key(args.seed), k)
        chunks.append(workdir_lib.sample_images(setup, state["ema"], key, num=args.num,
                                                num_steps=budget))   # <= 297 each
        k += 1
      samples = np.concatenate(chunks)[:args.num]
      fd = digits_classifier.digits_frechet_distance(
          digits_classifier.upsample_to_digits(samples), num_levels=levels)
      row = {"sampler": name, "budget": budget, "nfe": samplers.nfe(name, budget, options),
             "fd": round(float(fd), 3), "num": len(samples),
             "seconds": round(time.perf_counter() - start, 1), "options": options}
      rows.append(row)
      print(json.dumps(row), flush=True)

  nfe_cols = sorted({r["budget"] for r in rows})
  print("\n| sampler | " + " | ".join(f"NFE {n}" for n in nfe_cols) + " |")
  print("|---|" + "---|" * len(nfe_cols))
  for name in names:
    cells = []
    for n in nfe_cols:
      r = next(r for r in rows if r["sampler"] == name and r["budget"] == n)
      cells.append(f"{r['fd']:.2f}" + ("" if r["nfe"] == n else f" ({r['nfe']})"))
    print(f"| {name} | " + " | ".join(cells) + " |")
  return rows


if __name__ == "__main__":
  sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(
      __import__("os").path.abspath(__file__))))
  main()
