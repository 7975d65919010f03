r"""Times the T5 encoder (imagen/t5.py) forward pass with random weights (run by hand).

  python bench/bench_t5.py                                  # "small", float32, CPU/any device
  python bench/bench_t5.py --preset xxl --dtype bfloat16 --rules fsdp   # accelerator:
                                                            # weights sharded over all devices
  python bench/bench_t5.py --preset base --fake_devices 8 --rules tensor --ici 1,2,4

Weights are initialised directly into their shards (`launch.mesh.sharded_init`) under the
chosen logical-axis rules on a (data, fsdp, tensor) mesh (default: every device on "fsdp"),
the batch is split over data x fsdp. Reports the compile time, then the steady state of
`--steps` calls each ended by block_until_ready: ms per batch, tokens/s and the achieved
TFLOP/s of the model's matmul FLOPs. Prints one JSON line.
"""

import argparse
import json
import os
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="small", help="T5Config preset (tiny..xxl)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=128)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--rules", default="fsdp", help="launch.mesh preset: data_parallel, fsdp, tensor")
  p.add_argument("--ici", default="1,-1,1", help="mesh sizes (data,fsdp,tensor), one -1 fills")
  p.add_argument("--no_scan", action="store_true", help="unroll the layers (scan_layers=False)")
  p.add_argument("--fake_devices", type=int, default=None,
                 help="N fake CPU devices (set before jax is imported)")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.fake_devices:
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.fake_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, _ROOT)
  import jax
  import numpy as np
  from flax import nnx

  from imagen.t5 import T5Config, T5Encoder
  from launch import mesh as M

  config = T5Config.preset(args.preset, dtype=args.dtype, scan_layers=not args.no_scan)
  mesh = M.make_mesh(tuple(int(s) for s in args.ici.split(",")))
  make = lambda key: nnx.state(T5Encoder(config, rngs=nnx.Rngs(key)))
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: T5Encoder(config, rngs=nnx.Rngs(0))))
  t0 = time.perf_counter()
  state, shardings = M.sharded_init(make, mesh, args.rules, jax.random.key(0))
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  n_params = sum(x.size for x in jax.tree.leaves(state))

  rng = np.random.RandomState(0)
  ids = rng.randint(1, config.vocab_size, (args.batch, args.length)).astype(np.int32)
  mask = np.ones_like(ids)
  batch = M.batch_sharding(mesh, 2)
  ids, mask = jax.device_put(ids, batch), jax.device_put(mask, batch)
  fn = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m),
               in_shardings=(shardings, batch, batch))
  t0 = time.perf_counter()
  compiled = fn.lower(state, ids, mask).compile()
  compile_s = time.perf_counter() - t0
  # Model FLOPs (XLA's cost analysis counts a scanned layer body once): per token and layer,
  # 2 x (q, k, v, o and the three FFN matmuls) plus 2 x 2 x L x inner for q.k and p.v.
  d, inner, f, n = config.d_model, config.inner_dim, config.d_ff, args.length
  flops = args.batch * n * config.num_layers * (2 * (4 * d * inner + 3 * d * f) + 4 * n * inner)

  for _ in range(args.warmup):
    jax.block_until_ready(compiled(state, ids, mask))
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(state, ids, mask))
    times.append(time.perf_counter() - t0)
  sec = statistics.median(times)
  result = dict(
      preset=args.preset, dtype=args.dtype, scan_layers=config.scan_layers,
      params_m=round(n_params / 1e6, 3), batch=args.batch, length=args.length,
      devices=len(mesh.devices.ravel()), device_kind=jax.devices()[0].device_kind,
      mesh=dict(mesh.shape), rules=args.rules, init_s=round(init_s, 2),
      compile_s=round(compile_s, 2), ms_per_batch=round(1e3 * sec, 2),
      tokens_per_s=round(args.batch * args.length / sec, 1),
      tflops=round(flops / sec / 1e12, 3))
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
