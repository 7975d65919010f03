"""The video family: a text-to-video stage trained by the one trainer (moving digits).

The stage's clips against a numpy reading of the data, joint image-video examples against
their definition (Ho et al. sec. 3.2), one train step on 8 devices against 1, a resumed run
against an uninterrupted one, and the sample files a person watches against the samples.
"""

import io
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from PIL import Image

from imagen import video_experiment
from launch import cascade, config_flags, families, mesh as mesh_lib, trainer
from launch import setup as setup_lib
from launch import workdir as workdir_lib
from tests import runtime_helpers as h

CONFIG = "configs/video/moving_digits.py:runlocal"
# Cheap to compile and bit-comparable across runs: 4 frames of 12x12, a one-level net with
# temporal attention, fixed schedule, constant lr, no sampling.
TINY = ("data.name=moving_digits:4x12x12", "model.num_frames=4", "model.resolution=12",
        "model.unet_overrides.ch_mult=(1,)", "model.unet_overrides.num_res_blocks=(1,)",
        "model.unet_overrides.attn_resolutions=()",
        "model.unet_overrides.cross_attn_resolutions=(12,)",
        "model.unet_overrides.temporal_attn_resolutions=(12,)",
        "model.unet_overrides.temporal_conv_resolutions=()", "model.schedule.name=linear",
        "optim.decay=constant", "train.sample_every=0", "model.p_uncond=0.0",
        "model.joint_image_fraction=0.5")


def _config(*overrides):
  return config_flags.load_config(CONFIG, list(TINY) + list(overrides))


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory):
  """One T5 embedding cache of the captions for every run of this module."""
  return f"data.text_cache={tmp_path_factory.mktemp('text_cache')}"


def test_stage_clips_take_every_kth_frame_and_average_pixel_blocks():
  """A 4-frame 8x8 stage of 8-frame 16x16 data: frames 0, 2, 4, 6, each the mean of 2x2
  blocks of the levels mapped to [-1, 1] (as the image stages read images)."""
  cfg = config_flags.load_config(CONFIG, ["model.num_frames=4", "model.resolution=8",
                                          "model.unet_overrides.temporal_conv_resolutions=()"]
                                 ).model
  stage = video_experiment.build_model(cfg, 17, (8, 16, 16, 1), nnx.Rngs(0))
  assert stage.image_shape == (4, 8, 8, 1)
  video = np.random.default_rng(0).integers(0, 17, (2, 8, 16, 16, 1))
  got = np.asarray(video_experiment.stage_videos(stage, {"video": jnp.asarray(video)}))
  x = (video + 0.5) / 17 * 2 - 1
  want = x[:, ::2].reshape(2, 4, 8, 2, 8, 2, 1).mean(axis=(3, 5))
  np.testing.assert_allclose(got, want, atol=1e-6)
  with pytest.raises(ValueError, match="num_frames=3 must divide"):
    video_experiment.build_model(_config("model.num_frames=3").model, 17, (8, 16, 16, 1),
                                 nnx.Rngs(0))


