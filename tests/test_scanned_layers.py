"""Scanned layers (vdm/nets/stack.py) in the three U-Nets: scan and unrolled loop give the
same outputs and gradients on one parameter layout, every remat policy gives the same
values, the stacked parameters count what the per-block nets counted (by hand), shard as
the per-block ones with a leading unnamed axis, per-block dropout keys reach their block,
and a checkpoint of the old per-block layout is refused with a message naming the fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen.efficient_unet import EfficientUNet
from imagen.unet_presets import efficient_unet_config
from launch import checkpoint as checkpoint_lib
from launch import mesh as mesh_lib
from tests.net_helpers import perturb
from vdm.nets import layers, stack
from vdm.nets.score_unet import ScoreUNet
from vdm.nets.unet import ResAttention, UNet

B, H, C = 2, 8, 2


def key(seed):
  return jax.random.key(seed, impl="unsafe_rbg")  # compiles faster than threefry on CPU


def make_score(**kw):
  return ScoreUNet(channels=C, ch=8, n_layer=3, with_attention=True, dropout=0.3,
                   fourier_min=1, fourier_max=2, **kw, rngs=nnx.Rngs(key(0)))


def make_unet(**kw):
  return UNet(channels=C, image_size=H, ch=8, ch_mult=(1, 2), num_res_blocks=2,
              attn_resolutions=(4,), num_heads=2, dropout=0.3, **kw, rngs=nnx.Rngs(key(0)))


def make_efficient(**kw):
  # tiny_sr at 8x8 with 2 ResBlocks per level: stacks on the way down and up.
  args = {**efficient_unet_config("tiny_sr"), "channels": C, "image_size": H,
          "num_res_blocks": (2, 2), "cross_attn_resolutions": (4,), "dropout": 0.3, **kw}
  return EfficientUNet(**args, rngs=nnx.Rngs(key(0)))


def inputs(net, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  z, logsnr = f(B, H, H, C), jnp.asarray([3., -2.], jnp.float32)
  cond = None
  if net == "efficient":
    cond = {"lowres": f(B, H, H, C), "aug_logsnr": jnp.asarray([5., 1.]),
            "text_emb": f(B, 3, 8), "text_mask": jnp.asarray([[1, 1, 0], [1, 0, 0]])}
  return z, logsnr, cond, f(B, H, H, C)


MAKERS = {"score": make_score, "unet": make_unet, "efficient": make_efficient}


def value_and_grads(net, state, **kw):
  """Output, and gradients of <output, w> w.r.t. the parameters and z, with dropout on."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: MAKERS[net](**kw)))
  z, logsnr, cond, w = inputs(net)

  def loss(state, z):
    out = nnx.merge(graphdef, state)(z, logsnr, cond, dropout_key=key(7))
    return jnp.sum(out * w), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, z)
  return out, grads


