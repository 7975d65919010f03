"""Post-hoc EMA (EDM2 sec. 3, app. C): the std <-> exponent conversion, the profile update,
the least-squares reconstruction, and the trainer's snapshots of a tiny run (in process)."""

import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from scipy import integrate

from launch import checkpoint as checkpoint_lib
from launch import config_flags, phema, phema_snapshots, train_state, trainer
from launch import workdir as workdir_lib
from tests import runtime_helpers as h
from vdm import posthoc_ema


def closed_form_std(e):
  """EDM2 eq. 3, written out again here: sigma_rel = sqrt((g+1) / ((g+2)^2 (g+3)))."""
  return np.sqrt((e + 1) / ((e + 2) ** 2 * (e + 3)))


def numpy_ema(trajectory, stds, every=None):
  """Power-function EMAs of trajectory[t-1] (t = 1..T) by the recursion of EDM2 eq. 2, in
  float64: (final profiles [len(stds), ...], {t: profiles} every `every` updates)."""
  e = np.array([closed_form_exponent(s) for s in stds])
  prof = np.zeros((len(stds),) + trajectory.shape[1:])
  snaps = {}
  for t in range(1, len(trajectory) + 1):
    b = ((1 - 1 / t) ** (e + 1)).reshape((-1,) + (1,) * (trajectory.ndim - 1))
    prof = b * prof + (1 - b) * trajectory[t - 1]
    if every and t % every == 0:
      snaps[t] = prof.copy()
  return prof, snaps


def closed_form_exponent(std):
  """The exponent by bisection on the closed form (a second inversion, not the cubic)."""
  lo, hi = posthoc_ema.EXPONENT_OF_MAX_STD, 1e6   # std falls monotonically on this branch
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if closed_form_std(mid) > std else (lo, mid)
  return 0.5 * (lo + hi)


# --- std <-> exponent -------------------------------------------------------------------


def test_std_exponent_conversion_matches_the_paper_and_round_trips():
  # EDM2 sec. 3.1: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
  np.testing.assert_allclose(posthoc_ema.exponent_of_std([0.05, 0.10]), [16.97, 6.94],
                             atol=0.005)
  stds = np.geomspace(1e-3, posthoc_ema.MAX_STD * 0.999, 25)
  exps = posthoc_ema.exponent_of_std(stds)
  np.testing.assert_allclose(exps, [closed_form_exponent(s) for s in stds], rtol=1e-9)
  np.testing.assert_allclose(closed_form_std(exps), stds, rtol=1e-10)
  np.testing.assert_allclose(posthoc_ema.std_of_exponent([0.0, 3.0, 50.0]),
                             closed_form_std(np.array([0.0, 3.0, 50.0])), rtol=1e-14)
  # the widest profile: d/de log std = 0 at e^2 + 3e + 1 = 0
  assert posthoc_ema.MAX_STD == pytest.approx(closed_form_std((5 ** 0.5 - 3) / 2), rel=1e-12)
  for bad in (0.0, -0.1, 0.31):
    with pytest.raises(ValueError, match=r"outside \(0, 0.3003\]"):
      posthoc_ema.exponent_of_std(bad)


def test_std_is_the_std_of_the_emas_weights():
  """The EMA's weights over the T updates, read off by running the recursion (jax, as in
  training) on one-hot "parameters", have the relative std of the closed form.

  The weight of update tau is the continuous profile's mass on [tau-1, tau]; taking the
  midpoints drops each unit interval's own variance 1/12, so the two stds differ by
  1/(24 T^2 std) relative: 4e-6 at std 0.05 and T = 1500; tolerance 2e-5."""
  T = 1500

  @jax.jit
  def weights(exponent):
    def one_update(w, t):
      return posthoc_ema.update_profile(w, jax.nn.one_hot(t - 1, T), t, exponent), None
    return jax.lax.scan(one_update, jnp.zeros(T), jnp.arange(1, T + 1))[0]

  for std in (0.05, 0.10, 0.2):
    w = np.asarray(weights(posthoc_ema.exponent_of_std(std)), np.float64)
    x = (np.arange(1, T + 1) - 0.5) / T
    mean = np.sum(w * x) / np.sum(w)
    empirical = np.sqrt(np.sum(w * (x - mean) ** 2) / np.sum(w))
    assert np.sum(w) == pytest.approx(1.0, abs=1e-4)
    assert empirical == pytest.approx(std, rel=2e-5), std


