r"""Guidance sweep on the class-conditional digits (run by hand): classifier-free guidance
everywhere, classifier-free guidance in a logsnr interval (Kynkaanniemi et al. 2024) and
autoguidance by a weaker model (Karras et al. 2024), at equal sampling steps and weights.

  python bench/guidance_sweep.py --workdir runs/digits_cond \
      --guides runs/guide_cond_300,runs/digits_cond@2000 --weights 0,1,3 \
      --intervals "none;sigma:0.28,2.9" --num 300 --steps 32 [--seed 0] [--out FILE.jsonl]
      [--no_cfg]

Columns: classifier-free guidance ("cfg", unless --no_cfg), then autoguidance by each of
--guides. For each column x interval x weight w, `--num` samples are drawn
with DDIM (static clipping, vdm.experiment.sample, as launch.sample does), labels cycling
0..9, all rows from the same seed (common random numbers, so rows differ by the guidance
only), and scored by the digits classifier (evaluation/digits_classifier.py): accuracy =
share classified as the requested label (the classifier scores 0.926 on real test digits),
FD = Frechet distance to the 297 real test digits in its features (real-vs-real is about
0.8). w = 0 is the conditional model in every column, so it is run once. A guide is
WORKDIR or WORKDIR@STEP (EMA weights, read only). One sampling function is compiled per
column, with w and the interval's ends as traced arguments. Prints one line per row and a
final JSON line with every row; --out appends the rows as JSON lines.

--intervals are separated by ';', each "none" (everywhere), "lo,hi" in logsnr or
"sigma:lo,hi" in EDM's sigma (launch.workdir.parse_guidance_interval); every column is run
at every interval. "guided_steps" counts the sampling steps whose logsnr lies inside.
"""

import argparse
import json
import math
import sys
import time


def _intervals(text: str):
  """'none;sigma:0.28,2.9;-1,3' -> [(), (lo, hi), (-1.0, 3.0)] (';' separates intervals)."""
  from launch import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  return [workdir_lib.parse_guidance_interval(spec, "--intervals") for spec in text.split(";")]


def _guides(text: str):
  """'runs/a,runs/b@2000' -> [("runs/a", None), ("runs/b", 2000)]."""
  out = []
  for item in filter(None, text.split(",")):
    workdir, _, step = item.partition("@")
    out.append((workdir, int(step) if step else None))
  return out


def _load_ema(workdir: str, step):
  """(EMA model, config) of a trained workdir: `launch.workdir.load_ema_model`, or for a
  checkpoint saved before the nets stacked their identical blocks (one module per block,
  e.g. runs/digits_cond, which load_ema_model refuses) its EMA arrays read raw
  and stacked block by block into today's layout (vdm/nets/stack.py: 'down/3/conv1/kernel'
  becomes row 3 of 'down/layers/block/conv1/kernel'). Read only."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from launch import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from launch import config_flags, families  # pylint: disable=g-import-not-at-top
  from launch import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from launch.data import pipeline  # pylint: disable=g-import-not-at-top
  try:
    return workdir_lib.load_ema_model(workdir, step)
  except checkpoint_lib.CheckpointError as e:
    if "not in the checkpoint" not in str(e) and "unstacked layer layout" not in str(e):
      raise
  with checkpoint_lib.Checkpointer(workdir, save_every=1, keep=1, read_only=True) as ckpt:
    step = step or ckpt.latest_step()
    config = ckpt.restore_config(step).unlock()
    state_dir = str(ckpt.step_dir(step) / "state")
  family = families.get_family(config.family)
  config_flags.fill_missing(config, family.default_config(config))
  source = pipeline.get_source(config.data.name, config.data.train_split)
  model = family.build_model(config, source, nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  saved = ocp.StandardCheckpointer().restore(state_dir)["ema"]

  def convert(target, old):
    out = {}
    for key, value in target.items():
      if key == "layers":   # a Stack: rows 0..N-1 are the old blocks "0".."N-1"
        rows = [old[str(i)] for i in range(len(old))]
        out[key] = {"block": _stack(value["block"], rows)}
      elif isinstance(value, dict):
        out[key] = convert(value, old[key])
      else:
        out[key] = _leaf(old[key], value.shape)
    return out

  nnx.replace_by_pure_dict(params, convert(params.to_pure_dict(), saved))
  print(f"{workdir} step {step}: converted from the unstacked layer layout")
  return nnx.merge(graphdef, params), config


def _stack(target, rows):
  """The stacked leaves of `target` from the per-block trees `rows`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if isinstance(target, dict):
    return {k: _stack(v, [r[k] for r in rows]) for k, v in target.items()}
  return _leaf({"value": np.stack([_leaf(r, target.shape[1:]) for r in rows])}, target.shape)


