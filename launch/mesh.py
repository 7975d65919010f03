"""The device mesh and the logical-to-mesh sharding rules used by the one trainer.

Mesh
----
Every run uses one `jax.sharding.Mesh` with axes ("data", "fsdp", "tensor"):

  data    pure data parallelism: parameters replicated, the batch split.
  fsdp    fully sharded data parallelism (ZeRO-3): the batch is split over it too, and
          parameters / optimizer state are sharded over it and all-gathered per layer.
  tensor  tensor (Megatron) parallelism: hidden units and attention heads are split.

Sizes come from config: `config.mesh.ici` (within a slice / host, fast interconnect) and
`config.mesh.dcn` (across slices, slow network), e.g. ici=(-1, 1, 1), dcn=(1, 1, 1). One -1
in ICI takes the devices that remain. The mesh is created with `AxisType.Auto` axes: we use
plain `jax.jit` with explicit in_shardings / out_shardings and let GSPMD propagate
shardings inside, not JAX's explicit-sharding mode (the default of `jax.make_mesh`).

Logical axis rules
------------------
Networks name the dimensions of their parameters with logical names (vdm/nets/layers.py):
"conv_in", "conv_out", "embed", "mlp", "heads", "kv", "norm", "vocab" (None for unnamed
dims); activations use "batch", "frames", "length", "height", "width", "channels". A rule set is a
sequence of (logical_name, mesh_axis) pairs, mesh_axis a mesh axis name, a tuple of them,
or None (replicated). `rules_for` gives four presets; switching between data parallel,
FSDP and tensor parallel is a change of `config.mesh.rules` and `config.mesh.ici` only.

Model state is initialised by `sharded_init`: `jax.eval_shape` of the init, shardings from
the logical metadata, then a jitted init whose out_shardings place each shard directly on
its device, so a large model is never materialised on one device.
"""

import collections
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both data-parallel axes

PARAM_NAMES = ("conv_in", "conv_out", "embed", "mlp", "heads", "kv", "norm", "vocab")
ACTIVATION_NAMES = ("batch", "frames", "length", "height", "width", "channels")
LOGICAL_NAMES = PARAM_NAMES + ACTIVATION_NAMES

Rules = tuple[tuple[str, Any], ...]


# --- mesh ----------------------------------------------------------------------------------


def _sizes(sizes, what: str) -> tuple[int, int, int]:
  """Mesh sizes given as a tuple in AXES order or a dict {axis: size} (missing -> 1)."""
  if isinstance(sizes, dict) or hasattr(sizes, "items"):
    unknown = set(sizes.keys()) - set(AXES)
    if unknown:
      raise ValueError(f"mesh.{what} has unknown axes {sorted(unknown)}; the mesh axes are "
                       f"{AXES}.")
    sizes = tuple(int(sizes.get(a, 1)) for a in AXES)
  sizes = tuple(int(s) for s in sizes)
  if len(sizes) != len(AXES):
    raise ValueError(f"mesh.{what}={sizes} must give {len(AXES)} sizes, one per axis {AXES}.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh.{what}={sizes}: sizes must be positive, or -1 (fill).")
  return sizes