# --- reconstruction ---------------------------------------------------------------------


def test_inner_product_is_the_integral_of_the_profiles():
  def profile(t, e):
    return lambda s: (e + 1) * s ** e / t ** (e + 1) if s <= t else 0.0
  for ta, ea, tb, eb in ((300.0, 16.97, 1000.0, 6.94), (1000.0, 16.97, 300.0, 6.94),
                         (500.0, 2.0, 500.0, 0.5)):
    pa, pb = profile(ta, ea), profile(tb, eb)
    numeric = integrate.quad(lambda s: pa(s) * pb(s), 0, min(ta, tb), limit=200)[0]
    assert posthoc_ema.inner_product(ta, ea, tb, eb) == pytest.approx(numeric, rel=1e-8)


def _simulated_run(T=1000, every=25, dim=4):
  """A "training" trajectory (a decaying transient plus a random walk) and the EMAs of std
  0.05 and 0.10 snapshotted every `every` updates, as the trainer keeps them."""
  rng = np.random.default_rng(0)
  traj = (np.cumsum(rng.normal(size=(T, dim)), 0) * 0.1
          + 3 * np.exp(-np.arange(1, T + 1) / 200)[:, None])
  _, snaps = numpy_ema(traj, (0.05, 0.10), every)
  times = np.repeat(sorted(snaps), 2).astype(np.float64)
  exps = np.tile(posthoc_ema.exponent_of_std([0.05, 0.10]), len(snaps))
  values = np.concatenate([snaps[t] for t in sorted(snaps)])    # [2 * num snapshots, dim]
  return traj, times, exps, values


def test_reconstructing_a_stored_profile_picks_that_snapshot():
  _, times, exps, _ = _simulated_run()
  x, err = posthoc_ema.solve_coefficients(times, exps, [1000, 1000], exps[-2:])
  expected = np.zeros_like(x)
  expected[-2, 0] = expected[-1, 1] = 1.0
  np.testing.assert_allclose(x, expected, atol=1e-8)
  np.testing.assert_allclose(err, 0.0, atol=1e-6)


@pytest.mark.parametrize("std", [0.035, 0.075, 0.15, 0.2])
def test_reconstruction_matches_the_ema_tracked_directly(std):
  """The EMA of a third std, from the 0.05 / 0.10 snapshots, against that EMA run directly.

  Tolerance, derived rather than tuned: the discrete EMA is exactly the continuous profile
  applied to the piecewise-constant trajectory (module docstring), so the error is
  integral (sum_i x_i p_i - p) theta = sum over coordinates of at most
  ||sum_i x_i p_i - p||_2 ||theta||_2 (Cauchy-Schwarz), with the first factor the reported
  relative error times ||p||: that bound must hold. It is loose (it spreads the error over
  the whole run), so the test also asks the actual error to be under 5% of the gap between
  the target EMA and the 0.05 one (measured: at most 0.9%), so that a wrong combination cannot
  pass (interpolating the last two snapshots linearly in std misses by 10-660%)."""
  traj, times, exps, values = _simulated_run()
  T = len(traj)
  e = posthoc_ema.exponent_of_std(std)
  x, err = posthoc_ema.solve_coefficients(times, exps, [T], [e])
  recon = x[:, 0] @ values
  direct = numpy_ema(traj, (std,))[0][0]
  bound = err[0] * np.sqrt(posthoc_ema.inner_product(T, e, T, e)) * np.sqrt(
      np.sum(traj ** 2, 0))
  assert np.all(np.abs(recon - direct) <= bound)
  gap = np.abs(direct - numpy_ema(traj, (0.05,))[0][0])
  assert np.all(np.abs(recon - direct) < 0.05 * gap), (np.abs(recon - direct), gap)


