r"""Sample quality against network evaluations for every sampler (run by hand).

  python bench/solvers_fd.py --workdir runs/digits_v --nfe 4,8,16,32,64 --num 891 \
      [--samplers ancestral,ddim,heun,dpmpp_2m,pc] [--seed 0] [--option churn=0,rho=7]
      [--guidance 0,0.3,1 --guide_workdir W2 | --guide_step N]   # autoguidance

For each sampler and each budget in --nfe, draws --num samples from the EMA model of a
trained digits workdir with `launch.workdir.sample_images` (sampling steps = the budget;
`vdm.samplers.nfe` is the number of evaluations actually spent: Heun and PC may spend one
fewer) and scores them by the Frechet distance to the 297 real test digits in the features
of evaluation/digits_classifier.py (as launch.distill_pipeline.sample_quality does). Samples
are drawn in batches of at most 297 (sample_images takes one conditioning batch from the
eval split), batch k with key fold_in(seed, k). Solver options are the workdir's
config.eval.solver, changed by --option key=value,... Prints one JSON line per run and a
Markdown table at the end. With --guide_workdir / --guide_step, each --guidance weight w > 0
is autoguidance (Karras et al. 2024) by that weaker model, also for unconditional runs; w = 0
is the model alone.
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
  p.add_argument("--guidance", default="", help="Autoguidance weights w, e.g. 0.3,1 (with "
                 "--guide_workdir and/or --guide_step; default: the config's guidance).")
  p.add_argument("--guide_workdir", default=None, help="Autoguidance: a weaker digits run.")
  p.add_argument("--guide_step", type=int, default=None, help="Autoguidance: the guide's "
                 "checkpoint step (alone: an earlier checkpoint of --workdir).")
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
  autoguided = args.guide_workdir is not None or args.guide_step is not None
  weights = [float(w) for w in args.guidance.split(",")] if args.guidance else [None]
  if autoguided and weights == [None]:
    raise SystemExit("--guide_workdir / --guide_step need --guidance, e.g. --guidance 0.3,1")
  rows = []
  for name, w in [(n, w) for n in names for w in weights]:
    overrides = {"eval.sampler": name}
    overrides.update({f"eval.solver.{k}": v for k, v in _options(args.option).items()})
    if w is not None:
      overrides["eval.guidance_w"] = w
    # One setup per run: sample_images caches its compiled sampler per step count.
    setup, state, ckpt = workdir_lib.load_workdir(args.workdir, overrides=overrides)
    ckpt.close()
    if setup.config.data.name != "digits":
      raise SystemExit(f"{args.workdir} is not a digits run: the FD here needs the digits")
    guide = (workdir_lib.load_guide(setup, args.workdir, args.guide_workdir, args.guide_step)
             if autoguided and w else None)
    options = setup.config.eval.solver.to_dict()
    levels = setup.source.num_levels
    for budget in budgets:
      start, chunks, k = time.perf_counter(), [], 0
      while sum(len(c) for c in chunks) < args.num:
        key = jax.random.fold_in(jax.random.key(args.seed), k)
        chunks.append(workdir_lib.sample_images(setup, state["ema"], key, num=args.num,
                                                num_steps=budget, guide=guide))   # <= 297
        k += 1
      samples = np.concatenate(chunks)[:args.num]
      fd = digits_classifier.digits_frechet_distance(
          digits_classifier.upsample_to_digits(samples), num_levels=levels)
      row = {"sampler": name, "budget": budget, "nfe": samplers.nfe(name, budget, options),
             "guidance_w": setup.config.eval.guidance_w, "autoguided": guide is not None,
             "fd": round(float(fd), 3), "num": len(samples),
             "seconds": round(time.perf_counter() - start, 1), "options": options}
      rows.append(row)
      print(json.dumps(row), flush=True)

  nfe_cols = sorted({r["budget"] for r in rows})
  print("\n| sampler | w | " + " | ".join(f"NFE {n}" for n in nfe_cols) + " |")
  print("|---|---|" + "---|" * len(nfe_cols))
  for name, w in [(n, w) for n in names for w in weights]:
    cells = []
    for n in nfe_cols:
      r = next(r for r in rows if r["sampler"] == name and r["budget"] == n
               and (w is None or r["guidance_w"] == w))
      cells.append(f"{r['fd']:.2f}" + ("" if r["nfe"] == n else f" ({r['nfe']})"))
    print(f"| {name} | {'' if w is None else w} | " + " | ".join(cells) + " |")
  return rows


if __name__ == "__main__":
  sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(
      __import__("os").path.abspath(__file__))))
  main()
