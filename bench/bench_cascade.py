r"""Cascade sampling latency per prompt (run by hand): text -> base -> SR stages.

  python bench/bench_cascade.py --stages runs/imagen_base,runs/imagen_sr \
      --num_prompts 10 --steps 64,32 [--repeats 3] [--devices 1]

Runs `launch.cascade.run_cascade` (the code behind `python -m launch.sample_cascade`),
`--repeats` times on the same prompts, and reports per stage the compile seconds of the
first run and the median sampling seconds (compile excluded), then seconds per prompt for
the whole cascade (one image per prompt; guidance doubles the base stage's batch). Prints
one JSON line.
"""

import argparse
import json
import statistics
import sys


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--stages", required=True, help="Stage workdirs, base first.")
  p.add_argument("--num_prompts", type=int, default=10)
  p.add_argument("--steps", default="64", help="Sampling steps per stage (or one for all).")
  p.add_argument("--guidance", default="3", help="Base-stage guidance weight.")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--devices", type=int, default=0, help="Devices to use (0: all).")
  args = p.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  from launch import cascade  # pylint: disable=g-import-not-at-top
  from launch.data import digits  # pylint: disable=g-import-not-at-top
  stages = args.stages.split(",")
  n = len(stages)
  prompts = [digits.caption_for(i % 10, i) for i in range(args.num_prompts)]
  devices = jax.devices()[:args.devices] if args.devices else jax.devices()
  runs = [cascade.run_cascade(
      stages, prompts, num_per_prompt=1,
      steps=cascade.per_stage(args.steps.split(","), n, "steps", int),
      guidance=[float(args.guidance)] + [0.0] * (n - 1), samplers_=["ddim"] * n,
      aug_levels=[0.0] * n, threshold="dynamic", seed=r, devices=devices)
      for r in range(args.repeats)]
  sample_s = [statistics.median(r.sample_seconds[i] for r in runs) for i in range(n)]
  result = {
      "device": jax.devices()[0].device_kind, "num_devices": len(devices),
      "num_prompts": args.num_prompts, "steps": args.steps,
      "compile_seconds": [round(s, 2) for s in runs[0].compile_seconds],
      "sample_seconds": [round(s, 3) for s in sample_s],
      "seconds_per_prompt": round(sum(sample_s) / args.num_prompts, 4),
      "images_per_second_per_stage": [round(args.num_prompts / s, 1) for s in sample_s],
  }
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(
      __import__("os").path.abspath(__file__))))
  main()