def init(make, **kw):
  """The net initialised in one jitted call (eager init compiles every op on its own), its
  parameters perturbed: zero-initialised layers must not hide a mismatch."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(**kw)))
  return perturb(nnx.merge(graphdef, jax.jit(lambda: nnx.state(make(**kw)))()))


@pytest.fixture(scope="module", params=list(MAKERS))
def net_state(request):
  return request.param, nnx.state(init(MAKERS[request.param]))


def assert_trees_close(got, want, rtol=1e-5):
  """Leaf by leaf, to rtol of the leaf's largest value. Attention key biases have an exact
  gradient of 0 (softmax ignores a shift shared by all keys): there both sides are rounding
  noise, held to rtol of the largest gradient of the tree."""
  got, want = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (got, want))
  assert [p for p, _ in got] == [p for p, _ in want]
  top = max(float(np.abs(np.asarray(w)).max()) for _, w in want)
  for (path, g), (_, w) in zip(got, want):
    g, w = np.asarray(g), np.asarray(w)
    names = [str(getattr(k, "key", k)) for k in path]
    if names[-3:-1] == ["k", "bias"] or names[-2:] == ["k", "bias"]:
      assert max(np.abs(g).max(), np.abs(w).max()) < rtol * top, path
      continue
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * float(np.abs(w).max()),
                               err_msg=str(names))


def test_scan_unrolled_and_remat_agree(net_state):
  net, state = net_state
  want_out, want_grads = value_and_grads(net, state)
  assert np.abs(np.asarray(want_out)).max() > 1e-2      # the perturbed net is not trivial
  # Unrolled with block remat, scanned with dots: each against scanned without remat.
  for kw in (dict(scan_layers=False, remat="block"), dict(remat="dots")):
    out, grads = value_and_grads(net, state, **kw)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=1e-5, atol=1e-5)
    assert_trees_close(grads, want_grads)


# --- an independent forward: per-block modules from slices of the stacked parameters ---


def unstack_unit(stacked: nnx.Module, i: int) -> nnx.Module:
  graphdef, state = nnx.split(stacked)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def test_score_unet_scan_matches_a_plain_loop_with_per_block_keys():
  """The documented schedule: block i of the down stack gets key i of split(key, 2n + 3),
  the middle blocks keys n and n + 1, up block j key n + 2 + j and the j-th skip from the
  end (conv_in's output last). Written here as a plain loop over per-block modules."""
  z, logsnr, _, _ = inputs("score")
  n, dkey = 3, key(11)
  graphdef, state = nnx.split(init(make_score))

  @jax.jit
  def reference(state, keys):
    model = nnx.merge(graphdef, state)
    emb = model.embedding(logsnr, {})
    hs = [model.conv_in(jnp.concatenate([z, layers.fourier_features(z, (1, 2))], -1))]
    for i in range(n):
      hs.append(unstack_unit(model.down.layers, i)(hs[-1], emb, keys[i]))
    h = model.mid1(hs[-1], emb, dropout_key=keys[n])
    h = model.mid2(model.mid_attn(h), emb, dropout_key=keys[n + 1])
    for j in range(n + 1):
      h = unstack_unit(model.up.layers, j)(jnp.concatenate([h, hs.pop()], -1), emb,
                                           keys[n + 2 + j])
    return z + model.conv_out(jax.nn.swish(model.norm_out(h)))

  keys = jax.random.split(dkey, 2 * n + 3)
  want = np.asarray(reference(state, keys))
  for scan in (True, False):
    g, _ = nnx.split(nnx.eval_shape(lambda: make_score(scan_layers=scan)))
    got = jax.jit(lambda s: nnx.merge(g, s)(z, logsnr, dropout_key=dkey))(state)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # Dropout is on, and its keys are per block: one key for every block changes the output.
  same = jnp.stack([keys[0]] * (2 * n + 3))
  assert np.abs(np.asarray(reference(state, same)) - want).max() > 1e-3


# --- which blocks are stacked ----------------------------------------------------------


def test_only_identical_blocks_are_stacked():
  """ADM, ch 8, mult (1, 2), 2 blocks per level, attention at 4x4 (level 1). Down: level 0
  has 2 blocks 8 -> 8 (one stack); level 1 has 8 -> 16 then 16 -> 16 (two single blocks).
  Up (level 1 first): inputs 16 + 16, 16 + 16, 16 + 8 (the downsample skip) -> a stack of 2
  and a single block; level 0: 16 + 8, 8 + 8, 8 + 8 -> a single block and a stack of 2."""
  model = nnx.eval_shape(make_unet)
  assert [c.lengths for c in model.down] == [(2,), (1, 1)]
  assert [c.lengths for c in model.up] == [(2, 1), (1, 2)]
  assert model.up[0].segments[0].layers.block.conv1.kernel.shape == (2, 3, 3, 32, 16)
  assert model.up[0].segments[1].block.conv1.kernel.shape == (3, 3, 24, 16)
  # Efficient U-Net, 2 blocks per level, mult (1, 2): down level 0 keeps the width (a
  # stack of 2), down level 1 widens in its first block; up level 1 (no skip at the
  # bottom) keeps it, up level 0 narrows in its first block.
  eff = nnx.eval_shape(make_efficient)
  assert [lv.blocks.lengths for lv in eff.down] == [(2,), (1, 1)]
  assert [lv.blocks.lengths for lv in eff.up] == [(2,), (1, 1)]


# --- parameter counts, by hand ---------------------------------------------------------------


def conv(cin, cout, k=3):
  return k * k * cin * cout + cout


def res(cin, cout, emb, adaptive):
  return (2 * cin + conv(cin, cout) + emb * (2 if adaptive else 1) * cout
          + (2 if adaptive else 1) * cout + 2 * cout + conv(cout, cout)
          + (conv(cin, cout, 1) if cin != cout else 0))


def attn(c):
  return 2 * c + 4 * (c * c + c)


def mlp(din, dout):
  return din * dout + dout + dout * dout + dout


def count(make, **kw):
  """Parameters of the net, from its abstract state (nothing initialised)."""
  model = nnx.eval_shape(lambda: make(**kw))
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_parameter_counts_are_those_of_the_per_block_nets():
  # ScoreUNet: ch 8, 3 down blocks, 3 + 1 up blocks on 2 ch, attention after each, Fourier
  # exponents (1, 2): conv_in sees C (1 + 2 * 2) channels.
  ch, e = 8, 32
  want = (mlp(ch, e) + conv(C * 5, ch) + 3 * (res(ch, ch, e, False) + attn(ch))
          + 2 * res(ch, ch, e, False) + attn(ch) + 4 * (res(2 * ch, ch, e, False) + attn(ch))
          + 2 * ch + conv(ch, C))
  assert count(make_score) == want
  # ADM UNet, the layout of test_only_identical_blocks_are_stacked.
  want = (mlp(8, e) + conv(C, 8) + 2 * res(8, 8, e, True) + conv(8, 8)
          + res(8, 16, e, True) + res(16, 16, e, True) + 2 * attn(16)
          + 2 * res(16, 16, e, True) + attn(16)
          + 2 * res(32, 16, e, True) + res(24, 16, e, True) + 3 * attn(16) + conv(16, 16)
          + res(24, 8, e, True) + 2 * res(16, 8, e, True) + 2 * 8 + conv(8, C))
  assert count(make_unet) == want
  # Efficient U-Net: the per-level ResBlocks on top of the same net with one block per
  # level (whose layout has no stack); each extra block is res(out, out) on each path.
  emb = 4 * 16
  extra = 2 * res(16, 16, emb, True) + 2 * res(32, 32, emb, True)
  assert count(make_efficient) == count(make_efficient, num_res_blocks=(1, 1)) + extra


# --- sharding -------------------------------------------------------------------------------


def test_stacked_parameters_shard_as_one_block_plus_a_leading_none():
  mesh = mesh_lib.make_mesh((1, 8, 1))
  model = nnx.eval_shape(make_score)
  stacked = mesh_lib.param_shardings(nnx.state(model.down.layers, nnx.Param), mesh, "fsdp")
  rngs = nnx.Rngs(key(1))  # one down block of make_score, built on its own
  block = ResAttention(layers.ResBlock(8, 8, 32, dropout=0.3, rngs=rngs),
                       layers.AttentionBlock(8, rngs=rngs))
  one = mesh_lib.param_shardings(nnx.state(block, nnx.Param), mesh, "fsdp")
  flat_stacked, flat_one = (dict(nnx.to_flat_state(t)) for t in (stacked, one))
  assert flat_stacked.keys() == flat_one.keys()
  sharded = 0
  for path, var in flat_one.items():
    spec = tuple(var.get_value().spec)
    assert tuple(flat_stacked[path].get_value().spec) == (None,) + spec, path
    sharded += any(a is not None for a in spec)
  assert sharded > 5  # the fsdp rules do shard the block's axes here


# --- checkpoints ----------------------------------------------------------------------------


def old_layout(params: dict) -> dict:
  """A ScoreUNet's pure parameter dict in the pre-scan layout: one entry per block,
  `down/<i>` (ResBlock) and `down_attn/<i>` (attention), the same for up."""
  out = {k: v for k, v in params.items() if k not in ("down", "up")}
  for name in ("down", "up"):
    unit = params[name]["layers"]
    n = jax.tree.leaves(unit)[0].shape[0]
    for part, key_ in (("block", name), ("attn", f"{name}_attn")):
      out[key_] = {str(i): jax.tree.map(lambda a, i=i: a[i], unit[part]) for i in range(n)}
  return out


def as_saved(tree):
  """nnx Variables are saved as {'value': array}: rebuild that from a pure dict."""
  if isinstance(tree, dict):
    return {k: as_saved(v) for k, v in tree.items()}
  return {"value": np.asarray(tree)}


def abstract_of(make, mesh, **kw):
  params = nnx.state(nnx.eval_shape(lambda: make(**kw)), nnx.Param)
  shardings = mesh_lib.param_shardings(params, mesh, "fsdp")
  return jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
                      {"params": params}, {"params": shardings})


