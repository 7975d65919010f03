"""The Imagen Video cascade (Ho et al. 2022b): temporal and spatial super-resolution stages.

A TSR stage's input at augmentation level 0 holds the given frames at their times and the
filled ones as specified; an SSR stage's input is the bilinear upsampling of the low-res clip
(a numpy reading of bilinear resizing); a base -> TSR -> SSR cascade samples the same clips on
8 devices as on 1; the paper config's stages chain and count about 11.6B parameters; a video
SR stage distils with its clips and low-res input; clip stages are written as GIF, MP4 and
a filmstrip.
"""

import math
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs.video import digits_cascade, imagen_video, moving_digits
from distill import progressive
from imagen import cascade, video_experiment, video_sr
from launch import cascade as cascade_lib
from launch import distill_pipeline
from launch import families
from launch import mesh as mesh_lib
from vdm import process, samplers

RNG = np.random.default_rng(0)


def _tiny(arg: str, **model):
  """A digits cascade stage (runlocal net) with model keys changed."""
  c = digits_cascade.get_config(arg)
  for key, value in model.items():
    c.model[key] = value
  return c


def _stage(config, data_shape):
  """The stage, built abstractly (nnx.eval_shape: no parameter is initialised); what these
  tests call on it besides the net (low-res inputs, the schedule) needs no parameters."""
  return nnx.eval_shape(lambda: video_experiment.build_model(config.model, 17, data_shape,
                                                             nnx.Rngs(0)))


def _bilinear_numpy(x, factor: int, axis: int):
  """Bilinear resizing of one axis by an integer factor, half-pixel centres, edges clamped
  (torch's align_corners=False), written out from its definition."""
  n = x.shape[axis]
  src = np.clip((np.arange(n * factor) + 0.5) / factor - 0.5, 0, n - 1)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, n - 1)
  w = (src - lo).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
  return np.take(x, lo, axis=axis) * (1 - w) + np.take(x, hi, axis=axis) * w


@pytest.mark.parametrize("fill", ["repeat", "blank"])
def test_tsr_input_at_level_zero_holds_the_given_frames_at_their_times(fill):
  """4 known frames of an 8-frame stage: known frame i at time 2i exactly; time 2i + 1 is
  frame i again ("repeat", the paper's repeating frames) or 0 ("blank" frames)."""
  stage = _stage(_tiny("tsr_runlocal", num_frames=8, lowres_frames=4, tsr_fill=fill),
                 (16, 16, 16, 1))
  x_low = jnp.asarray(RNG.uniform(-1, 1, (3, 4, 16, 16, 1)), jnp.float32)
  cond = stage.lowres_cond(x_low, jax.random.key(0), jnp.zeros((3,)))
  got = np.asarray(cond["lowres"])
  assert got.shape == (3, 8, 16, 16, 1)
  np.testing.assert_array_equal(got[:, 0::2], np.asarray(x_low))
  np.testing.assert_array_equal(got[:, 1::2], np.asarray(x_low) if fill == "repeat"
                                else np.zeros_like(got[:, 1::2]))
  # Augmentation is per video: level 0 keeps a clip, level 0.5 noises all of its frames.
  cond = stage.lowres_cond(x_low, jax.random.key(0), jnp.asarray([0.0, 0.5, 0.0]))
  mixed = np.asarray(cond["lowres"])
  np.testing.assert_array_equal(mixed[[0, 2]], got[[0, 2]])
  assert np.all(np.abs(mixed[1] - got[1]).mean(axis=(1, 2, 3)) > 0.1)
  np.testing.assert_allclose(cond["aug_logsnr"], stage.logsnr(jnp.asarray([0.0, 0.5, 0.0])))
  with pytest.raises(ValueError, match=r"conditions on clips of shape \(4, 16, 16, 1\)"):
    stage.lowres_cond(x_low[:, :3], jax.random.key(0), jnp.zeros((3,)))


