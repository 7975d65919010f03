r"""Times the trainer's train step, its input pipeline and a bits/dim pass (run by hand).

  python bench/bench_train.py                                   # cifar10 config, all devices
  python bench/bench_train.py --config configs/vdm/cifar10.py:runlocal --batch_size 128 \
      --fake_devices 8 --devices 8                              # 8 fake CPU devices
  python bench/bench_train.py --override model.score_unet.n_layer=8 --peak_tflops 989.5

Everything goes through the trainer's own functions (`setup_lib.build`, `trainer.compile_step`,
`setup_lib.put_batch`, `workdir_lib.evaluate_bpd`, `pipeline.make_loader`), so the numbers are
those of `python -m launch.train`. The data defaults to "synthetic:32x32x3" (random images,
no dataset needed). Sections, each printed as it finishes, then one JSON line of results:

  compile   seconds of tracing + `.lower().compile()` of the donated, sharded train step;
            XLA's memory analysis of it (argument + temp bytes per device); model FLOPs per
            step per device (launch/flops.py: matmuls and convolutions of the step's jaxpr,
            scanned loops counted per trip, / devices) and XLA's count (loops counted once).
  step      steady state: the same device batch, `--warmup` steps, then `--steps` steps each
            ended by block_until_ready: ms/step, images/s, achieved TFLOP/s and model FLOPs
            utilization (MFU) against --peak_tflops, by default the peak of the device kind
            for train.compute_dtype from launch/flops.py (no MFU for kinds not in the table).
  input     the trainer's loop (next(loader) -> put_batch -> step, dispatched asynchronously,
            blocked once at the end): the share of wall time spent in next() + put_batch.
  eval      workdir_lib.evaluate_bpd over the first --eval_examples of the synthetic test split:
            wall time per call, the part of it spent compiling (evaluate_bpd jits its
            function afresh on every call), examples/s without and with that part.
  memory    peak resident set size of this process (getrusage), grain workers not included.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/vdm/cifar10.py",
                 help="config file, path.py[:arg] (default: %(default)s)")
  p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, repeatable, e.g. --override model.score_unet.ch=64")
  p.add_argument("--data", default="synthetic:32x32x3",
                 help="data.name to benchmark on (default %(default)s; '' keeps the config's)")
  p.add_argument("--batch_size", type=int, default=None, help="train.batch_size (global)")
  p.add_argument("--workdir", default="/tmp/bench_train_workdir",
                 help="where derived data (Imagen's text cache) is kept between runs")
  p.add_argument("--steps", type=int, default=10, help="timed steady-state steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
  p.add_argument("--input_steps", type=int, default=None,
                 help="steps of the loader-fed loop (default: --steps)")
  p.add_argument("--worker_count", type=int, default=None,
                 help="grain workers of the loader (default: the config's data.worker_count)")
  p.add_argument("--devices", type=int, default=None,
                 help="use the first N devices (default: all)")
  p.add_argument("--fake_devices", type=int, default=None,
                 help="N fake CPU devices (sets XLA_FLAGS and JAX_PLATFORMS=cpu before jax "
                      "is imported)")
  p.add_argument("--peak_tflops", type=float, default=None,
                 help="peak FLOP/s of ONE device in TFLOP/s for MFU (default: the table in "
                      "launch/flops.py for the device kind and train.compute_dtype, e.g. H100 "
                      "or H200 SXM dense 989.5 in bf16, 494.5 in TF32 = float32 compute)")
  p.add_argument("--eval_examples", type=int, default=512,
                 help="examples of the bits/dim pass (0 skips it)")
  p.add_argument("--eval_batch_size", type=int, default=None,
                 help="eval.batch_size (default: the config's)")
  p.add_argument("--eval_calls", type=int, default=2,
                 help="calls of evaluate_bpd to time (the first one also compiles)")
  p.add_argument("--skip_input", action="store_true", help="skip the loader-fed loop")
  args = p.parse_args(argv)
  if args.steps < 1 or args.warmup < 0:
    p.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
  return args


def _set_fake_devices(n):
  """Must run before jax is imported: XLA reads the flag once, at backend start."""
  if "jax" in sys.modules:
    raise RuntimeError("--fake_devices must be applied before jax is imported")
  flags = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"


def memory_of(compiled) -> dict:
  """Bytes per device from XLA's memory analysis of the compiled step (0 where absent)."""
  m = compiled.memory_analysis()   # None where the backend has no analysis
  names = ("argument", "output", "alias", "temp", "generated_code")
  return {f"{n}_bytes": int(getattr(m, f"{n}_size_in_bytes", 0) or 0) for n in names}


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _block(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.block_until_ready(tree)


def time_steps(compiled, state, batch, *, warmup: int, steps: int):
  """(state, per-step seconds): each step blocked, so a step's time is its whole latency."""
  for _ in range(warmup):
    state = _block(compiled(state, batch))[0]
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    _block((state, metrics))
    times.append(time.perf_counter() - start)
  return state, times


def time_input_loop(setup, compiled, state, data_iter, *, steps: int):
  """The trainer's loop: (state, input seconds, wall seconds) over `steps` steps.

  Like trainer.train, steps are dispatched without waiting for the previous one, so the
  loader runs while the device computes; what the device cannot hide shows as input time.
  One untimed step first (the iterator's start-up is not steady state).
  """
  from launch import setup as setup_lib  # pylint: disable=g-import-not-at-top
  state, metrics = compiled(state, setup_lib.put_batch(setup, next(data_iter)))
  _block((state, metrics))
  input_s = 0.0
  start = time.perf_counter()
  for _ in range(steps):
    t0 = time.perf_counter()
    batch = setup_lib.put_batch(setup, next(data_iter))
    input_s += time.perf_counter() - t0
    state, metrics = compiled(state, batch)
  _block((state, metrics))
  return state, input_s, time.perf_counter() - start


class CompileClock:
  """Seconds JAX spends tracing, lowering and compiling, summed from jax.monitoring events
  (evaluate_bpd jits a fresh function on every call, so each call pays this again)."""
  EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
            "/jax/core/compile/jaxpr_to_mlir_module_duration",
            "/jax/core/compile/backend_compile_duration")

  def __init__(self):
    import jax  # pylint: disable=g-import-not-at-top
    self.seconds = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, name, seconds, **_):
    if name in self.EVENTS:
      self.seconds += seconds