def test_joint_image_examples_are_frames_of_their_own_clip():
  """Image examples hold, at every position, some frame of the same example's clip (frames
  drawn at random times); video examples are untouched; the share of images is the
  fraction."""
  b, f = 400, 6
  # Frame k of example i is filled with the value 100 i + k, so a frame names its origin.
  x = (100 * np.arange(b)[:, None] + np.arange(f)[None, :]).astype(np.float32)
  x = np.broadcast_to(x[:, :, None, None, None], (b, f, 2, 2, 1))
  out, is_image = video_experiment.joint_images(jax.random.key(3), jnp.asarray(x), 0.25)
  out, is_image = np.asarray(out), np.asarray(is_image)
  origin = out[:, :, 0, 0, 0]
  np.testing.assert_array_equal(out[~is_image], x[~is_image])
  assert np.all(origin[is_image] // 100 == np.arange(b)[is_image, None])   # own clip
  times = origin[is_image] % 100
  assert not np.all(times == np.arange(f))   # not the clip in order: random times
  assert 0.18 < is_image.mean() < 0.32     # binomial(400, 0.25): std 0.022
  _, all_images = video_experiment.joint_images(jax.random.key(0), jnp.asarray(x), 1.0)
  assert np.all(np.asarray(all_images))


@pytest.fixture(scope="module")
def one_device_step(text_cache):
  return h.one_train_step(_config("mesh.ici=(1, 1, 1)", text_cache), jax.devices()[:1])


def test_video_train_step_on_8_devices_equals_1_device(text_cache, one_device_step):
  """One train step of the video stage (text from the cache, joint image examples, the frame
  axis unsharded) gives the same loss and parameters on a 2x4 fsdp mesh as on one device."""
  one = one_device_step
  eight = h.one_train_step(_config("mesh.ici=(2, 4, 1)", "mesh.rules=fsdp", text_cache),
                           jax.devices())
  np.testing.assert_allclose(eight[1]["loss"], one[1]["loss"], rtol=1e-5)
  h.assert_trees_equal(eight[0], one[0], rtol=2e-4, atol=2e-6)


def test_frames_split_over_chips_give_the_same_step_in_less_memory(text_cache,
                                                                    one_device_step):
  """Context parallelism (mesh rules "fsdp_frames"): on a 2 (fsdp) x 4 (tensor) mesh each
  chip holds 1 of the 4 frames of its clips, the input clips too. The step equals the
  one-device step, and its temporaries per chip are well under those of the same mesh
  with the frames whole on every chip of a tensor group (rules "fsdp"): with the frame axis
  gathered anywhere in the net, they would not be."""
  split = h.one_train_step(_config("mesh.ici=(1, 2, 4)", "mesh.rules=fsdp_frames",
                                   text_cache), jax.devices(), with_memory=True)
  whole = h.compiled_train_step(_config("mesh.ici=(1, 2, 4)", "mesh.rules=fsdp", text_cache),
                                jax.devices())[1].memory_analysis().temp_size_in_bytes
  np.testing.assert_allclose(split[1]["loss"], one_device_step[1]["loss"], rtol=1e-5)
  h.assert_trees_equal(split[0], one_device_step[0], rtol=2e-4, atol=2e-6)
  assert split[2] < 0.5 * whole, (split[2], whole)
  mesh = mesh_lib.make_mesh((1, 2, 4))
  video = lambda rules: mesh_lib.input_sharding(mesh, "video", (8, 4, 12, 12, 1), rules).spec
  assert video("fsdp_frames") == P(("data", "fsdp"), "tensor", None, None, None)
  assert video("fsdp") == P(("data", "fsdp"), None, None, None, None)
  with pytest.raises(ValueError, match="frames do not split"):
    mesh_lib.input_sharding(mesh, "video", (8, 6, 12, 12, 1), "fsdp_frames")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_cache):
  """Workdirs of the same 3 steps: "fresh" uninterrupted, "resumed" stopped after step 2 and
  rerun with the same command."""
  root = tmp_path_factory.mktemp("video_runs")
  config = lambda n, every: _config(f"train.num_steps={n}", f"train.checkpoint_every={every}",
                                    "train.log_every=1", text_cache)
  trainer.train(config(2, 2), str(root / "resumed"))
  trainer.train(config(3, 2), str(root / "resumed"))    # restores step 2
  trainer.train(config(3, 100), str(root / "fresh"))
  return {"fresh": root / "fresh", "resumed": root / "resumed", "config": config(3, 2)}