def test_tsr_training_input_takes_every_kth_frame_and_keeps_image_examples_whole():
  """From the data (16 frames of 32x32): the stage's clips are every 2nd frame at 16x16, the
  low-frame-rate clip every 2nd of those; image examples (joint training) keep every frame."""
  c = _tiny("tsr_runlocal", num_frames=8, lowres_frames=4)
  stage = _stage(c, (16, 32, 32, 1))
  video = RNG.integers(0, 17, (2, 16, 32, 32, 1))
  x = np.asarray(video_experiment.stage_videos(stage, {"video": jnp.asarray(video)}))
  cond = video_experiment.stage_cond(
      stage, {"video": jnp.asarray(video), "text_emb": jnp.zeros((2, 3, 32)),
              "text_mask": jnp.ones((2, 3), jnp.int32)}, jax.random.key(0), c.model,
      train=False, is_image=jnp.asarray([False, True]), x=jnp.asarray(x))
  want = ((video + 0.5) / 17 * 2 - 1)[:, ::2].reshape(2, 8, 16, 2, 16, 2, 1).mean(axis=(3, 5))
  np.testing.assert_allclose(x, want, atol=1e-6)
  lowres = np.asarray(cond["lowres"])
  np.testing.assert_array_equal(lowres[0], np.repeat(x[0, ::2], 2, axis=0))
  np.testing.assert_array_equal(lowres[1], x[1])


def test_ssr_input_at_level_zero_is_the_bilinear_upsampling_of_the_low_res_clip():
  """Non-square frames (8x16 from 4x8, the paper's 40x24 aspect is also non-square): the
  SSR input equals a numpy bilinear resizing of every frame, and in training the low-res clip
  is the data's pixel means at the previous stage's size."""
  c = _tiny("ssr_runlocal", resolution=8, frame_size=(8, 16), lowres_size=4, num_frames=4)
  c.model.unet_overrides.update(dict(cross_attn_resolutions=(4,),
                                     temporal_conv_resolutions=(8, 4)))
  stage = _stage(c, (8, 16, 32, 1))
  assert stage.image_shape == (4, 8, 16, 1)
  x_low = RNG.uniform(-1, 1, (2, 4, 4, 8, 1)).astype(np.float32)
  got = stage.lowres_cond(jnp.asarray(x_low), jax.random.key(0), jnp.zeros((2,)))["lowres"]
  want = _bilinear_numpy(_bilinear_numpy(x_low, 2, axis=2), 2, axis=3)
  np.testing.assert_allclose(got, want, atol=1e-6)
  video = RNG.integers(0, 17, (2, 8, 16, 32, 1))
  batch = {"video": jnp.asarray(video), "text_emb": jnp.zeros((2, 3, 32)),
           "text_mask": jnp.ones((2, 3), jnp.int32)}
  _, cond = stage.data_and_cond(batch, jax.random.key(1), c.model)   # sample_aug_level 0
  low = ((video + 0.5) / 17 * 2 - 1)[:, ::2].reshape(2, 4, 4, 4, 8, 4, 1).mean(axis=(3, 5))
  np.testing.assert_allclose(cond["lowres"], _bilinear_numpy(_bilinear_numpy(low, 2, 2), 2, 3),
                             atol=1e-5)


def _random_params(stage, seed, scale=0.1):
  """(graphdef, params) of the stage with every parameter drawn from N(0, scale^2) (numpy, no
  initialiser runs): an untrained net whose every layer, the zero-initialised output layers
  included, passes on what it sees."""
  graphdef, params = nnx.split(stage, nnx.Param)
  rng = np.random.default_rng(seed)
  return graphdef, jax.tree.map(
      lambda p: (scale * rng.standard_normal(p.shape)).astype(p.dtype), params)


