"""The digits cascade end to end: an SR stage respects its input, and 8 devices with the
batch sharded sample what 1 device does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.imagen import digits_base, digits_sr
from evaluation import digits_classifier
from imagen import experiment
from launch import setup as setup_lib
from launch import workdir as workdir_lib
from launch import cascade, mesh as mesh_lib, trainer
from vdm import losses


def _train_stage(get_config, workdir, steps, **changes):
  """A runlocal stage trained on one device for `steps` steps; returns its workdir."""
  config = get_config("runlocal")
  config.train.update(dict(num_steps=steps, sample_every=0, checkpoint_every=steps,
                           log_every=steps))
  for key, value in changes.items():
    config[key].update(value)
  trainer.train(config, str(workdir), devices=jax.devices()[:1])
  return str(workdir)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
  """An untrained-ish base (2 steps) and an SR stage trained long enough (400 steps, about a
  minute here) to have learnt to use its low-resolution input."""
  root = tmp_path_factory.mktemp("cascade")
  return [_train_stage(digits_base.get_config, root / "base", 2),
          _train_stage(digits_sr.get_config, root / "sr", 400,
                       model=dict(unet_overrides=dict(ch=16)),
                       train=dict(batch_size=32), optim=dict(lr=2e-3, warmup_steps=20))]


def test_sr_stage_respects_its_input_at_augmentation_level_zero(stages):
  """Downsampling the SR output gives back the 4x4 input (imagen-pytorch users report SR
  stages that ignore it). Real test digits, no text: the input is the only clue."""
  setup, state, ckpt = workdir_lib.load_workdir(stages[1], devices=jax.devices()[:1])
  ckpt.close()
  model = setup_lib.model_with(setup, state["ema"])
  images, _ = digits_classifier.real_digits("test")
  low = experiment.downsample(losses.int_to_x(jnp.asarray(images[:64]), 17), 4)
  cond = {"text_emb": jnp.zeros((64, 16, 32)), "text_mask": jnp.zeros((64, 16), jnp.int32)}
  cond.update(experiment.lowres_cond(model, low, jax.random.key(1), jnp.zeros((64,))))
  out = experiment.sample(model, jax.random.key(2), cond, 64, num_steps=16)
  error = float(jnp.abs(experiment.downsample(out, 4) - low).mean())
  # Reference: the same distance between the inputs of different digits (0.335), what an
  # SR stage that ignored its input would score at best. Measured: 0.13 after 400 steps
  # (0.078 for the README's 1200-step stage; one grey level is 0.118).
  other_digit = float(jnp.abs(low - jnp.roll(low, 1, axis=0)).mean())
  assert error < 0.5 * other_digit, (error, other_digit)


def test_shard_batch_pads_to_the_data_shards_and_keeps_rows():
  mesh = mesh_lib.make_mesh((-1, 1, 1), devices=jax.devices())
  x = np.arange(3 * 2).reshape(3, 2).astype(np.float32)
  sharded = mesh_lib.shard_batch(mesh, {"x": x}, mesh_lib.batch_shards(mesh))["x"]
  assert sharded.shape == (8, 2) and len(sharded.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(sharded)[:3], x)
  np.testing.assert_array_equal(np.asarray(sharded)[3:], np.repeat(x[-1:], 5, axis=0))


def test_cascade_on_8_devices_samples_the_same_images_as_on_1(stages):
  # 3 prompts x 2 = 6 images: padded to 8 on the 8-device mesh, unpadded on 1 device.
  kwargs = dict(num_per_prompt=2, steps=[3, 2], guidance=[2.0, 0.0],
                samplers_=["ancestral", "ddim"], aug_levels=[0.0, 0.2], threshold="dynamic",
                seed=3)
  prompts = ["a handwritten seven", "the number 3", "zero"]
  one, _, setups_1, *_ = cascade.run_cascade(stages, prompts, devices=jax.devices()[:1], **kwargs)
  eight, _, setups_8, *_ = cascade.run_cascade(stages, prompts, devices=jax.devices(), **kwargs)
  assert mesh_lib.batch_shards(setups_1[0].mesh) == 1
  assert mesh_lib.batch_shards(setups_8[0].mesh) == 8
  assert [x.shape for x in one] == [(6, 4, 4, 1), (6, 8, 8, 1)]
  for a, b in zip(one, eight):
    np.testing.assert_allclose(a, b, atol=2e-5)
  # The two images of a prompt differ (per-example noise, also in the padded rows' place).
  assert np.abs(one[0][0] - one[0][1]).max() > 1e-2
  assert np.abs(one[1][0] - one[1][1]).max() > 1e-2


def test_per_stage_guides_parse_one_for_all_or_one_per_stage_and_check_checkpoints(stages):
  """--guide_workdir / --guide_step of launch.sample_cascade: one value for every stage or
  ';'-separated per stage, 'none' for a stage without a guide; a guide whose checkpoint does
  not exist is refused before anything loads."""
  from launch import checkpoint as checkpoint_lib   # pylint: disable=import-outside-toplevel
  from launch import config_flags   # pylint: disable=import-outside-toplevel
  base, sr = stages
  assert cascade.per_stage_guides(None, None, stages) is None
  assert cascade.per_stage_guides(f"{sr};none", None, stages) == [(sr, None), None]
  assert cascade.per_stage_guides(None, "none;400", stages) == [None, (None, 400)]
  assert cascade.per_stage_guides(base, "2", stages) == [(base, 2), (base, 2)]
  with pytest.raises(config_flags.InputError, match="3 entries for 2 stages"):
    cascade.per_stage_guides("a;b;c", None, stages)
  with pytest.raises(config_flags.InputError, match="whole numbers"):
    cascade.per_stage_guides(None, "early", stages)
  with pytest.raises(checkpoint_lib.CheckpointError, match="--guide_step"):
    cascade.per_stage_guides(None, "7", stages)   # no step 7 in either stage
