"""FLOPs, peaks and MFU (launch/flops.py): the jaxpr model-FLOP count and XLA's FLOP count
against hand counts, loops counted per trip (jaxpr) or once (XLA), the device-kind table, the
MFU arithmetic, and the progress line and metrics the trainer writes from them."""

import logging
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from launch import config_flags, flops, metric_writer, trainer
from launch import setup as setup_lib

B, DIN, DOUT = 16, 24, 40


def _flops(fn, *args, **jit_kwargs) -> float:
  return flops.flops_per_step(jax.jit(fn, **jit_kwargs).lower(*args).compile())


# ----------------------------------------------------------------------- XLA's FLOP count


def test_dense_layer_flops_equal_the_hand_count():
  """x @ W is one multiply and one add per (row, input, output): 2 B Din Dout. XLA counts the
  bias add as one FLOP per output element (B Dout) and so does an activation after it."""
  x, w, b = jnp.ones((B, DIN)), jnp.ones((DIN, DOUT)), jnp.ones((DOUT,))
  matmul = 2 * B * DIN * DOUT
  assert _flops(lambda x, w: x @ w, x, w) == matmul
  assert _flops(lambda x, w, b: x @ w + b, x, w, b) == matmul + B * DOUT
  assert _flops(lambda x, w, b: jax.nn.relu(x @ w + b), x, w, b) == matmul + 2 * B * DOUT


