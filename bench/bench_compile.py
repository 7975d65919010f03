r"""Compile time and optimized-HLO size of the train step against network depth (by hand).

  python bench/bench_compile.py --depths 2,4,8,16,32            # this tree
  git worktree add /tmp/before HEAD~1 && \
  python bench/bench_compile.py --root /tmp/before --depths 2,4,8   # another revision

Builds the config's real train step through the trainer (`setup.build` +
`trainer.compile_step`: sharded, donated, compiled ahead of time) for each score U-Net depth
`model.score_unet.n_layer` = L, and prints per depth the compile seconds and the number of
instructions in the optimized HLO (`compiled.as_text()`), then a least-squares fit
a + b L + c L^2 of the counts and one JSON line. Nothing runs on the device but the compile,
so the paper-size CIFAR-10 step (L = 32, 128 channels) is measured in its compile time.
`--root` imports `launch/` from another checkout (the revision before a change), so before
and after are measured on the same machine in one sitting.
"""

import argparse
import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/vdm/cifar10.py", help="config file (path.py[:arg])")
  p.add_argument("--depths", default="2,4,8,16", help="comma-separated n_layer values")
  p.add_argument("--batch_size", type=int, default=8, help="global batch of the compiled step")
  p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--root", default=_ROOT, help="checkout whose launch/ is imported")
  return p.parse_args(argv)


def instruction_count(hlo_text: str) -> int:
  """Instructions of an HLO module's text: lines that assign a value."""
  return sum(1 for line in hlo_text.splitlines() if " = " in line.split("metadata=")[0])


def _trainer_api():
  """(build, compile_step, device_batch) of this checkout or of one before the
  launch/setup.py split (where both lived in launch/trainer.py)."""
  from launch import families, trainer  # pylint: disable=g-import-not-at-top
  if hasattr(trainer, "compile_step"):
    from launch import setup as setup_lib  # pylint: disable=g-import-not-at-top
    return setup_lib.build, trainer.compile_step, families.device_batch
  return (trainer.build, trainer._compile_step,  # pylint: disable=protected-access
          families.device_batch)


def measure(config_path: str, depth: int, batch_size: int, overrides) -> dict:
  from launch import config_flags  # pylint: disable=g-import-not-at-top
  from launch.data import pipeline  # pylint: disable=g-import-not-at-top
  build, compile_step, device_batch = _trainer_api()
  config = config_flags.load_config(
      config_path, [f"model.score_unet.n_layer={depth}", f"train.batch_size={batch_size}",
                    "data.name=synthetic:32x32x3", *overrides])
  setup = build(config)
  loader = pipeline.make_loader(setup.source, global_batch_size=batch_size, seed=0,
                                worker_count=0)
  first = device_batch(next(iter(loader)), setup.family.batch_keys)
  start = time.perf_counter()
  compiled, _ = compile_step(setup, first)
  seconds = time.perf_counter() - start
  return {"n_layer": depth, "compile_s": round(seconds, 1),
          "hlo_instructions": instruction_count(compiled.as_text())}


def quadratic_fit(depths, counts):
  import numpy as np  # pylint: disable=g-import-not-at-top
  if len(depths) < 3:
    return None
  a = np.stack([np.ones(len(depths)), depths, np.square(depths)], axis=1).astype(float)
  coef, *_ = np.linalg.lstsq(a, np.asarray(counts, float), rcond=None)
  return [round(float(c)) for c in coef]


def main(argv=None):
  args = parse_args(argv)
  sys.path.insert(0, os.path.abspath(args.root))
  os.chdir(os.path.abspath(args.root))
  rows = []
  for depth in [int(d) for d in args.depths.split(",")]:
    rows.append(measure(args.config, depth, args.batch_size, args.override))
    print(f"n_layer {depth:3d}: compile {rows[-1]['compile_s']:7.1f} s, optimized HLO "
          f"{rows[-1]['hlo_instructions']:,} instructions", flush=True)
  fit = quadratic_fit([r["n_layer"] for r in rows], [r["hlo_instructions"] for r in rows])
  if fit:
    print(f"HLO instructions ~ {fit[0]:,} + {fit[1]:,} L + {fit[2]:,} L^2")
  print(json.dumps({"root": os.path.abspath(args.root), "config": args.config, "rows": rows,
                    "fit_a_b_c": fit, "load_avg_1m": os.getloadavg()[0]}))


if __name__ == "__main__":
  main()