def test_checkpoints_restore_across_scan_modes_and_old_layout_is_refused(tmp_path):
  mesh = mesh_lib.make_mesh((1, 8, 1))
  params = nnx.state(init(make_score), nnx.Param)
  with checkpoint_lib.Checkpointer(tmp_path / "new", save_every=1, keep=1) as ckpt:
    ckpt.save(1, {"params": params}, force=True)
    ckpt.wait()
    # Saved from a scanned net, restored into an unrolled one: one layout.
    restored, _ = ckpt.restore(abstract_of(make_score, mesh, scan_layers=False))
  for got, want in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(params),
                       strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

  old = as_saved(old_layout(params.to_pure_dict()))
  assert "3" in old["up"] and "0" in old["down_attn"]
  with checkpoint_lib.Checkpointer(tmp_path / "old", save_every=1, keep=1) as ckpt:
    ckpt.save(1, {"params": old}, force=True)
    ckpt.wait()
    with pytest.raises(checkpoint_lib.CheckpointError,
                       match=r"unstacked layer layout(.|\n)*/params/down/0/(.|\n)*8e9ee51"):
      ckpt.restore(abstract_of(make_score, mesh))


def test_bad_remat_policy_is_refused():
  with pytest.raises(ValueError, match="remat='full' is not a remat policy; choose one of"):
    nnx.eval_shape(lambda: make_score(remat="full"))