def _leaf(saved, shape):
  """A saved array (orbax keeps an nnx Variable as {"value": array}) of the expected shape."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  array = np.asarray(saved["value"] if isinstance(saved, dict) else saved)
  if array.shape != tuple(shape):
    raise ValueError(f"saved array of shape {array.shape} where the model has {shape}")
  return array


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="runs/digits_cond")
  p.add_argument("--step", type=int, default=None, help="Main model step (default latest).")
  p.add_argument("--guides", default="", help="Autoguidance guides: WORKDIR[@STEP],...")
  p.add_argument("--weights", default="0,1,2,4")
  p.add_argument("--intervals", default="none;sigma:0.28,2.9",
                 help="';'-separated: none, lo,hi (logsnr) or sigma:lo,hi (EDM sigma).")
  p.add_argument("--no_cfg", action="store_true", help="Skip the classifier-free column.")
  p.add_argument("--num", type=int, default=300)
  p.add_argument("--steps", type=int, default=32)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="")
  args = p.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from evaluation import digits_classifier  # pylint: disable=g-import-not-at-top
  from launch import fs  # pylint: disable=g-import-not-at-top
  from vdm import experiment  # pylint: disable=g-import-not-at-top

  weights = [float(w) for w in args.weights.split(",")]
  intervals = _intervals(args.intervals)
  model, config = _load_ema(args.workdir, args.step)
  if not config.model.get("num_classes"):
    raise SystemExit(f"{args.workdir} is not class-conditional: this sweep scores accuracy "
                     "against the requested label")
  graphdef, state = nnx.split(model)
  labels = jnp.asarray(np.arange(args.num) % 10, jnp.int32)
  levels = model.num_levels
  grid = np.asarray(model.logsnr(jnp.arange(1, args.steps + 1) / args.steps))
  print(f"main {args.workdir}: logsnr from {grid[-1]:.2f} (t = 1) to {grid[0]:.2f} "
        f"(t = 1/{args.steps}) over the {args.steps} DDIM steps")

  columns = [] if args.no_cfg else [("cfg", None, None)]
  for workdir, step in _guides(args.guides):
    guide, guide_config = _load_ema(workdir, step)
    if tuple(guide.image_shape) != tuple(model.image_shape) or guide_config.family != "vdm":
      raise SystemExit(f"guide {workdir} does not match the model ({guide.image_shape})")
    columns.append((f"auto:{workdir}@{step or 'latest'}", *nnx.split(guide)))

  def make_fn(guide_graphdef):
    def fn(params, guide_state, w, lo, hi, rng):
      guide = None if guide_graphdef is None else nnx.merge(guide_graphdef, guide_state)
      return experiment.sample(nnx.merge(graphdef, params), rng, args.num,
                               num_steps=args.steps, labels=labels, guidance_w=w,
                               guidance_interval=(lo, hi), guide=guide)
    return jax.jit(fn)

  rows, rng = [], jax.random.key(args.seed)
  for name, guide_graphdef, guide_state in columns:
    start = time.perf_counter()
    example = (state, guide_state, jnp.float32(1), jnp.float32(0), jnp.float32(0), rng)
    fn = make_fn(guide_graphdef).lower(*example).compile()
    print(f"{name}: compiled in {time.perf_counter() - start:.0f} s", flush=True)
    for interval in intervals:
      lo, hi = interval if interval else (-math.inf, math.inf)
      guided_steps = int(np.sum((grid >= lo) & (grid <= hi)))
      for w in weights:
        if w == 0 and rows and any(r["w"] == 0 for r in rows):
          continue   # w = 0 is the conditional model whatever the column
        start = time.perf_counter()
        ints = np.asarray(jax.device_get(fn(state, guide_state, jnp.float32(w),
                                            jnp.float32(lo), jnp.float32(hi), rng)))
        seconds = time.perf_counter() - start
        report = digits_classifier.digits_report(ints, np.asarray(labels), num_levels=levels)
        row = {"guidance": "none" if w == 0 else name, "w": w,
               "interval": list(interval) if interval and w else None,
               "guided_steps": guided_steps if w else 0, "steps": args.steps,
               "num": args.num, "accuracy": round(float(report["accuracy"]), 3),
               "fd": round(float(report["fd"]), 3), "seconds": round(seconds, 1)}
        print(f"{row['guidance']:40s} w={w:<4g} interval={row['interval']} "
              f"({row['guided_steps']}/{args.steps} steps guided): accuracy "
              f"{row['accuracy']:.3f}  FD {row['fd']:.3f}  ({seconds:.0f} s)", flush=True)
        rows.append(row)
  for row in rows if args.out else []:
    fs.append_line(args.out, json.dumps(row))
  print(json.dumps({"workdir": args.workdir, "rows": rows}))
  return rows


if __name__ == "__main__":
  sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(
      __import__("os").path.abspath(__file__))))
  main()
