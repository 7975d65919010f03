r"""Ahead-of-time compilation for a TPU slice, on any machine: does a config fit, and how fast
could it be?

  pip install -e ".[tpu]"            # libtpu: describes TPU slices without a TPU
  python -m launch.aot --config configs/vdm/cifar10.py --topology v5p:2x2x1
  python -m launch.aot --config configs/imagen/base64.py --topology v5p:4x4x4 \
      --config.mesh.rules=fsdp --config.mesh.ici='(1, -1, 1)'
  python -m launch.aot --config configs/distill/cifar10.py \
      --teacher_config configs/distill/cifar10_teacher.py --topology v5e:4x4

Builds the config's mesh over the devices of a TPU topology description
(`jax.experimental.topologies`, `--num_slices` for multi-slice), then compiles the train step
exactly as the trainer does (`setup.build` + `trainer.compile_step`: sharded, donated) and the
sampling step as `workdir.sample_images` does, against abstract arrays (nothing is allocated).
Prints parameters, per-device HBM of each program (arguments, temporaries, outputs, total)
against the chip's HBM, model FLOPs per step per device (launch/flops.py's jaxpr count, loops
per trip; XLA's cost analysis too), the roofline step time at the chip's peak bf16 FLOP/s, the
collectives in the optimized HLO with their bytes, compile seconds, and one JSON line; exits 1
when a program does not fit, with advice on which mesh rule to change.

Data are never read: the model is shaped by the data's metadata (the digits, or
`synthetic:HxWxC` of the config's image size; `--data` overrides it), and text embeddings,
tokens and a distillation teacher enter as abstract arrays of their real shapes.
"""

import collections
import json
import os
import re
import sys
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # the CPU backend may hold libtpu

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.experimental import topologies

from imagen import t5
from launch import config_flags, distill_pipeline, families, flops as flops_lib
from launch import mesh as mesh_lib
from launch import setup as setup_lib
from launch import trainer
from launch.data import pipeline
from launch.data import synthetic

_CONFIG = config_flags.define_config_flag("config")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5p:4x4x4, v5e:2x2.",
                                required=True)
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices (multi-slice over DCN).")
_TEACHER_CONFIG = config_flags.define_config_flag("teacher_config", default=None)
_DATA = flags.DEFINE_string("data", None, "Data shape override, synthetic:HxWxC.")
_SAMPLE = flags.DEFINE_boolean("sample", True, "Also compile the sampling step.")

_IMAGE_SHAPES = {"cifar10": (32, 32, 3), "downsampled_imagenet/32x32": (32, 32, 3),
                 "downsampled_imagenet/64x64": (64, 64, 3)}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


# ------------------------------------------------------------------------------ the config


def train_config(config, teacher_config=None):
  """A training config: the config itself, or for a distillation pipeline config (one with
  a `distill` section and no `family`) the config of its first progressive stage, built
  from the teacher's config as `launch.distill` builds it."""
  if "family" in config:
    return config
  if teacher_config is None:
    raise ValueError("a distillation pipeline config needs its teacher's training config: "
                     "pass --teacher_config (e.g. configs/distill/cifar10_teacher.py)")
  stage = next(s for s in distill_pipeline.plan(config.distill) if s["kind"] == "progressive")
  return distill_pipeline.stage_config(teacher_config, config, stage, "<teacher>", "<teacher>")


def data_shape(config, override=None) -> tuple:
  if override:
    return synthetic.parse_shape(override.removeprefix("synthetic:"))
  if config.data.name.startswith("synthetic:"):
    return synthetic.parse_shape(config.data.name.removeprefix("synthetic:"))
  if config.data.get("image_size", 0):
    return (config.data.image_size, config.data.image_size, 3)
  if config.data.name in _IMAGE_SHAPES:
    return _IMAGE_SHAPES[config.data.name]
  raise ValueError(f"unknown image shape of data {config.data.name!r}: pass --data "
                   "synthetic:HxWxC")


def metadata_source(config, override=None):
  """A source with the data's metadata (levels, shape, classes), never reading the data."""
  if config.data.name == "digits" and not override:
    return pipeline.get_source("digits", config.data.train_split)
  if _base_family(config) == "video":
    if config.data.name.startswith("moving_digits") and not override:   # made, not read
      return families.get_family("video").get_source(config, config.data.train_split)
    options = config.data.video_options
    size = options.get("frame_size") if not override else None
    h, w, c = ((size, size, 1 if options.get("mode") == "L" else 3) if size
               else data_shape(config, override))
    frames = options.get("num_frames", config.model.num_frames)
    return synthetic.VideoMetadata((frames, h, w, c))
  num_classes = config.model.get("num_classes", 0) or 10
  return synthetic.SyntheticSource(data_shape(config, override), num_classes=num_classes,
                                   num_examples=1)


def _t5_preset(config) -> str:
  """The T5 size of config.data.t5: a preset name, "...@preset", or by text_dim."""
  spec = config.data.t5
  if spec in t5.PRESETS:
    return spec
  if "@" in spec:
    return spec.rpartition("@")[2]
  widths = {p["d_model"]: name for name, p in t5.PRESETS.items() if "umt5" not in name}
  return widths[config.model.text_dim]


