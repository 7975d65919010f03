"""Peak FLOP/s and HBM of accelerator chips, model FLOPs of a step, and MFU.

MFU (model FLOPs utilization) here = model FLOPs per step per device / step seconds / the
device's peak dense FLOP/s for the run's compute dtype.

Model FLOPs (`jaxpr_flops`, `step_flops`) are counted on the step's jaxpr, before XLA: 2 per
multiply-add of every `dot_general` and `conv_general_dilated`, nothing else (elementwise ops,
reductions, transcendentals, the optimizer's and EMA's arithmetic are left out: they do not
run on the matrix units whose peak the MFU divides by).
Loops count per trip: a `lax.scan` body (scanned layers, `train.grad_accum > 1`) is multiplied
by its length. Per device = the global count / the number of devices in the mesh. That is
MFU's convention (PaLM, Chowdhery et al. 2022, appendix B: model FLOP/s over N x peak), and it
is each device's actual matmul work when the program splits the work evenly over the mesh,
as the data / fsdp / tensor parallel train step does. A program that repeats work on every
device does more per device than this (e.g. the sampling step with its replicated batch under
data_parallel rules runs every sample's convolutions on every device); MFU then reads lower,
rightly: repeated work is not model progress.
Recomputation asked for by `jax.checkpoint` (`remat`) is in the jaxpr and is counted, so with
remat on the count includes the recomputed forward passes (closer to "hardware FLOPs").

XLA's own count (`flops_per_step`: `compiled.cost_analysis()["flops"]` of the compiled,
partitioned per-device program) is kept as a second figure. It includes everything the step
computes (one FLOP per elementwise op, 2 per multiply-add) but differs from the model count in
ways measured here (tests/test_flops.py, and deviceless TPU compiles with libtpu 0.0.42.1):
  - a matmul [B, Din] x [Din, Dout] is 2 B Din Dout; `+ b` adds B Dout, an activation B Dout more;
  - a convolution counts only the kernel taps that land inside the input: with SAME padding
    that is below the textbook 2 B H W Cout K K Cin (about 4% below for K=3 at 32x32);
  - on TPU, small operands are counted after padding to the hardware tiles (e.g. 8 or 128
    channels at 16x16 count 1.15-1.6x the math), so MFU of tiny models reads high there;
  - a while loop (`lax.scan`: scanned layers, `train.grad_accum > 1`) is counted ONCE, not
    once per trip, on CPU and TPU alike; such steps under-report FLOPs and MFU by up to the
    trip count. `while_loop_trip_counts(compiled)` lists the loops so callers can say so.
    This is why MFU uses the jaxpr count.

Peak figures are per chip, dense (no 2:4 sparsity), from the vendors' pages cited below; NVIDIA's
datasheets headline "with sparsity" figures, which are twice the dense ones. A float32 step's
peak depends on how XLA runs float32 matmuls and convolutions, which
`jax_default_matmul_precision` sets (jax.lax.Precision's docstring):
  - TPU: DEFAULT (JAX's default) = one bfloat16 pass, so the bf16 peak; HIGH = 3 bf16 passes
    (peak / 3); HIGHEST = 6 passes (peak / 6).
  - NVIDIA A100 / H100 / H200: DEFAULT and HIGH use TF32 tensor cores (the TF32 peak); HIGHEST
    uses plain float32 (the non-tensor-core FP32 peak).
"""

import dataclasses
import logging
import math
import re