def _fill(ici, n_per_slice: int, n_devices: int, dcn) -> tuple[int, int, int]:
  """Replaces the (at most one) -1 in `ici` so that prod(ici) == n_per_slice."""
  fills = [i for i, s in enumerate(ici) if s == -1]
  if len(fills) > 1:
    raise ValueError(f"mesh.ici={ici} has {len(fills)} entries equal to -1; at most one "
                     "axis can fill the remaining devices. Give explicit sizes for the others.")
  known = int(np.prod([s for s in ici if s != -1]))
  if n_per_slice % known:
    raise ValueError(
        f"mesh.ici={ici} (with mesh.dcn={dcn}) does not divide the {n_devices} devices "
        f"({n_per_slice} per slice): the product of the explicit ICI sizes, {known}, must "
        f"divide {n_per_slice}. Choose ICI sizes whose product divides {n_per_slice}, or "
        "set one axis to -1.")
  if fills:
    ici = tuple(n_per_slice // known if s == -1 else s for s in ici)
  if int(np.prod(ici)) != n_per_slice:
    raise ValueError(
        f"mesh.ici={ici} x mesh.dcn={dcn} uses {int(np.prod(ici)) * int(np.prod(dcn))} "
        f"devices but there are {n_devices}. Make the product of all sizes equal {n_devices}, "
        "or set one ICI axis to -1 to fill.")
  return ici


def _hybrid_grid(ici, dcn, devices) -> np.ndarray:
  """Device grid of shape ici * dcn for several slices (slice index outermost per axis).

  TPUs say which slice a device is in (slice_index); elsewhere (multi-node GPU) a process
  is a slice; both go through `mesh_utils.create_hybrid_device_mesh`. Fake CPU devices
  (tests) have no slice_index and live in one process, which that helper cannot split, so
  there we emulate slices as contiguous blocks of device ids and tile their ICI meshes the
  same way the helper does. That path exists only to test multi-slice layouts on CPU.
  """
  n_slices = int(np.prod(dcn))
  by_process = not all(hasattr(d, "slice_index") for d in devices)
  attr = "process_index" if by_process else "slice_index"
  n_groups = len({getattr(d, attr) for d in devices})
  if n_groups == n_slices:
    return mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=by_process, allow_split_physical_axes=True)
  if by_process and n_groups == 1 and all(d.platform == "cpu" for d in devices):
    devices = sorted(devices, key=lambda d: d.id)
    per = len(devices) // n_slices
    tiles = np.empty(n_slices, dtype=object)
    tiles[:] = [mesh_utils.create_device_mesh(ici, devices[i * per:(i + 1) * per])
                for i in range(n_slices)]
    return np.block(tiles.reshape(dcn).tolist())
  raise ValueError(
      f"mesh.dcn={dcn} asks for {n_slices} slices but the {len(devices)} devices are in "
      f"{n_groups} groups by {attr}. Make the product of mesh.dcn equal the number of "
      "slices (TPU) or processes (GPU), e.g. mesh.dcn=(1, 1, 1) for a single slice.")