def abstract_frozen(config, source):
  """The family's frozen module as an abstract module (shapes only): T5 run in the step, or
  a distillation teacher of the student's architecture."""
  family = families.get_family(config.family)
  if config.family == "distill":
    teacher = config_flags.config_from_json(config_flags.config_to_json(config)).unlock()
    teacher.model.guidance_embedding = config.distill.teacher_guidance_embedding
    base = families.get_family(config.distill.base_family)
    return nnx.eval_shape(lambda: base.build_model(teacher, source, nnx.Rngs(0)))
  if family.frozen_init is not None and config.data.get("text_source") == "encoder":
    cfg = t5.T5Config.preset(_t5_preset(config))
    return nnx.eval_shape(lambda: t5.T5Encoder(cfg, rngs=nnx.Rngs(0)))
  return None


def _base_family(config) -> str:
  return config.distill.base_family if config.family == "distill" else config.family


def example_batch(config, source, batch_size: int) -> dict:
  """Numpy zeros with the loader's fields and per-example shapes (text from its config)."""
  base = _base_family(config)
  key, shape = (("video", source.video_shape) if base == "video" else
                ("image", source.image_shape))
  batch = {key: np.zeros((batch_size, *shape), np.int32),
           "label": np.zeros((batch_size,), np.int32)}
  if base in ("imagen", "video"):
    length = config.data.max_length
    if config.data.text_source == "encoder":
      batch["input_ids"] = np.zeros((batch_size, length), np.int32)
      batch["attention_mask"] = np.ones((batch_size, length), np.int32)
    else:
      batch["text_emb"] = np.zeros((batch_size, length, config.model.text_dim), np.float32)
      batch["text_mask"] = np.ones((batch_size, length), np.int32)
  return batch


# ---------------------------------------------------------------------------- measurements


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?\S+ = (.*?) (" + "|".join(_COLLECTIVES)
                         + r")(?:-start)?\(", re.M)
_ARRAY_TYPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")


def collectives(hlo_text: str) -> dict:
  """{op: {"count", "bytes"}} of the collectives in an optimized HLO module, bytes being the
  size of each op's result (an async op is counted at its start)."""
  out = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
  for match in _INSTRUCTION.finditer(hlo_text):
    result_type, op = match.groups()
    out[op]["count"] += 1
    out[op]["bytes"] += sum(_DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",")
                                                               if d]))
                            for dtype, dims in _ARRAY_TYPE.findall(result_type))
  return dict(out)


def memory(compiled) -> dict:
  """Per-device bytes of a compiled program; total = arguments + outputs - aliased + temps
  + generated code (donated state aliases its outputs)."""
  m = compiled.memory_analysis()
  get = lambda name: int(getattr(m, name, 0) or 0)
  out = {"arguments": get("argument_size_in_bytes"), "outputs": get("output_size_in_bytes"),
         "aliased": get("alias_size_in_bytes"), "temporaries": get("temp_size_in_bytes"),
         "code": get("generated_code_size_in_bytes")}
  out["total"] = (out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
                  + out["code"])
  return out