def test_a_resumed_video_run_equals_an_uninterrupted_one(trained):
  """Train 2 steps, then rerun the command for 3: the parameters equal those of a run of 3
  steps from scratch (the data position and the state were restored)."""
  setup = setup_lib.build(trained["config"])
  resumed = h.restore(setup, trained["resumed"])
  fresh = h.restore(setup, trained["fresh"])
  assert int(resumed["step"]) == int(fresh["step"]) == 3
  h.assert_trees_equal(h.host(resumed["params"]), h.host(fresh["params"]))


def test_video_sampling_on_8_devices_equals_1_device(trained):
  """launch.sample_video's sampler (the cascade runner on one video stage, the prompts'
  batch sharded over the mesh) gives the same guided clips on 8 devices as on 1."""
  prompts = ["the digit 3 moving left", "a 7 bouncing around"]
  run = lambda devices: cascade.run_cascade(
      [str(trained["fresh"])], prompts, num_per_prompt=4, steps=[2], guidance=[1.0],
      samplers_=["ddim"], aug_levels=[0.0], threshold="dynamic", seed=0, devices=devices)
  one, eight = run(jax.devices()[:1]).images[0], run(jax.devices()).images[0]
  assert one.shape == (8, 4, 12, 12, 1)
  np.testing.assert_allclose(eight, one, atol=1e-5)
  assert np.abs(one[0] - one[1]).max() > 0.1   # different noise per clip


def test_video_samples_are_written_as_gif_mp4_and_a_filmstrip(tmp_path):
  """write_samples of [N, F, H, W, 1] levels: a looping GIF whose frame f shows every
  video's frame f (level l as grey 255 l / 16), an MP4 of F frames, a PNG strip."""
  videos = np.zeros((2, 3, 4, 4, 1), np.int32)
  for f in range(3):
    videos[0, f, f, f] = 16          # a white pixel moving down the diagonal
    videos[1, f] = 8                 # a grey clip
  setup = types.SimpleNamespace(source=types.SimpleNamespace(num_levels=17))
  path = str(tmp_path / "samples" / "step_00000004.png")
  written = workdir_lib.write_samples(setup, videos, path)
  assert sorted(p.rsplit(".", 1)[1] for p in written) == ["gif", "mp4", "png"]
  gif = Image.open(written[0])
  frames = []
  for f in range(gif.n_frames):
    gif.seek(f)
    frames.append(np.asarray(gif.convert("L")))
  assert len(frames) == 3
  scale = 16                         # cells enlarged to 64 px: 64 // 4
  for f, frame in enumerate(frames):
    cell = frame[1 * scale:5 * scale, 1 * scale:5 * scale]   # video 0 (border 1 px * scale)
    lit = np.argwhere(cell[::scale, ::scale] == 255)
    np.testing.assert_array_equal(lit, [[f, f]])
    other = frame[1 * scale:5 * scale, 6 * scale:10 * scale]
    assert np.all(other == round(8 * 255 / 16))
  import av
  with av.open(io.BytesIO(open(written[1], "rb").read())) as container:
    assert sum(1 for _ in container.decode(video=0)) == 3
  strip = np.asarray(Image.open(path))
  assert strip.shape == ((2 * 5 + 1) * scale, (3 * 5 + 1) * scale)   # 2 rows of 3 frames


def test_clips_go_to_the_devices_as_uint8():
  clips = np.array([[[0, 16, 255]]], np.int32)
  out = families.device_batch({"video": clips, "label": np.array([3]), "caption": ["a"]},
                              ("video", "label"))
  assert set(out) == {"video", "label"} and out["video"].dtype == np.uint8
  np.testing.assert_array_equal(out["video"], clips)
  with pytest.raises(ValueError, match="outside uint8"):
    families.device_batch({"video": clips + 1}, ("video",))


def test_coordinates_and_training_crops_do_not_mix():
  cfg = _config("model.coord_cond=True", "model.crop_size=(8, 8)").model
  with pytest.raises(ValueError, match="coord_cond with model.crop_size"):
    video_experiment.build_model(cfg, 17, (4, 12, 12, 1), nnx.Rngs(0))