import jax
from jax import lax
from jax.extend import core as jcore


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip: dense peak TFLOP/s, HBM bytes and TensorCores per chip."""
  name: str
  bf16_tflops: float                # dense bfloat16 matmul peak, TFLOP/s per chip
  tf32_tflops: float | None = None  # NVIDIA: dense TF32 tensor-core peak
  fp32_tflops: float | None = None  # NVIDIA: float32 without tensor cores
  hbm_gib: float = 0.0              # HBM per chip, GiB (see the note above CHIPS)
  cores_per_chip: int = 1           # TPU TensorCores per chip (a jax device may be one of them)
  source: str = ""

  @property
  def hbm_bytes(self) -> int:
    return int(self.hbm_gib * 2**30)


_GOOGLE = "https://cloud.google.com/tpu/docs/"
_A100 = ("NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): BF16 tensor "
         "312, TF32 156 (dense; 624 / 312 with sparsity), FP32 19.5 TFLOPS; SXM4 and PCIe alike")
_H100 = ("NVIDIA H100 datasheet: SXM BF16 1,979 / TF32 989 TFLOPS with sparsity (dense = half), "
         "FP32 67; PCIe BF16 1,513 / TF32 756 with sparsity, FP32 51; 80 GB")
_H200 = ("NVIDIA H200 datasheet: same GH100 compute as H100 SXM (BF16 1,979 / TF32 989 TFLOPS with "
         "sparsity, FP32 67), 141 GB HBM3e")

# HBM: Google's pages write 32 GiB (v4) and 16 GB / 95GB / 32 GB (v5e / v5p / v6e); NVIDIA writes
# 40GB / 80GB / 141GB. HBM stacks come in binary sizes and the runtimes report GiB-sized limits
# (a little less: the runtime keeps some), so the figures are read as GiB. On a live device
# `device.memory_stats()["bytes_limit"]` is the exact usable amount.
CHIPS = {
    "tpu_v4": Chip("TPU v4", 275.0, hbm_gib=32, cores_per_chip=2,
                   source=_GOOGLE + "v4: 275 teraflops (bf16 or int8) per chip, 32 GiB HBM2, "
                          "two TensorCores per chip"),
    "tpu_v5e": Chip("TPU v5e", 197.0, hbm_gib=16,
                    source=_GOOGLE + "v5e: 197 TFLOPs (bf16) per chip, 16 GB HBM2, one TensorCore"),
    "tpu_v5p": Chip("TPU v5p", 459.0, hbm_gib=95, cores_per_chip=2,
                    source=_GOOGLE + "v5p: 459 TFLOPs (bf16) per chip, 95GB HBM2e; two TensorCores "
                           "(megacore: libtpu reports num_cores=2 per device)"),
    "tpu_v6e": Chip("TPU v6e (Trillium)", 918.0, hbm_gib=32,
                    source=_GOOGLE + "v6e: 918 TFLOPs (bf16) per chip, 32 GB HBM, one TensorCore"),
    "a100_40gb": Chip("NVIDIA A100 40GB", 312.0, 156.0, 19.5, hbm_gib=40, source=_A100),
    "a100_80gb": Chip("NVIDIA A100 80GB", 312.0, 156.0, 19.5, hbm_gib=80, source=_A100),
    "h100_sxm": Chip("NVIDIA H100 SXM", 1979 / 2, 989 / 2, 67.0, hbm_gib=80, source=_H100),
    "h100_pcie": Chip("NVIDIA H100 PCIe", 1513 / 2, 756 / 2, 51.0, hbm_gib=80, source=_H100),
    "h200": Chip("NVIDIA H200", 1979 / 2, 989 / 2, 67.0, hbm_gib=141, source=_H200),
}

# `jax.Device.device_kind` -> CHIPS key, first match wins (case-insensitive, on word boundaries,
# so "GH200" is not "H200"). TPU strings as libtpu reports them (checked with deviceless
# topologies: "TPU v4", "TPU v5 lite", "TPU v5", "TPU v6 lite"); GPU strings are the CUDA device
# names ("NVIDIA A100-SXM4-40GB", "NVIDIA A100 80GB PCIe", "NVIDIA H100 80GB HBM3",
# "NVIDIA H100 PCIe", "NVIDIA H200"). NVL boards (H100 NVL, H200 NVL) have other clocks and
# memory and are deliberately unknown, like every other kind: better no MFU than a wrong one.
_KINDS = (
    (r"\btpu v4$", "tpu_v4"),
    (r"\btpu v5 ?(lite|e)$", "tpu_v5e"),
    (r"\btpu v5p?$", "tpu_v5p"),
    (r"\btpu v6 ?(lite|e)$", "tpu_v6e"),
    (r"\ba100\b.*\b80gb\b", "a100_80gb"),
    (r"\ba100\b", "a100_40gb"),
    (r"\bnvl\b", None),
    (r"\bh100\b.*\bpcie\b", "h100_pcie"),
    (r"\bh100\b", "h100_sxm"),
    (r"\bh200\b", "h200"),
)


def chip_of(device_kind: str) -> Chip | None:
  """The table entry for a `jax.Device.device_kind` string; None when unknown (CPU, others)."""
  kind = device_kind.strip().lower()
  for pattern, key in _KINDS:
    if re.search(pattern, kind):
      return CHIPS[key] if key else None
  return None


_PRECISION_NAMES = (None, "default", "fastest", "bfloat16", "high", "bfloat16_3x", "tensorfloat32",
                    "highest", "float32")


def peak_tflops(chip: Chip, compute_dtype: str = "bfloat16", matmul_precision=None) -> float:
  """Dense peak TFLOP/s of one chip for a step whose matmuls run in `compute_dtype`.

  `matmul_precision` is what `jax_default_matmul_precision` holds (None, "default", "high",
  "highest", "bfloat16", "tensorfloat32", "float32", ...); it only matters for float32.
  """
  if compute_dtype == "bfloat16":
    return chip.bf16_tflops
  if compute_dtype != "float32":
    raise ValueError(f"no peak for compute dtype {compute_dtype!r}; use 'bfloat16' or 'float32'")
  try:
    precision = lax.Precision(matmul_precision)
  except ValueError as e:
    raise ValueError(f"unknown matmul precision {matmul_precision!r}: set "
                     f"jax_default_matmul_precision to default, high or highest") from e
  if chip.tf32_tflops is None:  # TPU: float32 runs as 1, 3 or 6 bfloat16 passes
    passes = {lax.Precision.DEFAULT: 1, lax.Precision.HIGH: 3, lax.Precision.HIGHEST: 6}
    return chip.bf16_tflops / passes[precision]
  return chip.fp32_tflops if precision == lax.Precision.HIGHEST else chip.tf32_tflops


def device_fraction(device, chip: Chip) -> float:
  """The share of a chip one jax device is: 1, or 1/2 for a v4 TensorCore seen as a device.

  Megacore devices (v4 and v5p VMs) span both TensorCores (`num_cores` 2); deviceless v4
  topologies list each TensorCore as its own device (`num_cores` 1).
  """
  if chip.cores_per_chip == 1:
    return 1.0
  return min(getattr(device, "num_cores", chip.cores_per_chip), chip.cores_per_chip) / (
      chip.cores_per_chip)


def device_peak_flops(device, compute_dtype: str = "bfloat16",
                      matmul_precision=None) -> float | None:
  """Peak FLOP/s of one jax device; None when its kind is not in the table, or when a float32
  step runs under a matmul precision the table has no peak for (a dot-algorithm name).

  `matmul_precision` defaults to the current `jax_default_matmul_precision`.
  """
  chip = chip_of(device.device_kind)
  if chip is None:
    return None
  if matmul_precision is None:
    matmul_precision = jax.config.jax_default_matmul_precision
  if compute_dtype == "float32" and not (isinstance(matmul_precision, lax.Precision)
                                         or matmul_precision in _PRECISION_NAMES):
    return None
  return 1e12 * peak_tflops(chip, compute_dtype, matmul_precision) * device_fraction(device, chip)


def device_hbm_bytes(device) -> int | None:
  """HBM bytes of one jax device from the table (None when its kind is unknown)."""
  chip = chip_of(device.device_kind)
  return None if chip is None else int(chip.hbm_bytes * device_fraction(device, chip))


# ------------------------------------------------------------------ model FLOPs of a jaxpr

# Primitives that call their sub-jaxprs once per call (jit was "pjit" before jax 0.7; remat2 is
# jax.checkpoint). Sub-jaxprs of others are counted once too (a scatter's or reduction's
# combiner has no matmuls), with a warning where they have matmuls.
_CALLS_ONCE = ("jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint",
               "custom_jvp_call", "custom_vjp_call", "custom_lin")


def dot_general_flops(eqn) -> float:
  """2 M N K of one `dot_general`: 2 x output elements (batch and free dims) x the product of
  the contracting dims."""
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs_shape = eqn.invars[0].aval.shape
  k = math.prod(lhs_shape[d] for d in lhs_contract)
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * k


def conv_flops(eqn) -> float:
  """Textbook FLOPs of one `conv_general_dilated`: 2 x output elements x kernel spatial size x
  input features per group (the kernel's input-feature dim). Every kernel tap is counted, also
  taps that fall on SAME padding or on the zeros of an lhs dilation (the input gradient of a
  strided conv); XLA's cost analysis leaves padded taps out."""
  rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
  rhs_shape = eqn.invars[1].aval.shape
  taps = math.prod(rhs_shape[d] for d in rhs_spec[2:])
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * taps * rhs_shape[rhs_spec[1]]


def jaxpr_flops(jaxpr) -> float:
  """Model FLOPs of one evaluation of a (closed) jaxpr: `dot_general` and
  `conv_general_dilated` only (module docstring), every loop trip counted.

  Sub-jaxprs: `scan` bodies count x `length`; `cond` counts its most expensive branch;
  `shard_map` bodies (per-device code) count x the devices along their manual axes; `jit`,
  `closed_call`, `remat2` (jax.checkpoint), `custom_jvp_call` and `custom_vjp_call` count once.
  A `while` loop's trip count is unknown before it runs: its body is counted once and a warning
  says so (`lax.fori_loop` with static bounds is a scan, not a while).
  """
  total, whiles = _count(jaxpr)
  if whiles:
    logging.warning("%d while loop(s) with matmuls or convolutions: their trip counts are "
                    "unknown, each body is counted once, so the model FLOPs under-report.",
                    whiles)
  return total


def _count(jaxpr) -> tuple[float, int]:
  """(FLOPs, number of while loops with FLOPs counted once) of a Jaxpr or ClosedJaxpr."""
  if isinstance(jaxpr, jcore.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  total, whiles = 0.0, 0
  for eqn in jaxpr.eqns:
    name, params = eqn.primitive.name, eqn.params
    if name == "dot_general":
      total += dot_general_flops(eqn)
    elif name == "conv_general_dilated":
      total += conv_flops(eqn)
    elif name == "scan":
      body, w = _count(params["jaxpr"])
      total, whiles = total + params["length"] * body, whiles + w
    elif name == "cond":
      branch, w = max(_count(b) for b in params["branches"])
      total, whiles = total + branch, whiles + w
    elif name == "while":
      body, w = _count(params["body_jaxpr"])
      test, w_test = _count(params["cond_jaxpr"])
      total, whiles = total + body + test, whiles + w + w_test + int(body + test > 0)
    elif name == "shard_map":
      body, w = _count(params["jaxpr"])
      shards = math.prod(params["mesh"].shape[a] for a in params["newly_manual_axes"])
      total, whiles = total + shards * body, whiles + w
    else:
      for sub in jcore.jaxprs_in_params(params):
        f, w = _count(sub)
        if f and name not in _CALLS_ONCE:
          logging.warning("jaxpr_flops: counting the matmuls inside primitive %r once per call",
                          name)
        total, whiles = total + f, whiles + w
  return total, whiles


def step_flops(fn, *args, **kwargs) -> float:
  """Global model FLOPs of one call `fn(*args, **kwargs)` (jaxpr_flops of its trace).

  `fn` may be plain or jitted (its shardings are kept); args may be arrays or
  `jax.ShapeDtypeStruct`s, so nothing is computed or compiled. Divide by the number of devices
  of the mesh for the per-device figure (module docstring).
  """
  jitted = fn if hasattr(fn, "trace") else jax.jit(fn)
  return jaxpr_flops(jitted.trace(*args, **kwargs).jaxpr)


# -------------------------------------------------------------------- XLA's count, compiled


def flops_per_step(compiled) -> float | None:
  """FLOPs per device of one call of a compiled (partitioned) program, from XLA's cost analysis.

  jax 0.10.2 returns one dict; older versions returned a list with one dict per program
  (summed here). None when the backend gives no analysis. Loops count once (module docstring).
  """
  cost = compiled.cost_analysis()
  if cost is None:
    return None
  if isinstance(cost, dict):
    cost = [cost]
  values = [c["flops"] for c in cost if isinstance(c, dict) and c.get("flops") is not None]
  return float(sum(values)) if values else None


def while_loop_trip_counts(compiled) -> list[int | None]:
  """Trip counts of the while loops in the optimized HLO that do matmuls or convolutions
  (None where XLA does not know the count): XLA's cost analysis counts such a loop's body once,
  so a non-empty list means flops_per_step under-reports. Loops without them (jax's threefry
  random bits on CPU run as a 5-trip loop) are left out: their FLOPs are negligible."""
  computations = _hlo_computations(compiled.as_text())
  counts = []
  for lines in computations.values():
    for line in lines:
      body = re.search(r"\bwhile\(.*\bbody=%?([\w.\-]+)", line)
      if body and _does_matmuls(body.group(1), computations):
        n = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        counts.append(int(n.group(1)) if n else None)
  return counts


def _hlo_computations(text: str) -> dict[str, list[str]]:
  """{computation name: its instruction lines} of an HLO module's text."""
  computations, name = {}, None
  for line in text.splitlines():
    header = re.match(r"(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header and not line.startswith(" "):
      name = header.group(1)
      computations[name] = []
    elif line.startswith("}"):
      name = None
    elif name is not None:
      computations[name].append(line)
  return computations


def _does_matmuls(name: str, computations: dict, seen=None) -> bool:
  """Whether computation `name`, or one it calls (fusions, nested loops), has a dot or a
  convolution (GPU: a cuBLAS / cuDNN custom call)."""
  seen = set() if seen is None else seen
  if name in seen or name not in computations:
    return False
  seen.add(name)
  for line in computations[name]:
    if re.search(r"\b(dot|convolution)\(|custom_call_target=\"[^\"]*(gemm|conv)", line, re.I):
      return True
    for callee in re.findall(r"%([\w.\-]+)", line.split("=", 1)[-1]):
      if callee in computations and _does_matmuls(callee, computations, seen):
        return True
  return False


def utilization(flops_per_step: float | None, steps_per_s: float,
                peak_flops: float | None) -> dict:
  """{"tflops_per_device", "mfu"}: achieved FLOP/s per device = FLOPs per step per device x
  steps/s (in TFLOP/s), and MFU = achieved FLOP/s / the device's peak FLOP/s; each key only
  where its inputs are known."""
  if not flops_per_step:
    return {}
  achieved = flops_per_step * steps_per_s
  out = {"tflops_per_device": achieved / 1e12}
  if peak_flops:
    out["mfu"] = achieved / peak_flops
  return out