def sharded_bytes(tree) -> int:
  """Per-device bytes of a tree of sharded abstract arrays (the largest shard counted)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
  return total


def compile_sampling(setup, num: int):
  """The sampling step of `workdir.sample_images`, compiled against abstract arrays."""
  config, family = setup.config, setup.family
  replicated = mesh_lib.replicated(setup.mesh)
  host = example_batch(config, setup.source, num)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated)
           for k, v in host.items() if k in family.batch_keys}
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
  fn = jax.jit(lambda p, b, r, *f: family.sample(
      setup_lib.model_with(setup, p), r, b, config, *setup_lib.frozen_modules(setup, *f),
      num_steps=config.eval.sample_steps), out_shardings=replicated)
  start = time.perf_counter()
  traced = fn.trace(setup.abstract_state["ema"], batch, key, *setup_lib.frozen_args(setup))
  compiled = traced.lower().compile()
  return compiled, time.perf_counter() - start, traced


def report(config, devices, data_override=None, sample: bool = True) -> dict:
  """Compiles the train (and sampling) step of `config` for `devices`; returns the numbers."""
  source = metadata_source(config, data_override)
  setup = setup_lib.build(config, devices, source=source,
                          frozen_module=abstract_frozen(config, source))
  batch = example_batch(config, source, 1)
  traced, compiled, compile_s = trainer.trace_and_compile_step(
      setup, families.device_batch(batch, setup.family.batch_keys))
  kind = devices[0].device_kind
  hbm = flops_lib.device_hbm_bytes(devices[0])
  peak = flops_lib.device_peak_flops(devices[0], "bfloat16")
  params = setup.abstract_state["params"]
  train = {"compile_s": round(compile_s, 1), "memory": memory(compiled),
           "flops_per_device": trainer.model_flops_per_device(traced, setup.mesh),
           "xla_flops_per_device": flops_lib.flops_per_step(compiled),
           "collectives": collectives(compiled.as_text()),
           "state_bytes_per_device": sharded_bytes(setup.abstract_state)}
  out = {"device_kind": kind, "num_devices": len(devices),
         "mesh": dict(setup.mesh.shape), "rules": str(config.mesh.rules),
         "batch_size": config.train.batch_size,
         "parameters": int(sum(np.prod(p.shape) for p in jax.tree.leaves(params))),
         "hbm_per_device": hbm, "peak_bf16_flops_per_device": peak, "train": train}
  if peak and train["flops_per_device"]:
    out["roofline_step_s"] = train["flops_per_device"] / peak
  if sample:
    s_compiled, s_seconds, s_traced = compile_sampling(setup, config.eval.num_samples)
    out["sample"] = {"compile_s": round(s_seconds, 1), "memory": memory(s_compiled),
                     "flops_per_device": trainer.model_flops_per_device(s_traced, setup.mesh),
                     "xla_flops_per_device": flops_lib.flops_per_step(s_compiled),
                     "num_samples": config.eval.num_samples,
                     "steps": config.eval.sample_steps}
  return out


# -------------------------------------------------------------------------------- printing


def _gib(n) -> str:
  return f"{n / 2**30:.2f} GiB"


def advice(config) -> str:
  """What to change when a program does not fit (maxtext-style: shard more, save less)."""
  rules = str(config.mesh.rules)
  steps = []
  if rules == "data_parallel":
    steps.append("shard parameters and optimizer state over the slice: "
                 "--config.mesh.rules=fsdp --config.mesh.ici='(1, -1, 1)'")
  elif rules == "fsdp":
    steps.append("split wide layers across chips too: --config.mesh.rules=tensor with "
                 "--config.mesh.ici='(1, -1, T)' (T = 2, 4, ... dividing the chips per slice)")
    if config.get("family") == "video":
      steps.append("split each clip's frames over T chips: --config.mesh.rules=fsdp_frames "
                   "--config.mesh.ici='(1, -1, T)', with train.grad_accum T times larger "
                   "(the batch then splits T times fewer ways)")
  steps.append("recompute activations: --config.model.<net>.remat=block (or dots)")
  steps.append("halve the activation memory per step: --config.train.grad_accum=2 (same "
               "global batch) or a smaller --config.train.batch_size")
  steps.append("use a larger slice (more chips share the state)")
  return "; ".join(steps)


def fits(out: dict) -> bool:
  hbm = out["hbm_per_device"]
  programs = [out["train"]] + ([out["sample"]] if "sample" in out else [])
  return hbm is None or all(p["memory"]["total"] <= hbm for p in programs)


def describe(out: dict) -> str:
  hbm = out["hbm_per_device"]
  lines = [f"{out['device_kind']} x {out['num_devices']}, mesh {out['mesh']}, rules "
           f"{out['rules']}, global batch {out['batch_size']}, "
           f"{out['parameters'] / 1e6:.1f}M parameters"]
  for name in ("train", "sample"):
    if name not in out:
      continue
    p, m = out[name], out[name]["memory"]
    lines.append(f"{name} step: compiled in {p['compile_s']} s; per device: arguments "
                 f"{_gib(m['arguments'])}, temporaries {_gib(m['temporaries'])}, outputs "
                 f"{_gib(m['outputs'])} (aliased {_gib(m['aliased'])}), total "
                 f"{_gib(m['total'])}" + (f" of {_gib(hbm)} HBM" if hbm else ""))
    if p.get("flops_per_device"):
      lines.append(f"  {p['flops_per_device'] / 1e12:.3f} TFLOP per step per device")
  if "roofline_step_s" in out:
    lines.append(f"roofline train step at peak bf16: {out['roofline_step_s'] * 1e3:.1f} ms")
  for op, c in sorted(out["train"]["collectives"].items()):
    lines.append(f"  {op}: {c['count']} ops, {_gib(c['bytes'])} per step per device")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  topology = topologies.get_topology_desc(topology_name=_TOPOLOGY.value, platform="tpu",
                                          num_slices=_NUM_SLICES.value)
  config = train_config(_CONFIG.value, _TEACHER_CONFIG.value)
  try:
    out = report(config, topology.devices, _DATA.value, _SAMPLE.value)
  except jax.errors.JaxRuntimeError as e:   # XLA refuses programs that cannot fit at all
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    print(f"DOES NOT FIT on {_TOPOLOGY.value}: {str(e).splitlines()[0]}\nTry: {advice(config)}")
    sys.exit(1)
  out["topology"], out["num_slices"] = _TOPOLOGY.value, _NUM_SLICES.value
  print(describe(out))
  ok = fits(out)
  if not ok:
    print(f"DOES NOT FIT in {_gib(out['hbm_per_device'])} per chip. Try: {advice(config)}")
  print(json.dumps(out))
  sys.exit(0 if ok else 1)


def run():
  logging.set_verbosity(logging.WARNING)
  app.run(main)


if __name__ == "__main__":
  run()