def make_mesh(ici, dcn=None, devices: Sequence[Any] | None = None) -> Mesh:
  """Builds the ("data", "fsdp", "tensor") mesh from ICI (and DCN) sizes.

  Args:
    ici: sizes within a slice, tuple in AXES order or dict; one -1 fills.
    dcn: sizes across slices (default all 1). The final size of each axis is ici * dcn,
      with the slice index outermost (devices of a slice are contiguous along each axis).
    devices: defaults to jax.devices().
  Returns:
    A Mesh with AxisType.Auto axes (GSPMD under plain jax.jit).
  """
  devices = list(jax.devices() if devices is None else devices)
  dcn = _sizes((1, 1, 1) if dcn is None else dcn, "dcn")
  if -1 in dcn:
    raise ValueError(f"mesh.dcn={dcn}: -1 is only allowed in mesh.ici; give the number of "
                     "slices along each axis explicitly.")
  ici = _sizes(ici, "ici")
  n_slices = int(np.prod(dcn))
  if len(devices) % n_slices:
    raise ValueError(f"mesh.dcn={dcn} asks for {n_slices} slices, which does not divide the "
                     f"{len(devices)} devices. Use a DCN product that divides {len(devices)}.")
  ici = _fill(ici, len(devices) // n_slices, len(devices), dcn)
  if n_slices == 1:
    grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  else:
    grid = _hybrid_grid(ici, dcn, devices)
  return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def describe(mesh: Mesh) -> str:
  """One line for logs, e.g. 'mesh data=8 fsdp=1 tensor=1 | 8 devices (8x cpu), 1 process'."""
  sizes = " ".join(f"{a}={n}" for a, n in mesh.shape.items())
  devs = mesh.devices.ravel()
  kinds = collections.Counter(d.device_kind for d in devs)
  kinds = ", ".join(f"{n}x {k}" for k, n in kinds.items())
  n_proc = len({d.process_index for d in devs})
  return (f"mesh {sizes} | {len(devs)} devices ({kinds}), {n_proc} "
          f"process{'es' if n_proc > 1 else ''}")


# --- logical axis rules --------------------------------------------------------------------

# "frames": a video's frame axis (imagen/video_unet.py); a rule set may shard it.
_ACTIVATIONS_REPLICATED = (("frames", None), ("length", None), ("height", None),
                           ("width", None), ("channels", None))

PRESETS = {
    # Pure data parallelism: every parameter replicated, the batch split over data x fsdp.
    "data_parallel": (("batch", BATCH_AXES),) + tuple((n, None) for n in PARAM_NAMES)
                     + _ACTIVATIONS_REPLICATED,
    # FSDP / ZeRO-3: each weight is split over "fsdp" along its first large named dim (the
    # duplicate-axis rule of logical_to_mesh_spec keeps "fsdp" on the first such dim).
    # conv kernels [kh, kw, in, out] on "conv_out"; dense [embed, mlp] on "embed",
    # [mlp, embed] on "mlp"; embeddings [vocab, embed] on "vocab". Norms, conv_in and the
    # per-head dim "kv" stay replicated. On a mesh with fsdp=1 this is data parallelism.
    "fsdp": (("batch", BATCH_AXES), ("conv_in", None), ("conv_out", "fsdp"),
             ("embed", "fsdp"), ("mlp", "fsdp"), ("heads", "fsdp"), ("kv", None),
             ("norm", None), ("vocab", "fsdp")) + _ACTIVATIONS_REPLICATED,
    # Tensor parallelism (Megatron): hidden units ("mlp"), attention heads and conv output
    # channels are split over "tensor"; the model width "embed" over "fsdp" (2D sharding
    # when fsdp > 1, a no-op on a data x tensor mesh). Activations between layers stay
    # replicated over "tensor"; GSPMD inserts the all-reduces after row-parallel layers.
    "tensor": (("batch", BATCH_AXES), ("conv_in", None), ("conv_out", "tensor"),
               ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv", None),
               ("norm", None), ("vocab", "tensor")) + _ACTIVATIONS_REPLICATED,
}
# Video context parallelism: FSDP's weights, and each clip's frames split over the "tensor"
# axis (which splits no weight here), so a chip holds F / tensor frames of its clips. For
# clips whose activations do not fit one chip (Imagen Video's 128-frame stages). The video
# input is split the same way (launch/setup.batch_shardings); spatial layers run on the
# local frames, temporal layers exchange the frames they need (GSPMD collectives). Keep
# the "tensor" axis within a host (mesh.ici), since a host loads whole clips.
PRESETS["fsdp_frames"] = (("frames", "tensor"),) + PRESETS["fsdp"]

_ACTIVATION_DEFAULTS = (("batch", BATCH_AXES),) + _ACTIVATIONS_REPLICATED

DEFAULT_RULES = PRESETS["fsdp"]  # with the default mesh (-1, 1, 1) this is data parallel


def _mesh_axes(value, name: str) -> tuple[str, ...]:
  """A rule's right-hand side as a tuple of mesh axes (None -> ())."""
  if value is None:
    return ()
  axes = (value,) if isinstance(value, str) else tuple(value)
  for a in axes:
    if a not in AXES:
      raise ValueError(f"rule ({name!r}, {value!r}) names mesh axis {a!r}; mesh axes are "
                       f"{AXES} (or None for replicated).")
  return axes


def rules_for(preset_or_rules) -> Rules:
  """Returns validated rules from a preset name or a sequence of (logical, mesh) pairs.

  Presets: "data_parallel", "fsdp", "tensor", "fsdp_frames" (see PRESETS). Pairs may come
  from a config as lists; they are normalised to tuples. The first rule for a logical name
  wins.
  """
  if isinstance(preset_or_rules, str):
    if preset_or_rules not in PRESETS:
      raise ValueError(f"unknown sharding preset {preset_or_rules!r}; choose one of "
                       f"{sorted(PRESETS)} or give (logical_name, mesh_axis) pairs.")
    return PRESETS[preset_or_rules]
  rules = []
  for pair in preset_or_rules:
    if len(pair) != 2 or not isinstance(pair[0], str):
      raise ValueError(f"rule {pair!r} must be a (logical_name, mesh_axis|tuple|None) pair.")
    name, value = pair
    axes = _mesh_axes(value, name)
    rules.append((name, None if not axes else axes[0] if isinstance(value, str) else axes))
  return tuple(rules)


def logical_to_mesh_spec(logical_names, rules) -> P:
  """Maps logical dim names to a PartitionSpec of mesh axes.

  A mesh axis may shard only one dim of an array: if a later dim maps to an axis already
  used by an earlier dim, that axis is dropped from the later dim (which is replicated if
  nothing remains). E.g. under "fsdp" rules ("embed", "mlp") -> P("fsdp", None). A logical
  name with no rule is an error (catches typos), None dims are replicated. A dim may be
  named by a tuple of logical names, major first, when it holds several logical dims
  folded together (a video's frames folded into the batch, ("batch", "frames")): it is
  split over their mesh axes in that order.
  """
  table = {}
  for name, value in rules_for(rules):
    table.setdefault(name, _mesh_axes(value, name))
  used, spec = set(), []
  for name in logical_names:
    if name is None:
      spec.append(None)
      continue
    parts = (name,) if isinstance(name, str) else tuple(name)
    for part in parts:
      if part not in table:
        raise ValueError(f"logical axis {part!r} has no sharding rule; add ({part!r}, None) "
                         f"or ({part!r}, <mesh axis>) to config.mesh.rules.")
    axes = tuple(dict.fromkeys(a for part in parts for a in table[part] if a not in used))
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def shard_for_shape(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Replicates every dim whose size is not divisible by the product of its mesh axes.

  Tiny test models have channel counts (e.g. 12) that do not divide 8 devices; rather than
  fail (or pad), such a dim is replicated. A spec longer than the array is an error.
  """
  if len(spec) > len(shape):
    raise ValueError(f"PartitionSpec {spec} has {len(spec)} entries for an array of shape "
                     f"{tuple(shape)}; give at most one entry per dim.")
  out = []
  for entry, size in zip(tuple(spec) + (None,) * (len(shape) - len(spec)), shape):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    n = int(np.prod([mesh.shape[a] for a in axes]))
    out.append(entry if axes and size % n == 0 else None)
  return P(*out)


def named_sharding(logical_names, shape, mesh: Mesh, rules) -> NamedSharding:
  """NamedSharding for one array given its logical dim names and shape."""
  spec = logical_to_mesh_spec(logical_names, rules)
  return NamedSharding(mesh, shard_for_shape(spec, shape, mesh))


def activation_hook(mesh: Mesh, rules) -> Callable[[jax.Array, tuple], jax.Array]:
  """`hook(x, names)` for `vdm.nets.sharding.use`: constrains an activation to the sharding of
  its logical names under `rules` (non-divisible dims replicated, as for parameters).

  Under the "fsdp" preset this keeps the batch split over ("data", "fsdp") and the channels
  whole at every block boundary, so GSPMD all-gathers weights (ZeRO-3) rather than resharding
  activations around convs whose kernels are split over "fsdp" (vdm/nets/sharding.py).
  Activation names that `rules` leave out take the presets' values (the batch over
  BATCH_AXES, as every batch is loaded; the other dims whole), so rule sets written for
  parameters only keep working.
  """
  rules = rules_for(rules) + _ACTIVATION_DEFAULTS   # the first rule for a name wins

  def hook(x, names):
    return jax.lax.with_sharding_constraint(x, named_sharding(names, x.shape, mesh, rules))

  return hook


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_shards(mesh: Mesh) -> int:
  """How many pieces the batch is split into: the product of the data-parallel axes."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dim split over ("data", "fsdp"), other dims replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def input_sharding(mesh: Mesh, key: str, shape: Sequence[int], rules) -> NamedSharding:
  """The sharding of one input of a batch: split over the data axes on its leading dim; a
  clip ("video", [B, F, ...]) also over whatever the rules split "frames" over, as the net's
  activations are (so a chip loads only its frames)."""
  names = ("batch", "frames") if key == "video" and len(shape) >= 2 else ("batch",)
  spec = logical_to_mesh_spec(names, rules_for(rules) + _ACTIVATION_DEFAULTS)
  frames = spec[1] if len(spec) > 1 else None
  if frames is not None and shape[1] % int(np.prod([mesh.shape[a] for a in (
      (frames,) if isinstance(frames, str) else frames)])):
    raise ValueError(f"the clips' {shape[1]} frames do not split over mesh axes {frames} "
                     f"(sizes {dict(mesh.shape)}) as config.mesh.rules asks; choose a frame "
                     "count divisible by them or a mesh.ici with a smaller one")
  rest = [frames] if len(names) > 1 else []
  return NamedSharding(mesh, P(BATCH_AXES, *rest, *([None] * (len(shape) - 1 - len(rest)))))


def shard_batch(mesh: Mesh, tree, num_shards: int):
  """Host arrays (the same on every process) -> global arrays split over the data axes,
  their leading dim padded with copies of the last row to a multiple of num_shards."""
  def one(x):
    x = np.asarray(x)
    pad = -x.shape[0] % num_shards
    x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x
    return jax.make_array_from_callback(x.shape, batch_sharding(mesh, x.ndim),
                                        lambda index: x[index])
  return jax.tree.map(one, tree)


# --- shardings of pytrees ------------------------------------------------------------------


def _logical_names(var: nnx.Variable):
  """Logical names stored by nnx.with_partitioning (metadata 'out_sharding'), or None."""
  return var.get_metadata().get("out_sharding") or None


def param_shardings(abstract_state, mesh: Mesh, rules):
  """A pytree of NamedShardings matching `abstract_state` (usable as jit in/out_shardings).

  `nnx.Variable` leaves (e.g. an nnx.State from `nnx.split`, abstract or concrete) are
  sharded by their logical names (`nnx.with_partitioning` metadata) through `rules`, with
  non-divisible dims replicated; the result keeps the Variable nodes (value = sharding), like
  `nnx.get_partition_spec`. Optax states built on an nnx.State (adam's mu / nu) hold the same
  Variables and so get the parameters' shardings. Other array leaves (step counters, plain
  arrays) are replicated; leaves without a shape stay as they are (None).
  """
  rules = rules_for(rules)

  def one(x):
    if isinstance(x, nnx.Variable):
      names = _logical_names(x)
      shape = x.get_value().shape
      sharding = (named_sharding(names, shape, mesh, rules) if names
                  else replicated(mesh))
      return x.replace(sharding)
    return replicated(mesh) if hasattr(x, "shape") else None

  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def tree_shardings_like(tree, param_tree_shardings):
  """Shardings for a pytree (e.g. an optax state) that contains copies of the param tree.

  Every subtree of `tree` with the same tree structure as `param_tree_shardings` (as
  adam's mu and nu mirror the params) takes the parameters' shardings leaf by leaf, made
  safe for the leaf's own shape by `shard_for_shape` (a factored second moment of another
  shape or rank is replicated where it does not fit). Everything else (counts, scalars,
  schedules' states) is replicated. Leaves of `tree` need only a `.shape`.
  """
  param_leaves, param_def = jax.tree.flatten(param_tree_shardings)
  if not param_leaves:
    raise ValueError("param_tree_shardings has no NamedSharding leaves.")
  mesh = param_leaves[0].mesh

  def like(leaf, sharding):
    if not hasattr(leaf, "shape"):
      return None
    if len(sharding.spec) > len(leaf.shape):
      return replicated(mesh)
    return NamedSharding(mesh, shard_for_shape(sharding.spec, leaf.shape, mesh))

  def walk(node):
    leaves, treedef = jax.tree.flatten(node)
    if treedef == param_def:
      return jax.tree.unflatten(treedef, [like(l, s) for l, s in zip(leaves, param_leaves)])
    children, one_level = jax.tree.flatten(node, is_leaf=lambda x: x is not node)
    if one_level.num_leaves == 1 and children and children[0] is node:  # a leaf
      return replicated(mesh) if hasattr(node, "shape") else None
    return jax.tree.unflatten(one_level, [walk(c) for c in children])

  return walk(tree)


def sharded_init(init_fn: Callable[..., Any], mesh: Mesh, rules, *args):
  """Initialises a state directly into its shards; returns (state, shardings).

  `init_fn(*args)` (e.g. `lambda rng: nnx.split(Model(..., rngs=nnx.Rngs(rng)))[1]`)
  returns a pytree whose Variables carry logical names. Its abstract shapes come from
  `jax.eval_shape`, the shardings from `param_shardings`, and a `jax.jit` with those
  out_shardings runs the init so each device only computes and holds its own shards.
  JAX's partitionable threefry makes the values independent of the mesh.
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = param_shardings(abstract, mesh, rules)
  state = jax.jit(init_fn, out_shardings=shardings)(*args)
  return state, shardings