def test_video_cascade_on_8_devices_samples_the_same_clips_as_on_1():
  """base (4 frames of 8x8) -> TSR (8 frames) -> SSR (16x16), untrained perturbed nets, the
  batch of 3 prompts x 2 sharded (padded to 8) over 8 devices or on 1."""
  data = (8, 16, 16, 1)
  tiny = dict(ch=8, ch_mult=(1,), num_res_blocks=(1,), attn_resolutions=(),
              temporal_attn_resolutions=())
  base = _tiny("base_runlocal", num_frames=4, resolution=8)
  base.model.unet_overrides.update(tiny, cross_attn_resolutions=(8,),
                                   temporal_attn_resolutions=(8,),
                                   temporal_conv_resolutions=())
  tsr = _tiny("tsr_runlocal", num_frames=8, resolution=8, lowres_frames=4)
  tsr.model.unet_overrides.update(tiny, cross_attn_resolutions=(8,),
                                  temporal_conv_resolutions=(8,))
  ssr = _tiny("ssr_runlocal", num_frames=8, resolution=16, lowres_size=8)
  ssr.model.unet_overrides.update(tiny, cross_attn_resolutions=(16,),
                                  temporal_conv_resolutions=(16,))
  stages = [_random_params(_stage(c, data), i) for i, c in enumerate((base, tsr, ssr))]
  text = {"text_emb": RNG.normal(size=(6, 3, 32)).astype(np.float32),
          "text_mask": np.ones((6, 3), np.int32)}
  settings = [cascade.StageSettings(2, w, "ddim", aug, "dynamic")
              for w, aug in ((1.0, 0.0), (0.0, 0.0), (0.0, 0.3))]

  def run(devices):
    mesh = mesh_lib.make_mesh((-1, 1, 1), devices=devices)
    shards = mesh_lib.batch_shards(mesh)
    placed = [(g, jax.device_put(p, mesh_lib.replicated(mesh))) for g, p in stages]
    return cascade.run_cascade(
        placed, text, 6, settings, seed=5,
        place=lambda tree: mesh_lib.shard_batch(mesh, tree, shards),
        compile_fn=lambda fn, *args: jax.jit(
            fn, out_shardings=mesh_lib.replicated(mesh)).lower(*args).compile()).images

  one, eight = run(jax.devices()[:1]), run(jax.devices())
  assert [x.shape for x in one] == [(6, 4, 8, 8, 1), (6, 8, 8, 8, 1), (6, 8, 16, 16, 1)]
  for a, b in zip(one, eight):
    np.testing.assert_allclose(b, a, atol=2e-5)
  assert np.abs(one[-1][0] - one[-1][1]).max() > 1e-2   # per-clip noise


def _structure(model_cfg) -> str:
  """A stage's net up to the names of its levels: its kwargs with every list of level sizes
  written as level indices (the parameter count does not depend on the frame size)."""
  unet, height = dict(model_cfg.unet_overrides), model_cfg.resolution
  for key in ("attn_resolutions", "cross_attn_resolutions", "temporal_attn_resolutions",
              "temporal_conv_resolutions"):
    unet[key] = sorted(math.log2(height / size) for size in unet[key])
  return repr((sorted(unet.items()), bool(model_cfg.lowres_size or model_cfg.lowres_frames)))


def test_paper_cascade_stages_chain_and_count_about_11_6b_parameters(capsys):
  """Each Imagen Video stage conditions on exactly the previous stage's output shape (frames,
  non-square frames, channels), from 16x24x40 to 128x768x1280; the seven Video U-Nets
  (nnx.eval_shape: nothing allocated; one count per distinct net) total within 2% of the
  paper's 11.6B. Also the moving digits cascade chains."""
  def chain(module, names, data_shape):
    shapes = []
    for name in names:
      m = module.get_config(name).model
      stage = types.SimpleNamespace(image_shape=video_experiment.stage_shape(m, data_shape),
                                    lowres_size=m.lowres_size, lowres_frames=m.lowres_frames)
      if shapes:
        assert video_sr.low_shape(stage) == shapes[-1], (name, stage.image_shape, shapes)
      else:
        assert not (m.lowres_size or m.lowres_frames)
      shapes.append(stage.image_shape)
    return shapes

  assert chain(digits_cascade, ("base", "tsr", "ssr"), (16, 32, 32, 1)) == [
      (8, 16, 16, 1), (16, 16, 16, 1), (16, 32, 32, 1)]
  data = (128, 768, 1280, 3)
  shapes = chain(imagen_video, tuple(imagen_video.STAGES), data)
  assert shapes[0] == (16, 24, 40, 3) and shapes[-1] == data
  counts, by_structure = {}, {}
  for name in imagen_video.STAGES:
    m = imagen_video.get_config(name).model
    key = _structure(m)
    if key not in by_structure:
      stage = nnx.eval_shape(lambda m=m: video_experiment.build_model(m, 256, data,
                                                                      nnx.Rngs(0)))
      by_structure[key] = sum(math.prod(p.shape)
                              for p in jax.tree.leaves(nnx.state(stage.net, nnx.Param)))
    counts[name] = by_structure[key]
  total = sum(counts.values())
  with capsys.disabled():
    print("\nImagen Video stages: " + ", ".join(f"{n} {c / 1e9:.3f}B" for n, c in counts.items())
          + f"; total {total / 1e9:.2f}B (paper {imagen_video.PAPER_TOTAL_PARAMS / 1e9}B)")
  assert abs(total / imagen_video.PAPER_TOTAL_PARAMS - 1) < 0.02, total
  # Temporal attention only in the base; spatial self-attention only in base, ssr1, ssr2.
  for name in imagen_video.STAGES:
    unet = imagen_video.get_config(name).model.unet_overrides
    assert bool(unet.temporal_attn_resolutions) == (name == "base")
    assert bool(unet.attn_resolutions) == (name in imagen_video.SPATIAL_ATTENTION)