def test_too_short_an_ema_is_refused_with_the_range():
  _, times, exps, _ = _simulated_run()     # snapshots every 25 of 1000 updates
  lo, hi = posthoc_ema.reconstructible_range(times, exps, 1000, max_error=0.05)
  assert 0.005 < lo < 0.035 and hi > 0.2
  _, err = posthoc_ema.solve_coefficients(times, exps, [1000], posthoc_ema.exponent_of_std(
      [0.004]))
  with pytest.raises(config_flags.InputError, match=r"reconstructible within 0.05"):
    phema.check_errors([0.004], err, times, exps, 1000, 0.05)


# --- the train step and the snapshots (a toy loss: no model to compile) -----------------


def _toy_config(every):
  optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=0.05, warmup_steps=0, decay="constant", b1=0.9, b2=0.99, eps=1e-8,
      weight_decay=0.0, grad_clip=0.0, ema_decay=0.9,
      phema=dict(enabled=True, stds=(0.05, 0.10), snapshot_every=every)))
  return ml_collections.ConfigDict(dict(optim=optim))


def _toy_loss_and_grads(params, batch, rng):
  del rng
  loss, grads = jax.value_and_grad(lambda p: jnp.sum((p["w"] - batch["target"]) ** 2))(params)
  return loss, {"loss": loss}, grads


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(l)) for l in jax.tree.leaves(tree)])


def test_train_step_snapshots_and_resume(tmp_path):
  """7 steps of the real train step (adamw + power_ema) on a quadratic, snapshots every 3:
  stored at 3, 6 and the last step 7, each equal to the numpy recursion over the params of
  the applied updates (step 5's non-finite update is skipped, so the profiles' t lags the
  step by one after it); a run resumed from step 3 keeps snapshot 6 and rewrites 7 with the
  same values."""
  config = _toy_config(every=3)
  tx = train_state.make_optimizer(config.optim, total_steps=7)
  step_fn = jax.jit(train_state.make_train_step(_toy_loss_and_grads, tx, ema_decay=0.9))
  params = {"w": jnp.zeros((3, 4), jnp.float32)}
  rng = np.random.default_rng(0)
  targets = rng.normal(size=(7, 3, 4)).astype(np.float32)
  targets[4, 0, 0] = np.nan                 # step 5: a non-finite loss, update dropped

  def run(state, first, last, writer, kept):
    for step in range(first, last + 1):
      state, _ = step_fn(state, {"target": jnp.asarray(targets[step - 1])})
      kept[step] = _flat(state["params"])
      writer.maybe_save(step, state, config)
    writer.close()
    return state

  workdir = str(tmp_path)
  kept = {}
  state = train_state.init_state(params, tx, seed=0)
  state3 = run(state, 1, 3, phema_snapshots.Writer(workdir, 3, 7), kept)
  state3 = jax.tree.map(jnp.copy, state3)
  run(state3, 4, 7, phema_snapshots.Writer(workdir, 3, 7), kept)
  assert phema_snapshots.saved_steps(workdir) == [3, 6, 7]

  applied = [kept[s] for s in range(1, 8) if s != 5]      # the params of updates t = 1..6
  _, expected = numpy_ema(np.stack(applied), (0.05, 0.10), every=1)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  abstract = {"w": jax.ShapeDtypeStruct((3, 4), jnp.float32, sharding=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))}
  reader = phema_snapshots.Reader(workdir)
  stored = {}
  for step, t in ((3, 3), (6, 5), (7, 6)):
    assert reader.time(step, abstract, mesh) == t
    assert reader.stds(step) == (0.05, 0.10)
    stored[step] = np.stack([_flat(p) for p in reader.profiles(step, abstract, mesh)])
    # float32 steps against the float64 recursion of the same params
    np.testing.assert_allclose(stored[step], expected[t], rtol=0, atol=1e-6)
  reader.close()
  assert not np.allclose(stored[7][0], kept[7], atol=1e-3)   # an average, not the params

  # Resume from step 3 as if the run died after snapshot 6 but before saving step 7.
  shutil.rmtree(tmp_path / phema_snapshots.DIRNAME / "checkpoints" / "7")
  run(state3, 4, 7, phema_snapshots.Writer(workdir, 3, 7), {})
  assert phema_snapshots.saved_steps(workdir) == [3, 6, 7]
  reader = phema_snapshots.Reader(workdir)
  resumed = np.stack([_flat(p) for p in reader.profiles(7, abstract, mesh)])
  reader.close()
  np.testing.assert_array_equal(resumed, stored[7])


