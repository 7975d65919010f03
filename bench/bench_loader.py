r"""Images/s of the training loader alone (`launch.data.pipeline.make_loader`), run by hand.

  python bench/bench_loader.py                                  # synthetic:32x32x3 and digits
  python bench/bench_loader.py --sources synthetic:32x32x3,cifar10 --worker_counts 0,2,4

For each source and worker count: build the loader the trainer builds (global batch
--batch_size, default CIFAR-10's 128, one process), take one batch (start-up: worker
processes, first reads; reported separately), then time --batches more. No device work:
this is the rate at which the host can feed batches of int32 levels. A source that cannot be
opened (a tfds name not prepared under $TFDS_DATA_DIR) is reported as skipped, with why.
Prints a line per measurement, then one JSON line with all of them.
"""

import argparse
import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sources", default="synthetic:32x32x3,digits",
                 help="comma-separated source names for pipeline.get_source "
                      "(default %(default)s)")
  p.add_argument("--split", default="train")
  p.add_argument("--worker_counts", default="0,2", help="comma-separated (default %(default)s)")
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--batches", type=int, default=50, help="timed batches after the first")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def time_loader(source, *, batch_size: int, worker_count: int, batches: int, seed: int):
  """{"first_batch_s", "images_per_s", ...} of make_loader over `source`."""
  from launch.data import pipeline  # pylint: disable=g-import-not-at-top
  loader = pipeline.make_loader(source, global_batch_size=batch_size, seed=seed,
                                worker_count=worker_count)
  start = time.perf_counter()
  it = iter(loader)
  first = next(it)
  first_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(it)
  seconds = time.perf_counter() - start
  assert batch["image"].shape == first["image"].shape  # every batch is full (drop_remainder)
  bytes_per_batch = batch["image"].nbytes
  del it
  return {"first_batch_s": first_s, "seconds": seconds, "batches": batches,
          "images_per_s": batches * batch_size / seconds,
          "int32_mib_per_s": batches * bytes_per_batch / seconds / 2**20}


def main(argv=None):
  args = parse_args(argv)
  sys.path.insert(0, _ROOT)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")   # the loader needs no accelerator
  from launch.data import pipeline  # pylint: disable=g-import-not-at-top
  print(f"# loader, global batch {args.batch_size}, {args.batches} timed batches after the "
        f"first; load average {os.getloadavg()}")
  results = []
  for name in [s for s in args.sources.split(",") if s]:
    try:
      source = pipeline.get_source(name, args.split)
    except Exception as e:  # pylint: disable=broad-except  (report and go on)
      first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
      print(f"{name}: skipped ({type(e).__name__}: {first_line})")
      results.append({"source": name, "skipped": f"{type(e).__name__}: {first_line}"})
      continue
    for workers in [int(w) for w in args.worker_counts.split(",")]:
      r = time_loader(source, batch_size=args.batch_size, worker_count=workers,
                      batches=args.batches, seed=args.seed)
      r.update(source=name, image_shape=list(source.image_shape), worker_count=workers,
               batch_size=args.batch_size, load_avg_1m=os.getloadavg()[0])
      results.append(r)
      print(f"{name} {tuple(source.image_shape)} worker_count={workers}: "
            f"{r['images_per_s']:.0f} images/s ({r['int32_mib_per_s']:.1f} MiB/s of int32), "
            f"first batch {r['first_batch_s']:.2f} s")
  print(json.dumps({"loader": results}))
  return results


if __name__ == "__main__":
  main()