def test_video_sr_teacher_distils_on_its_clips_with_its_low_res_input():
  """The distill family's loss for a TSR teacher equals the progressive-distillation loss
  assembled by hand on the stage's clips [B, F, H, W, C] and its own conditioning (text and
  the augmented low-frame-rate clip)."""
  config = _tiny("tsr_runlocal", num_frames=4, resolution=8, lowres_frames=2)
  config.model.unet_overrides.update(dict(ch_mult=(1,), num_res_blocks=(1,),
                                          cross_attn_resolutions=(8,),
                                          temporal_conv_resolutions=(8,)))
  config.distill = ml_collections.ConfigDict(dict(
      kind="progressive", base_family="video", weighting="truncated_snr", clip="none",
      w_min=0.0, w_max=0.0, teacher_guidance_embedding=False, student_steps=4,
      sampler="ddim", sample_w=0.0))
  config.optim.weight_decay = 0.0
  graphdef, teacher_params = _random_params(_stage(config, (8, 16, 16, 1)), 1)
  teacher = nnx.merge(graphdef, teacher_params)
  batch = {"video": jnp.asarray(RNG.integers(0, 17, (2, 8, 16, 16, 1))),
           "text_emb": jnp.asarray(RNG.normal(size=(2, 3, 32)), jnp.float32),
           "text_mask": jnp.ones((2, 3), jnp.int32)}
  # A student that differs a little from its teacher.
  params = jax.tree.map(lambda a, b: a + 0.2 * b, teacher_params,
                        _random_params(teacher, 2)[1])
  rng = jax.random.key(3)
  loss, _, _ = jax.jit(lambda p: families.get_family("distill").loss_and_grads(
      graphdef, p, batch, rng, config, teacher))(params)

  k_cond, _, k_times = jax.random.split(rng, 3)
  x = video_experiment.stage_videos(teacher, batch)
  cond = video_experiment.stage_cond(teacher, batch, k_cond, config.model, train=False)
  assert x.shape == (2, 4, 8, 8, 1)
  assert set(cond) == {"text_emb", "text_mask", "lowres", "aug_logsnr"}

  @jax.jit
  def by_hand(params):
    k_i, k_eps = jax.random.split(k_times)
    i, t, t_mid, s = progressive.student_times(k_i, 2, 4)
    lam = teacher.logsnr(t)
    z = process.diffuse(x, lam, jax.random.normal(k_eps, x.shape))
    target = progressive.distillation_target(
        lambda a, b, c: teacher.denoise(a, b, c), z, lam, teacher.logsnr(t_mid),
        teacher.logsnr(s), i == 1, cond)
    x_hat = nnx.merge(graphdef, params).denoise(z, lam, cond).x
    per_example = progressive.x_space_loss(target, x_hat, lam, "truncated_snr")
    return per_example.mean() / (math.prod(x.shape[1:]) * math.log(2.0))

  np.testing.assert_allclose(loss, by_hand(params), rtol=1e-5)