def test_snapshots_on_gcs(gcs_dir):
  """The same storage through gs:// (the local emulator): a snapshot written and read back."""
  config = _toy_config(every=1)
  tx = train_state.make_optimizer(config.optim, total_steps=1)
  state = train_state.init_state({"w": jnp.arange(12.0).reshape(3, 4)}, tx, seed=0)
  state, _ = jax.jit(train_state.make_train_step(_toy_loss_and_grads, tx, ema_decay=0.9))(
      state, {"target": jnp.ones((3, 4))})
  writer = phema_snapshots.Writer(gcs_dir, 1, 1)
  assert writer.maybe_save(1, state, config)
  writer.close()
  assert phema_snapshots.saved_steps(gcs_dir) == [1]
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  abstract = {"w": jax.ShapeDtypeStruct((3, 4), jnp.float32, sharding=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))}
  reader = phema_snapshots.Reader(gcs_dir)
  got = reader.profiles(1, abstract, mesh)
  reader.close()
  for profile in got:   # t = 1: beta = 0, every profile is the params after the update
    np.testing.assert_array_equal(profile["w"], state["params"]["w"])


def test_phema_settings_cannot_change_on_resume(tmp_path):
  on = _toy_config(every=3)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), save_every=1, keep=1, async_save=False)
  ckpt.save(1, {"x": jnp.zeros(2)}, config=on, force=True)
  trainer.check_phema_resume(ckpt, on)          # the same settings: fine
  for key, value in (("enabled", False), ("stds", (0.05, 0.2))):
    changed = _toy_config(every=3)
    changed.optim.phema[key] = value
    with pytest.raises(config_flags.InputError, match="cannot be switched on, off or changed"):
      trainer.check_phema_resume(ckpt, changed)
  ckpt.close()


def test_no_snapshots_says_how_to_enable_them(tmp_path):
  with pytest.raises(config_flags.InputError, match="optim.phema.enabled=True"):
    phema.snapshot_steps(str(tmp_path), None)
  with pytest.raises(config_flags.InputError, match="comma-separated"):
    phema.parse_stds("a,b")
  with pytest.raises(config_flags.InputError, match=r"outside \(0, 0.3003\]"):
    phema.parse_stds("0.05,0.4")


# --- the trainer and launch.phema on a tiny run -----------------------------------------


def test_trainer_snapshots_and_reconstructed_workdir(tmp_path):
  """The trainer's wiring, end to end on a 3-step run (the snapshot steps and values are
  checked above, on the toy): its one snapshot, at the last step, holds the profiles of
  checkpoint 3's optimizer state, so launch.phema's std 0.05 workdir holds the first of
  them as its EMA, and that workdir loads as a distillation teacher (the weights-only path
  of launch.distill; launch.evaluate and launch.sample restore the same checkpoint whole)."""
  workdir = str(tmp_path / "run")
  devices = jax.devices()[:1]
  config = h.load_config("optim.phema.enabled=True", "optim.phema.snapshot_every=3",
                         "train.num_steps=3", "train.checkpoint_every=3")
  trainer.train(config, workdir, devices=devices)
  assert phema_snapshots.saved_steps(workdir) == [3]

  setup, step, totals, reports = phema.reconstruct(workdir, [0.05], devices=devices)
  assert step == 3 and reports[0]["relative_profile_error"] < 1e-6
  profile = posthoc_ema.find_state(h.restore(setup, workdir, 3)["opt_state"]).profiles[0]
  out = str(tmp_path / "phema_std0.050")
  phema.write_workdir(phema.output_setup(setup), step, totals[0], out, reports[0])
  model, teacher_config = workdir_lib.load_ema_model(out, devices=devices)
  np.testing.assert_allclose(_flat(nnx.state(model, nnx.Param)), _flat(profile),
                             rtol=0, atol=1e-7)
  assert not teacher_config.optim.phema.enabled
  assert checkpoint_lib.saved_steps(out) == [3]
