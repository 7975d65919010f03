"""Mesh construction, logical-to-mesh rules and sharded init (8 fake CPU devices)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from launch import mesh as M


def _sizes(mesh):
  return tuple(mesh.shape[a] for a in M.AXES)


# --- make_mesh -----------------------------------------------------------------------------


def test_make_mesh_fill_and_explicit_sizes():
  assert _sizes(M.make_mesh((-1, 1, 1))) == (8, 1, 1)
  assert _sizes(M.make_mesh((2, -1, 2))) == (2, 2, 2)
  assert _sizes(M.make_mesh({"fsdp": 4, "data": -1})) == (2, 4, 1)
  mesh = M.make_mesh((2, 4, 1))
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert sorted(d.id for d in mesh.devices.ravel()) == list(range(8))
  line = M.describe(mesh)
  assert "data=2 fsdp=4 tensor=1" in line and "8 devices" in line and "cpu" in line


@pytest.mark.parametrize("ici, needle", [((3, -1, 1), "8 devices"),
                                         ((-1, -1, 1), "at most one"),
                                         ((2, 2, 1), "8"),
                                         ((2, 2), "3 sizes")])
def test_make_mesh_bad_sizes_raise_clear_errors(ici, needle):
  with pytest.raises(ValueError, match=needle):
    M.make_mesh(ici)


def test_make_mesh_multislice_emulated_on_cpu():
  """dcn (2,1,1) x ici (-1,1,1): 4 devices per slice, slice index outermost on 'data'."""
  mesh = M.make_mesh((-1, 1, 1), dcn=(2, 1, 1))
  assert _sizes(mesh) == (8, 1, 1)
  data_ids = [d.id for d in mesh.devices[:, 0, 0]]
  assert sorted(data_ids[:4]) == [0, 1, 2, 3] and sorted(data_ids[4:]) == [4, 5, 6, 7]
  mesh = M.make_mesh((1, -1, 2), dcn=(2, 1, 1))
  assert _sizes(mesh) == (2, 2, 2)
  assert sorted(d.id for d in mesh.devices[0].ravel()) == [0, 1, 2, 3]
  with pytest.raises(ValueError, match="only allowed in mesh.ici"):
    M.make_mesh((-1, 1, 1), dcn=(-1, 1, 1))


def test_hybrid_grid_groups_by_slice_index_then_process():
  """The real-hardware path (create_hybrid_device_mesh), fed stand-in device objects."""
  fake = lambda i, **kw: types.SimpleNamespace(id=i, platform="gpu", device_kind="x", **kw)
  ids = np.vectorize(lambda d: d.id)
  # TPU-like: slice 0 holds the even ids, slice 1 the odd ones; slice index outermost.
  devs = [fake(i, process_index=0, slice_index=i % 2) for i in range(8)]
  assert list(ids(M._hybrid_grid((4, 1, 1), (2, 1, 1), devs)).ravel()) == [0, 2, 4, 6,
                                                                           1, 3, 5, 7]
  # GPU-like: no slice_index, one process per slice (ids 4-7 in process 0).
  devs = [fake(i, process_index=1 - i // 4) for i in range(8)]
  grid = ids(M._hybrid_grid((1, 2, 2), (2, 1, 1), devs))
  assert grid.shape == (2, 2, 2) and sorted(grid[0].ravel()) == [4, 5, 6, 7]
  with pytest.raises(ValueError, match="groups by process_index"):
    M._hybrid_grid((2, 1, 1), (4, 1, 1), devs)


# --- rules ---------------------------------------------------------------------------------

EXPECTED = {
    "data_parallel": {("conv_in", "conv_out"): P(None, None),
                      ("embed", "mlp"): P(None, None),
                      ("batch", None, None, None): P(("data", "fsdp"), None, None, None)},
    "fsdp": {("conv_in", "conv_out"): P(None, "fsdp"),
             ("embed", "mlp"): P("fsdp", None),  # "fsdp" used by embed, dropped for mlp
             ("batch", None, None, None): P(("data", "fsdp"), None, None, None)},
    "tensor": {("conv_in", "conv_out"): P(None, "tensor"),
               ("embed", "mlp"): P("fsdp", "tensor"),
               ("batch", None, None, None): P(("data", "fsdp"), None, None, None)},
    # Weights as "fsdp"; a clip's frames over "tensor", also where they are folded into
    # the batch (a tuple name: the dim's mesh axes are its parts' axes, major first).
    "fsdp_frames": {("conv_in", "conv_out"): P(None, "fsdp"),
                    ("embed", "mlp"): P("fsdp", None),
                    ("batch", "frames", None): P(("data", "fsdp"), "tensor", None),
                    (("batch", "frames"), None): P(("data", "fsdp", "tensor"), None)},
}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_presets_give_expected_specs(preset):
  for names, spec in EXPECTED[preset].items():
    assert M.logical_to_mesh_spec(names, M.rules_for(preset)) == spec, names
  # Every logical name used by the networks has a rule in every preset.
  M.logical_to_mesh_spec(M.LOGICAL_NAMES, preset)


def test_rules_from_config_pairs_and_errors():
  rules = M.rules_for([["batch", ["data", "fsdp"]], ["mlp", "tensor"], ["embed", None]])
  assert M.logical_to_mesh_spec(("batch", "embed", "mlp"), rules) == P(
      ("data", "fsdp"), None, "tensor")
  # "batch" takes data and fsdp; a later dim asking for fsdp keeps only what is left.
  rules = M.rules_for([("batch", ("data", "fsdp")), ("embed", ("fsdp", "tensor"))])
  assert M.logical_to_mesh_spec(("batch", "embed"), rules) == P(("data", "fsdp"), "tensor")
  with pytest.raises(ValueError, match="no sharding rule"):
    M.logical_to_mesh_spec(("embd",), "fsdp")
  with pytest.raises(ValueError, match="'frams' has no sharding rule"):
    M.logical_to_mesh_spec((("batch", "frams"),), "fsdp")
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    M.rules_for([("mlp", "model")])
  with pytest.raises(ValueError, match="unknown sharding preset"):
    M.rules_for("zero3")


def test_shard_for_shape_replicates_non_divisible_dims():
  mesh = M.make_mesh((2, 4, 1))
  spec = P(("data", "fsdp"), "fsdp", None)
  assert M.shard_for_shape(spec, (16, 12, 3), mesh) == P(("data", "fsdp"), "fsdp", None)
  assert M.shard_for_shape(spec, (12, 6, 3), mesh) == P(None, None, None)
  assert M.shard_for_shape(P("data"), (6, 5), mesh) == P("data", None)
  assert M.batch_sharding(mesh, 2).shard_shape((16, 3)) == (2, 3)
  assert M.replicated(mesh).shard_shape((16, 3)) == (16, 3)


# --- sharded init of an NNX model ----------------------------------------------------------


def _linear(din, dout, names, rngs):
  part = lambda init, n: nnx.with_partitioning(init, n, eager_sharding=False)
  return nnx.Linear(din, dout, rngs=rngs,
                    kernel_init=part(nnx.initializers.lecun_normal(), names),
                    bias_init=part(nnx.initializers.normal(1.0), (names[1],)))


class TwoLayer(nnx.Module):

  def __init__(self, rngs):
    self.up = _linear(8, 12, ("embed", "mlp"), rngs)
    self.down = _linear(12, 8, ("mlp", "embed"), rngs)


def _init(rng):
  return nnx.split(TwoLayer(nnx.Rngs(rng)))[1]


# Shard shapes under the fsdp preset, worked out by hand: "fsdp" goes to the first named
# dim, and a dim of 12 does not divide an fsdp axis of 8, so it is replicated.
FSDP_SHARD_SHAPES = {
    (1, 8, 1): {"up.kernel": (1, 12), "up.bias": (12,), "down.kernel": (12, 8),
                "down.bias": (1,)},
    (2, 4, 1): {"up.kernel": (2, 12), "up.bias": (3,), "down.kernel": (3, 8),
                "down.bias": (2,)},
}


@pytest.mark.parametrize("ici", sorted(FSDP_SHARD_SHAPES))
def test_sharded_init_fsdp_shards_and_matches_plain_init(ici):
  mesh = M.make_mesh(ici)
  rng = jax.random.key(3)
  state, shardings = M.sharded_init(_init, mesh, "fsdp", rng)
  plain = _init(rng)  # eager, single device
  for path, want in FSDP_SHARD_SHAPES[ici].items():
    layer, leaf = path.split(".")
    arr = state[layer][leaf].get_value()
    assert arr.sharding.shard_shape(arr.shape) == want, path
    assert shardings[layer][leaf].get_value() == arr.sharding, path
    np.testing.assert_allclose(np.asarray(arr), np.asarray(plain[layer][leaf].get_value()),
                               rtol=1e-6, atol=1e-7, err_msg=path)
  # The model is the same whatever the mesh: a data-parallel init gives the same values.
  state_dp, _ = M.sharded_init(_init, M.make_mesh((-1, 1, 1)), "data_parallel", rng)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state_dp)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_optimizer_state_shardings_follow_params():
  mesh = M.make_mesh((1, 8, 1))
  state, shardings = M.sharded_init(_init, mesh, "fsdp", jax.random.key(0))
  kernel_sharding = shardings["up"]["kernel"].get_value()
  assert kernel_sharding.spec == P("fsdp", None)
  # optax over an nnx.State: mu / nu keep the Variables and their logical names.
  opt_abstract = jax.eval_shape(optax.adam(1e-3).init, state)
  opt_sh = M.param_shardings(opt_abstract, mesh, "fsdp")
  assert opt_sh[0].mu["up"]["kernel"].get_value() == kernel_sharding
  assert opt_sh[0].count == M.replicated(mesh)
  # optax over plain arrays: shardings mirrored by tree path structure.
  params = state.to_pure_dict()
  param_sh = shardings.to_pure_dict()
  opt_abstract = jax.eval_shape(optax.adamw(1e-3).init, params)
  opt_sh = M.tree_shardings_like(opt_abstract, param_sh)
  assert opt_sh[0].nu["up"]["kernel"] == kernel_sharding
  assert opt_sh[0].mu["down"]["bias"].spec == P("fsdp")
  assert opt_sh[0].count == M.replicated(mesh)
  opt = jax.jit(optax.adamw(1e-3).init, out_shardings=opt_sh)(params)
  mu = opt[0].mu["up"]["kernel"]
  assert mu.sharding.shard_shape(mu.shape) == (1, 12)


# --- a sharded computation -----------------------------------------------------------------


def test_tensor_parallel_mlp_matches_numpy():
  """x @ w1 (column-parallel) then relu then @ w2 (row-parallel) on data=2 x tensor=4."""
  mesh = M.make_mesh((2, 1, 4))
  rules = M.rules_for("tensor")
  rs = np.random.RandomState(0)
  x, w1, w2 = rs.randn(8, 16), rs.randn(16, 32), rs.randn(32, 16)
  sh = lambda names, a: M.named_sharding(names, a.shape, mesh, rules)
  in_sh = (sh(("batch", "embed"), x), sh(("embed", "mlp"), w1), sh(("mlp", "embed"), w2))
  assert in_sh[1].shard_shape(w1.shape) == (16, 8)
  assert in_sh[2].shard_shape(w2.shape) == (8, 16)
  assert in_sh[0].shard_shape(x.shape) == (4, 16)
  f = jax.jit(lambda x, a, b: jax.nn.relu(x @ a) @ b, in_shardings=in_sh,
              out_shardings=M.batch_sharding(mesh, 2))
  args = [jax.device_put(jnp.asarray(v, jnp.float32), s) for v, s in zip((x, w1, w2), in_sh)]
  out = f(*args)
  assert out.sharding.shard_shape(out.shape) == (4, 16)
  np.testing.assert_allclose(np.asarray(out), np.maximum(x @ w1, 0) @ w2, rtol=1e-4,
                             atol=1e-4)