def test_sample_cascade_writes_clip_stages_as_gif_mp4_and_filmstrip(tmp_path):
  """Clips [N, F, H, W, C] -> stageI_FxHxW.gif (F frames), .mp4, .png filmstrip; an image
  stage stays one PNG grid."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  clips = np.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4, 1)
  paths = cascade_lib.write_stage(str(tmp_path), 1, clips, 17, columns=2)
  assert [p.rsplit("/", 1)[1] for p in paths] == ["stage1_3x4x4.gif", "stage1_3x4x4.mp4",
                                                  "stage1_3x4x4.png"]
  assert Image.open(paths[0]).n_frames == 3
  strip = np.asarray(Image.open(paths[2]))
  assert strip.shape == ((2 * 5 + 1) * 16, (3 * 5 + 1) * 16)   # 2 rows of 3 frames, 64 px
  images = cascade_lib.write_stage(str(tmp_path), 0, clips[:, 0], 17, columns=2)
  assert [p.rsplit("/", 1)[1] for p in images] == ["stage0_4x4.png"]


def test_video_measures_score_a_cascade_stage_at_the_data_scale_and_frame_times():
  """A base stage's 2x2 clip of 2 frames is compared with the real 4-frame 4x4 clips at
  frames 0 and 2, enlarged by pixel repetition; shapes that do not divide are refused."""
  from evaluation import video as video_eval
  clips = np.arange(8).reshape(1, 2, 2, 2, 1)
  real = np.arange(64).reshape(1, 4, 4, 4, 1)
  big, reference = video_eval.at_reference_scale(clips, real)
  expected = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
  np.testing.assert_array_equal(big[0, 0, ..., 0], expected)
  np.testing.assert_array_equal(big[0, 1, ..., 0], expected + 4)
  np.testing.assert_array_equal(reference, real[:, [0, 2]])
  with pytest.raises(ValueError, match="do not divide"):
    video_eval.at_reference_scale(np.zeros((1, 3, 2, 2, 1)), real)


def test_ssr_training_crops_condition_on_the_matching_crop_of_the_low_res_clip():
  """Imagen Video's ssr3 trains on random crops: each clip's crop sits on the upsampling
  factor's grid, the same window in every frame, and its low-res input equals that window
  of the whole clip's low-res input (found here by searching the clip for the crop)."""
  c = _tiny("ssr_runlocal")                      # 32x32 frames from 16x16: factor 2
  stage = _stage(c, (16, 32, 32, 1))
  x = RNG.uniform(-1, 1, (3, 16, 32, 32, 1)).astype(np.float32)
  crops = np.asarray(video_sr.random_crops(stage, jnp.asarray(x), jax.random.key(3), (8, 16)))
  assert crops.shape == (3, 16, 8, 16, 1)
  low = np.asarray(video_sr.low_clip(stage, jnp.asarray(x)))
  for b in range(3):
    hits = [(y, x0) for y in range(32 - 8 + 1) for x0 in range(32 - 16 + 1)
            if np.array_equal(x[b, :, y:y + 8, x0:x0 + 16], crops[b])]
    assert len(hits) == 1 and hits[0][0] % 2 == 0 and hits[0][1] % 2 == 0, hits
    y, x0 = hits[0][0] // 2, hits[0][1] // 2
    np.testing.assert_allclose(video_sr.low_clip(stage, jnp.asarray(crops[b:b + 1]))[0],
                               low[b, :, y:y + 4, x0:x0 + 8], atol=1e-6)
  assert video_sr.training_input(stage, jnp.asarray(crops)).shape == crops.shape
  with pytest.raises(ValueError, match="multiple of the stage's upsampling factor 2"):
    video_sr.random_crops(stage, jnp.asarray(x), jax.random.key(3), (7, 16))


def _conv_input_sizes(config, data_shape):
  """The frame sizes (H, W) the net's convolutions see in one training step (traced only)."""
  stage = _stage(config, data_shape)
  graphdef, params = nnx.split(stage, nnx.Param)
  batch = {"video": jnp.zeros((2,) + data_shape, jnp.int32),
           "text_emb": jnp.zeros((2, 3, 32)), "text_mask": jnp.ones((2, 3), jnp.int32)}
  jaxpr = jax.make_jaxpr(lambda p: video_experiment.loss_and_grads(
      graphdef, p, batch, jax.random.key(0), config.model)[0])(params)
  sizes = set()

  def visit(jpr):
    for eqn in jpr.eqns:
      if eqn.primitive.name == "conv_general_dilated" and eqn.invars[0].aval.ndim == 4:
        sizes.add(tuple(eqn.invars[0].aval.shape[1:3]))
      for sub in jax.core.jaxprs_in_params(eqn.params):
        visit(sub)
  visit(jaxpr.jaxpr)
  return sizes