def time_eval(setup, params, config, *, calls: int) -> dict:
  """workdir_lib.evaluate_bpd timed `calls` times: wall seconds per call, the part of it spent
  compiling, and examples/s with and without that part. An error is reported, not raised,
  so that the numbers measured before it still print."""
  import jax  # pylint: disable=g-import-not-at-top
  from launch import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  clock = CompileClock()
  walls, compiles = [], []
  try:
    for i in range(calls):
      clock.seconds = 0.0
      start = time.perf_counter()
      out = workdir_lib.evaluate_bpd(setup, params, split=config.data.eval_split,
                                     rng=jax.random.key(i))
      walls.append(time.perf_counter() - start)
      compiles.append(clock.seconds)
  except Exception as e:  # pylint: disable=broad-except
    error = f"{type(e).__name__}: {e}"
    print(f"bits/dim pass FAILED in workdir_lib.evaluate_bpd: {error}")
    return {"eval_error": error}
  n = out["num_examples"]
  best = min(range(calls), key=lambda i: walls[i] - compiles[i])
  r = {"eval_examples": n, "eval_batch_size": config.eval.batch_size, "eval_call_s": walls,
       "eval_compile_s": compiles, "eval_examples_per_s": n / (walls[best] - compiles[best]),
       "eval_examples_per_s_with_compile": n / min(walls), "eval_bpd": out["bpd"]}
  print(f"bits/dim pass: {n} examples, eval batch {config.eval.batch_size}; calls took "
        + ", ".join(f"{w:.1f} s ({c:.1f} compiling)" for w, c in zip(walls, compiles))
        + f" -> {r['eval_examples_per_s']:.1f} examples/s without compile, "
        f"{r['eval_examples_per_s_with_compile']:.1f} with (bpd {out['bpd']:.3f})")
  return r