def test_flops_are_per_device_under_sharding():
  """A batch-sharded dense layer on 8 devices: each device's program does 1/8 of the work."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  rows = NamedSharding(mesh, P("data"))
  x = jax.device_put(jnp.ones((B, DIN)), rows)
  w, b = jnp.ones((DIN, DOUT)), jnp.ones((DOUT,))
  per_device = _flops(lambda x, w, b: x @ w + b, x, w, b, out_shardings=rows)
  assert per_device == (2 * B * DIN * DOUT + B * DOUT) / 8


def _conv(padding):
  return lambda x, k: lax.conv_general_dilated(x, k, (1, 1), padding,
                                               dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _taps_inside(size: int, k: int, padding: str) -> int:
  """Sum over output positions along one axis of the kernel taps that land inside the input
  (stride 1), counted one by one."""
  pad = (k - 1) // 2 if padding == "SAME" else 0
  n_out = size if padding == "SAME" else size - k + 1
  return sum(0 <= o - pad + j < size for o in range(n_out) for j in range(k))


@pytest.mark.parametrize("h,w,k", [(8, 8, 3), (6, 10, 5), (7, 7, 1)])
def test_conv_flops_equal_the_hand_count(h, w, k):
  """NHWC conv, stride 1: VALID equals the textbook 2 B Ho Wo Cout K K Cin. With SAME padding
  XLA counts only the taps inside the image, 2 B Cout Cin (taps along H)(taps along W), which
  is below the textbook 2 B H W Cout K K Cin for K > 1 (the zero taps are not counted)."""
  n, cin, cout = 2, 3, 5
  x, kernel = jnp.ones((n, h, w, cin)), jnp.ones((k, k, cin, cout))
  valid = 2 * n * (h - k + 1) * (w - k + 1) * cout * k * k * cin
  assert _flops(_conv("VALID"), x, kernel) == valid
  assert _taps_inside(h, k, "VALID") == (h - k + 1) * k     # the counter agrees with VALID
  same = 2 * n * cout * cin * _taps_inside(h, k, "SAME") * _taps_inside(w, k, "SAME")
  assert _flops(_conv("SAME"), x, kernel) == same
  textbook = 2 * n * h * w * cout * k * k * cin
  assert (same < textbook) if k > 1 else (same == textbook)


def test_a_scanned_loop_is_counted_once_and_reported():
  """XLA counts a while-loop body once, not per trip: the unrolled stack of L matmuls is counted
  in full, the scanned one as about one layer, and while_loop_trip_counts finds the loop.
  (This is why MFU uses the jaxpr count; if XLA starts multiplying by the trip count this test
  fails and XLA's figure becomes usable again.)"""
  layers, d = 5, 32
  x, ws = jnp.ones((B, d)), jnp.ones((layers, d, d))

  def unrolled(x, ws):
    for i in range(layers):
      x = x @ ws[i]
    return x

  scanned = lambda x, ws: lax.scan(lambda h, w: (h @ w, None), x, ws)[0]
  one_layer = 2 * B * d * d
  assert _flops(unrolled, x, ws) == layers * one_layer
  compiled = jax.jit(scanned).lower(x, ws).compile()
  assert flops.flops_per_step(compiled) < 1.01 * one_layer
  assert flops.while_loop_trip_counts(compiled) == [layers]
  assert flops.while_loop_trip_counts(jax.jit(unrolled).lower(x, ws).compile()) == []


def test_flops_per_step_reads_old_and_new_cost_analysis_forms():
  fake = lambda cost: types.SimpleNamespace(cost_analysis=lambda: cost)
  assert flops.flops_per_step(fake({"flops": 6.0, "bytes accessed": 1.0})) == 6.0
  assert flops.flops_per_step(fake([{"flops": 6.0}, {"flops": 4.0}])) == 10.0  # jax < 0.4.3x
  assert flops.flops_per_step(fake(None)) is None
  assert flops.flops_per_step(fake({"bytes accessed": 1.0})) is None


# ------------------------------------------------------------ model FLOPs of the jaxpr


def test_jaxpr_dense_layer_counts_the_matmul_only():
  """2 B Din Dout for x @ W; the bias add and the activation are elementwise: not counted. The
  gradient wrt x and W is two more matmuls of the same size: 3x in all."""
  x, w, b = jnp.ones((B, DIN)), jnp.ones((DIN, DOUT)), jnp.ones((DOUT,))
  layer = lambda x, w, b: jax.nn.relu(x @ w + b)
  matmul = 2 * B * DIN * DOUT
  assert flops.step_flops(layer, x, w, b) == matmul
  assert flops.jaxpr_flops(jax.make_jaxpr(layer)(x, w, b)) == matmul
  grads = jax.grad(lambda x, w, b: layer(x, w, b).sum(), argnums=(0, 1))
  assert flops.step_flops(grads, x, w, b) == 3 * matmul
  assert flops.step_flops(jax.jit(layer), x, w, b) == matmul        # jitted: nested jit eqn


def test_jaxpr_batched_matmul_counts_the_batch_dims():
  a, b = jnp.ones((3, 4, 5, 6)), jnp.ones((3, 4, 6, 7))
  assert flops.step_flops(jnp.matmul, a, b) == 2 * 3 * 4 * 5 * 6 * 7
  assert flops.step_flops(lambda a, b: jnp.einsum("bhqd,bhkd->bhqk", a, b), a, a) == (
      2 * 3 * 4 * 5 * 6 * 5)


@pytest.mark.parametrize("h,w,k", [(8, 8, 3), (6, 10, 5), (7, 7, 1)])
def test_jaxpr_conv_is_the_textbook_count(h, w, k):
  """Model FLOPs of a conv count every kernel tap, padded or not: SAME is 2 B H W Cout K K Cin
  (above XLA's count for K > 1), VALID is 2 B Ho Wo Cout K K Cin (equal to XLA's)."""
  n, cin, cout = 2, 3, 5
  x, kernel = jnp.ones((n, h, w, cin)), jnp.ones((k, k, cin, cout))
  assert flops.step_flops(_conv("SAME"), x, kernel) == 2 * n * h * w * cout * k * k * cin
  valid = 2 * n * (h - k + 1) * (w - k + 1) * cout * k * k * cin
  assert flops.step_flops(_conv("VALID"), x, kernel) == valid == _flops(_conv("VALID"), x,
                                                                        kernel)


def test_jaxpr_conv_strided_grouped_and_its_gradients():
  """Stride 2 halves H and W of the output; groups divide the input features per output. The
  kernel gradient is a conv with the same multiply-adds as the forward pass; the input
  gradient of a stride-2 conv runs on the 2x-dilated cotangent, whose inserted zeros count
  as taps (textbook count of a transposed conv): 4x the forward here."""
  n, h, cin, cout, k, groups = 2, 8, 6, 4, 3, 2
  x, kernel = jnp.ones((n, h, h, cin)), jnp.ones((k, k, cin // groups, cout))
  conv = lambda x, kernel: lax.conv_general_dilated(
      x, kernel, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups)
  forward = 2 * n * (h // 2) * (h // 2) * cout * k * k * (cin // groups)
  assert flops.step_flops(conv, x, kernel) == forward
  d_kernel = jax.grad(lambda x, kernel: conv(x, kernel).sum(), argnums=1)
  assert flops.step_flops(d_kernel, x, kernel) == 2 * forward
  d_both = jax.grad(lambda x, kernel: conv(x, kernel).sum(), argnums=(0, 1))
  assert flops.step_flops(d_both, x, kernel) == 2 * forward + 4 * forward


LAYERS, D = 5, 32


def _unrolled(x, ws):
  for i in range(LAYERS):
    x = jnp.tanh(x @ ws[i])
  return x


def _scanned(x, ws):
  return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]


def test_jaxpr_scan_counts_its_body_per_trip():
  """A scan over 5 dense layers is 5 x one layer, as the unrolled loop, forward and backward;
  a fori_loop with static bounds (a scan) alike."""
  x, ws = jnp.ones((B, D)), jnp.ones((LAYERS, D, D))
  one_layer = 2 * B * D * D
  assert flops.step_flops(_scanned, x, ws) == LAYERS * one_layer == flops.step_flops(
      _unrolled, x, ws)
  grad = lambda f: jax.grad(lambda x, ws: f(x, ws).sum(), argnums=(0, 1))
  assert flops.step_flops(grad(_scanned), x, ws) == 3 * LAYERS * one_layer == (
      flops.step_flops(grad(_unrolled), x, ws))
  fori = lambda x, ws: lax.fori_loop(0, LAYERS, lambda i, h: h @ ws[i], x)
  assert flops.step_flops(fori, x, ws) == LAYERS * one_layer
  nested = lambda x, ws: lax.scan(lambda h, _: (_scanned(h, ws), None), x, None, length=3)[0]
  assert flops.step_flops(nested, x, ws) == 3 * LAYERS * one_layer


def test_jaxpr_cond_counts_its_most_expensive_branch():
  x, w = jnp.ones((B, D)), jnp.ones((D, D))
  two, one = (lambda x: x @ w @ w), (lambda x: x @ w)
  for branches in ((two, one), (one, two), (one, two, lambda x: x)):
    f = lambda x, i, branches=branches: lax.switch(i, branches, x)
    assert flops.step_flops(f, x, 0) == 2 * (2 * B * D * D)
  checkpointed = jax.checkpoint(lambda x: x @ w)          # remat2: its body once
  assert flops.step_flops(checkpointed, x) == 2 * B * D * D


def test_jaxpr_while_loop_counts_its_body_once_and_says_so(caplog):
  x, w = jnp.ones((B, D)), jnp.ones((D, D))
  loop = lambda x, n: lax.while_loop(lambda c: c[1] < n, lambda c: (c[0] @ w, c[1] + 1),
                                     (x, 0))[0]
  with caplog.at_level(logging.WARNING):
    assert flops.step_flops(loop, x, 7) == 2 * B * D * D
  assert "1 while loop(s)" in caplog.text and "under-report" in caplog.text


def test_jaxpr_shard_map_counts_every_shard():
  """A shard_map body is per-device code: counted once per device along its manual axes, so
  the batch-sharded dense layer counts what the unsharded one does."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x, w = jnp.ones((B, DIN)), jnp.ones((DIN, DOUT))
  sharded = jax.shard_map(lambda x, w: x @ w, mesh=mesh, in_specs=(P("data"), P()),
                          out_specs=P("data"))
  assert flops.step_flops(sharded, x, w) == 2 * B * DIN * DOUT


def _score_unet_step_flops(*overrides) -> float:
  """Model FLOPs of the trainer's train step (trace only, nothing compiled) for the tiny
  digits config on one device, at batch 4."""
  config = config_flags.load_config("configs/vdm/digits.py:runlocal", [
      "mesh.ici=(1, 1, 1)", "train.batch_size=4", *overrides])
  setup = setup_lib.build(config, jax.devices()[:1])
  batch = {"image": np.zeros((1, 8, 8, 1), np.int32), "label": np.zeros((1,), np.int32)}
  traced = trainer.trace_step(setup, batch)
  return trainer.model_flops_per_device(traced, setup.mesh)


def test_score_unet_step_counts_the_same_scanned_or_unrolled():
  """The score U-Net's train step (forward, backward, optimizer) with its down and up stacks
  run by lax.scan counts what the unrolled stacks count (XLA's count falls short by the
  scanned layers: test_a_scanned_loop_is_counted_once_and_reported). Each extra layer adds
  one down and one up block, the same FLOPs each time: the count is linear in n_layer."""
  by_depth = {n: _score_unet_step_flops("model.score_unet.scan_layers=True",
                                        f"model.score_unet.n_layer={n}") for n in (1, 2, 3)}
  unrolled = _score_unet_step_flops("model.score_unet.scan_layers=False",
                                    "model.score_unet.n_layer=3")
  np.testing.assert_allclose(by_depth[3], unrolled, rtol=1e-6)
  per_layer = by_depth[2] - by_depth[1]
  assert per_layer > 0.1 * by_depth[1]
  np.testing.assert_allclose(by_depth[3] - by_depth[2], per_layer, rtol=1e-6)


def test_gradient_accumulation_counts_the_whole_batch():
  """train.grad_accum=2 runs the batch as a 2-trip scan over halves: the same FLOPs as one pass
  over the whole batch (XLA's count would hold one half)."""
  np.testing.assert_allclose(_score_unet_step_flops("train.grad_accum=2"),
                             _score_unet_step_flops("train.grad_accum=1"), rtol=1e-6)


# ------------------------------------------------------------------------ the peak table


@pytest.mark.parametrize("kind,name,bf16,hbm_gib", [
    ("TPU v4", "TPU v4", 275, 32),
    ("TPU v5 lite", "TPU v5e", 197, 16),
    ("TPU v5", "TPU v5p", 459, 95),
    ("TPU v5p", "TPU v5p", 459, 95),
    ("TPU v6 lite", "TPU v6e (Trillium)", 918, 32),
    ("NVIDIA A100-SXM4-40GB", "NVIDIA A100 40GB", 312, 40),
    ("NVIDIA A100-PCIE-40GB", "NVIDIA A100 40GB", 312, 40),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB", 312, 80),
    ("NVIDIA A100 80GB PCIe", "NVIDIA A100 80GB", 312, 80),
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", 989.5, 80),
    ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe", 756.5, 80),
    ("NVIDIA H200", "NVIDIA H200", 989.5, 141),
])
def test_known_device_kinds_map_to_their_chip(kind, name, bf16, hbm_gib):
  chip = flops.chip_of(kind)
  assert chip.name == name and chip.bf16_tflops == bf16
  assert chip.hbm_bytes == hbm_gib * 2**30
  assert chip.source


@pytest.mark.parametrize("kind", ["cpu", "TPU v3", "TPU v4 lite", "NVIDIA H100 NVL",
                                  "NVIDIA H200 NVL", "NVIDIA GH200 480GB", "Tesla V100-SXM2-16GB"])
def test_unknown_device_kinds_have_no_entry(kind):
  assert flops.chip_of(kind) is None


def test_cpu_devices_have_no_peak_and_no_hbm():
  cpu = jax.devices()[0]
  assert flops.device_peak_flops(cpu, "bfloat16") is None
  assert flops.device_hbm_bytes(cpu) is None


def test_float32_peak_follows_the_matmul_precision():
  """TPU: float32 = 1, 3 or 6 bfloat16 passes; NVIDIA: TF32 tensor cores unless HIGHEST."""
  v5p, h100 = flops.chip_of("TPU v5"), flops.chip_of("NVIDIA H100 80GB HBM3")
  assert flops.peak_tflops(v5p, "float32") == 459               # JAX's default precision
  assert flops.peak_tflops(v5p, "float32", "high") == 459 / 3
  assert flops.peak_tflops(v5p, "float32", "highest") == 459 / 6
  assert flops.peak_tflops(v5p, "bfloat16", "highest") == 459   # bf16 inputs: one pass
  assert flops.peak_tflops(h100, "float32") == 989 / 2
  assert flops.peak_tflops(h100, "float32", "tensorfloat32") == 989 / 2
  assert flops.peak_tflops(h100, "float32", "highest") == 67
  with pytest.raises(ValueError, match="compute dtype"):
    flops.peak_tflops(h100, "float16")
  with pytest.raises(ValueError, match="matmul precision"):
    flops.peak_tflops(h100, "float32", "fp64ish")


def test_a_v4_tensorcore_device_is_half_a_chip():
  """Deviceless v4 topologies list each TensorCore as a device (num_cores 1); megacore devices
  (num_cores 2) are whole chips."""
  core = types.SimpleNamespace(device_kind="TPU v4", num_cores=1)
  chip = types.SimpleNamespace(device_kind="TPU v4", num_cores=2)
  assert flops.device_peak_flops(core, "bfloat16") == 275e12 / 2
  assert flops.device_peak_flops(chip, "bfloat16") == 275e12
  assert flops.device_hbm_bytes(core) == 16 * 2**30
  v5e = types.SimpleNamespace(device_kind="TPU v5 lite", num_cores=1)
  assert flops.device_peak_flops(v5e, "float32", "highest") == pytest.approx(197e12 / 6)
  assert flops.device_peak_flops(v5e, "float32", "F32_F32_F32") is None  # no table peak


# ----------------------------------------------------------------------- MFU and the logs


def test_utilization_arithmetic():
  """2 TFLOP per step at 10 steps/s is 20 TFLOP/s; against a 100 TFLOP/s peak, MFU 0.2."""
  assert flops.utilization(2e12, 10.0, 100e12) == pytest.approx(
      {"tflops_per_device": 20.0, "mfu": 0.2})
  assert flops.utilization(2e12, 10.0, None) == pytest.approx({"tflops_per_device": 20.0})
  assert flops.utilization(None, 10.0, 100e12) == {}


def _line_after(monkeypatch, seconds, steps, **kwargs):
  clock = iter([0.0, seconds])
  monkeypatch.setattr(metric_writer.time, "perf_counter", lambda: next(clock))
  progress = metric_writer.Progress(0, 100, 128, **kwargs)
  return progress.line(steps, {"loss": 1.5}), progress.throughput


def test_progress_line_shows_tflops_and_mfu_when_the_peak_is_known(monkeypatch):
  # 10 steps in 2 s = 5 steps/s; 4 TFLOP/step -> 20 TFLOP/s; of 80 TFLOP/s -> MFU 25%.
  line, numbers = _line_after(monkeypatch, 2.0, 10, flops_per_step=4e12, peak_flops=80e12)
  assert line == ("step 10/100 | loss 1.5 | 5.00 steps/s | 640 img/s | 20 TFLOP/s/device | "
                  "MFU 25.0% | ETA 18s")
  assert numbers == pytest.approx({"tflops_per_device": 20.0, "mfu": 0.25})


def test_progress_line_omits_mfu_without_a_peak(monkeypatch):
  line, numbers = _line_after(monkeypatch, 2.0, 10, flops_per_step=4e12)
  assert line == "step 10/100 | loss 1.5 | 5.00 steps/s | 640 img/s | 20 TFLOP/s/device | ETA 18s"
  assert "MFU" not in line and "mfu" not in numbers
  line, numbers = _line_after(monkeypatch, 2.0, 10)   # no FLOPs: the line as before
  assert line == "step 10/100 | loss 1.5 | 5.00 steps/s | 640 img/s | ETA 18s"
  assert numbers == {}


def test_trainer_records_flops_tflops_and_mfu(tmp_path, monkeypatch):
  """Two logged steps of the tiny digits model on one device, with a made-up 1 TFLOP/s peak:
  metrics.jsonl holds the model FLOPs per step (the jaxpr count of the traced step) and XLA's
  count, and each train record TFLOP/s per device = model FLOPs x steps/s and MFU = TFLOP/s / 1."""
  peaks = []
  monkeypatch.setattr(trainer.flops_lib, "device_peak_flops",
                      lambda device, dtype: peaks.append((device.device_kind, dtype)) or 1e12)
  config = config_flags.load_config("configs/vdm/digits.py:runlocal", [
      "model.schedule.name=linear", "optim.decay=constant", "train.eval_every=0",
      "train.sample_every=0", "train.log_every=1", "train.num_steps=2",
      "train.checkpoint_every=100", "mesh.ici=(1, 1, 1)"])
  trainer.train(config, str(tmp_path), devices=jax.devices()[:1])
  records = metric_writer.read_metrics(str(tmp_path))
  assert peaks == [(jax.devices()[0].device_kind, "float32")]
  compiled_record = next(r for r in records if "compile_seconds" in r)
  model_flops = _score_unet_step_flops("model.schedule.name=linear", "optim.decay=constant",
                                       "train.batch_size=16")
  assert compiled_record["flops_per_step_per_device"] == model_flops > 1e6
  assert compiled_record["xla_flops_per_step_per_device"] > 1e6
  train = [r for r in records if "train/loss" in r]
  assert [r["step"] for r in train] == [1, 2]
  for r in train:
    assert r["train/tflops_per_device"] > 0
    np.testing.assert_allclose(r["train/mfu"], r["train/tflops_per_device"], rtol=1e-12)