def test_ssr_crop_stage_trains_on_crops_and_samples_whole_frames():
  """With model.crop_size the training step's convolutions run on the crops (16x16 here),
  without it on whole 32x32 frames; the crop stage still samples whole frames."""
  levels = dict(cross_attn_resolutions=(8,), temporal_conv_resolutions=(16, 8))
  whole = _tiny("ssr_runlocal")
  cropped = _tiny("ssr_runlocal", crop_size=(16, 16))
  cropped.model.unet_overrides.update(levels)
  assert max(_conv_input_sizes(whole, (16, 32, 32, 1))) == (32, 32)
  assert max(_conv_input_sizes(cropped, (16, 32, 32, 1))) == (16, 16)
  assert _stage(cropped, (16, 32, 32, 1)).image_shape == (16, 32, 32, 1)
  with pytest.raises(ValueError, match="only spatial super-resolution stages"):
    _stage(_tiny("tsr_runlocal", crop_size=(8, 8)), (16, 32, 32, 1))


def test_distillation_summary_scores_video_stages_against_their_captions_and_clips():
  """launch.distill's per-stage quality of a moving-digits stage: the real eval clips handed
  in as "samples" score FD 0 and move as their captions say (direction accuracy 1, by the
  data's construction), also at half the frame rate (compared with the real clips at their
  frame times); the same clips under shifted captions no longer match them."""
  config = moving_digits.get_config("runlocal")
  source = families.get_family("video").get_source(config, config.data.eval_split)
  real = np.stack([np.asarray(source[i]["video"]) for i in range(12)]).astype(np.int32)
  levels = source.num_levels
  full = distill_pipeline.video_quality(config, real, levels)
  assert full["fd"] == pytest.approx(0.0, abs=1e-3)
  assert full["direction_accuracy"] == 1.0
  half = distill_pipeline.video_quality(config, real[:, ::2], levels)
  assert half["fd"] == pytest.approx(0.0, abs=1e-3)
  assert half["direction_accuracy"] == 1.0
  shifted = distill_pipeline.video_quality(config, np.roll(real, 1, axis=0), levels)
  assert shifted["fd"] == pytest.approx(0.0, abs=1e-3)   # the same set of clips
  assert shifted["direction_accuracy"] < 1.0 and shifted["alignment"] < full["alignment"]
  config.data.name = "synthetic:8x8x1"
  assert distill_pipeline.video_quality(config, real, levels) == {}


def test_a_guided_distilled_stage_samples_with_w_as_its_input_in_one_pass():
  """A stage whose net takes w (a student of guided distillation) is sampled by the cascade
  with w in its conditioning and no unconditional branch: exactly plain DDIM of its own
  denoiser on cond + {"guidance_w": w} (vdm.samplers, assembled here), and w changes it."""
  config = _tiny("base_runlocal", num_frames=4, resolution=8, guidance_embedding=True,
                 self_condition=False)
  config.model.unet_overrides.update(dict(ch=8, ch_mult=(1,), num_res_blocks=(1,),
                                          attn_resolutions=(), cross_attn_resolutions=(8,),
                                          temporal_attn_resolutions=(8,),
                                          temporal_conv_resolutions=()))
  graphdef, params = _random_params(_stage(config, (8, 16, 16, 1)), 4)
  model = nnx.merge(graphdef, params)
  assert cascade.takes_guidance_weight(model)
  text = {"text_emb": jnp.asarray(RNG.normal(size=(3, 3, 32)), jnp.float32),
          "text_mask": jnp.ones((3, 3), jnp.int32)}
  rng = jax.random.key(7)

  def by_cascade(w):
    return cascade.sample_stage(model, text, rng, 3, cascade.StageSettings(3, w, "ddim", 0.0,
                                                                           "none"))

  def by_hand(w):
    cond = {**model.sampling_cond(text, 3), "guidance_w": jnp.full((3,), w)}
    return samplers.sample(lambda z, lam, c: model.denoise(z, lam, c), model.logsnr,
                           (3,) + model.image_shape, jax.random.split(rng)[1], num_steps=3,
                           sampler="ddim", cond=cond)

  np.testing.assert_allclose(by_cascade(2.0), by_hand(2.0), atol=1e-5)
  assert np.abs(np.asarray(by_cascade(2.0)) - np.asarray(by_cascade(0.0))).max() > 1e-3