def main(argv=None):
  args = parse_args(argv)
  if args.fake_devices:
    _set_fake_devices(args.fake_devices)
  sys.path.insert(0, _ROOT)
  os.chdir(_ROOT)

  import jax  # pylint: disable=g-import-not-at-top
  from launch import config_flags, families, trainer  # pylint: disable=g-import-not-at-top
  from launch import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from launch import setup as setup_lib, workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from launch.data import pipeline  # pylint: disable=g-import-not-at-top

  overrides = [f"data.name={args.data}"] if args.data else []
  overrides += list(args.override)
  if args.batch_size:
    overrides.append(f"train.batch_size={args.batch_size}")
  if args.eval_batch_size:
    overrides.append(f"eval.batch_size={args.eval_batch_size}")
  if args.eval_examples:
    overrides.append(f"eval.max_examples={args.eval_examples}")
  config = config_flags.load_config(args.config, overrides)

  devices = jax.devices()
  if args.devices:
    if args.devices > len(devices):
      raise SystemExit(f"--devices {args.devices} but only {len(devices)} "
                       f"{devices[0].platform} devices; on CPU add --fake_devices "
                       f"{args.devices}")
    devices = devices[:args.devices]
  batch_size = config.train.batch_size
  result = {"config": args.config, "overrides": overrides, "platform": devices[0].platform,
            "device_kind": devices[0].device_kind, "num_devices": len(devices),
            "batch_size": batch_size, "load_avg_1m": os.getloadavg()[0]}
  print(f"# {args.config} on {len(devices)} x {devices[0].device_kind}, global batch "
        f"{batch_size}, data {config.data.name}; load average {os.getloadavg()}")

  # --------------------------------------------------------------------- build and init
  start = time.perf_counter()
  # A scratch workdir: Imagen stages build their text-embedding cache there on first use.
  setup = setup_lib.build(config, devices, workdir=args.workdir,
                          frozen_module=workdir_lib.frozen_module(config))
  state = _block(setup.init())
  result["init_s"] = time.perf_counter() - start
  result["params_m"] = sum(x.size for x in jax.tree.leaves(state["params"])) / 1e6
  print(f"build + init: {result['init_s']:.1f} s, {result['params_m']:.3f}M parameters")

  # -------------------------------------------------------------------------- compile
  worker_count = config.data.worker_count if args.worker_count is None else args.worker_count
  loader = pipeline.make_loader(setup.source, global_batch_size=batch_size, seed=config.seed,
                                worker_count=worker_count)
  data_iter = iter(loader)
  first = next(data_iter)
  traced, compiled, compile_s = trainer.trace_and_compile_step(
      setup, families.device_batch(first, setup.family.batch_keys))
  mem = memory_of(compiled)
  flops = trainer.model_flops_per_device(traced, setup.mesh)
  xla_flops = flops_lib.flops_per_step(compiled)
  loops = flops_lib.while_loop_trip_counts(compiled)
  result.update(compile_s=compile_s, flops_per_step_per_device=flops,
                xla_flops_per_step_per_device=xla_flops, while_loops=loops,
                **{f"xla_{k}": v for k, v in mem.items()})
  arg_temp = mem["argument_bytes"] + mem["temp_bytes"]
  result["xla_argument_plus_temp_mib"] = arg_temp / 2**20
  print(f"compile: {compile_s:.1f} s; per device: arguments {mem['argument_bytes'] / 2**20:.1f}"
        f" MiB + temp {mem['temp_bytes'] / 2**20:.1f} MiB = {arg_temp / 2**20:.1f} MiB; "
        f"{flops / 1e9:.2f} GFLOP per step per device (model FLOPs, launch/flops.py); XLA "
        f"cost analysis {(xla_flops or 0) / 1e9:.2f}"
        + (f" ({len(loops)} while loop(s), trip counts {loops}, each counted once)"
           if loops else ""))
  peak_tflops, peak_from = args.peak_tflops, "--peak_tflops"
  if peak_tflops is None:
    peak = flops_lib.device_peak_flops(devices[0], config.train.compute_dtype)
    peak_tflops = peak and peak / 1e12
    peak_from = f"launch/flops.py, {devices[0].device_kind}, {config.train.compute_dtype}"
  result.update(peak_tflops=peak_tflops, peak_tflops_from=peak_from)

  # ----------------------------------------------------------------------- steady state
  batch = setup_lib.put_batch(setup, first)
  state, times = time_steps(compiled, state, batch, warmup=args.warmup, steps=args.steps)
  mean_s, median_s = statistics.fmean(times), statistics.median(times)
  result.update(step_ms_mean=1e3 * mean_s, step_ms_median=1e3 * median_s,
                step_ms_min=1e3 * min(times), images_per_s=batch_size / mean_s)
  line = (f"step: {1e3 * mean_s:.1f} ms mean, {1e3 * median_s:.1f} median, "
          f"{1e3 * min(times):.1f} min over {args.steps}; {batch_size / mean_s:.1f} images/s")
  if hasattr(setup.source, "video_shape"):   # a video stage: examples are clips
    frames = config.model.num_frames
    result["frames_per_s"] = batch_size * frames / mean_s
    line += f" (clips; {result['frames_per_s']:.1f} frames/s)"
  use = flops_lib.utilization(flops, 1 / mean_s, peak_tflops and peak_tflops * 1e12)
  if use:
    result["achieved_tflops_per_device"] = use["tflops_per_device"]
    line += f"; {use['tflops_per_device']:.4f} TFLOP/s per device"
    if "mfu" in use:
      result["mfu"] = use["mfu"]
      line += f", MFU {100 * use['mfu']:.1f}% of {peak_tflops:g} ({peak_from})"
  print(line)

  # ------------------------------------------------------------------ loader-fed loop
  if not args.skip_input:
    steps = args.input_steps or args.steps
    state, input_s, wall_s = time_input_loop(setup, compiled, state, data_iter, steps=steps)
    result.update(input_wait_share=input_s / wall_s, input_loop_images_per_s=
                  steps * batch_size / wall_s, input_worker_count=worker_count)
    print(f"input: next(loader) + put_batch = {input_s:.2f} s of {wall_s:.2f} s wall "
          f"({100 * input_s / wall_s:.1f}%) over {steps} steps, worker_count "
          f"{worker_count}; {steps * batch_size / wall_s:.1f} images/s fed by the loader")
  del data_iter, loader

  # ------------------------------------------------------------------------- bits/dim
  if args.eval_examples:
    result.update(time_eval(setup, state["ema"], config, calls=args.eval_calls))

  result["peak_rss_mib"] = peak_rss_mib()
  print(f"peak RSS: {result['peak_rss_mib']:.0f} MiB; load average now {os.getloadavg()}")
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
