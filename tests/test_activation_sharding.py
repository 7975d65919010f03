"""Activation sharding under FSDP (vdm/nets/sharding.py, launch.mesh.activation_hook,
launch.setup.on_mesh): with the hook active, a compiled step gathers weights and never
activations; setup binds every family's functions to it."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen.efficient_unet import EfficientUNet
from launch import aot, config_flags, families
from launch import mesh as mesh_lib
from launch import setup as setup_lib
from vdm.nets import sharding

_COLLECTIVE = re.compile(r"^\s*(?:ROOT )?%?\S+ = (\S+) (all-reduce|all-gather|all-to-all|"
                         r"reduce-scatter)(?:-start)?\(", re.M)


def _collectives(hlo: str) -> list[tuple[str, str, int]]:
  """(op, result type, result bytes) of every collective of an optimized HLO module."""
  out = []
  for result, op in _COLLECTIVE.findall(hlo):
    nbytes = sum(aot._DTYPE_BYTES[d] * int(np.prod([int(n) for n in dims.split(",") if n]))
                 for d, dims in aot._ARRAY_TYPE.findall(result))
    out.append((op, result, nbytes))
  return out


def test_fsdp_unet_gradient_gathers_weights_not_activations():
  # The Efficient U-Net's loss and gradients on 8 devices: every weight split over "fsdp"
  # (the fsdp preset), the batch over "fsdp" too. Measured without the hook (jax 0.10.2):
  # GSPMD keeps the conv kernels in place and all-gathers the whole batch's activations
  # (an all-gather f32[8, 8, 8, 32], and 18 all-to-alls); with it, every collective moves
  # at most one parameter (weights gathered, gradients reduced).
  kw = dict(channels=3, image_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=(1, 1),
            num_heads=2)
  mesh = mesh_lib.make_mesh((1, -1, 1))
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: EfficientUNet(**kw,
                                                                       rngs=nnx.Rngs(0))))
  param_sh = mesh_lib.param_shardings(abstract, mesh, "fsdp")
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, param_sh)
  z = jax.ShapeDtypeStruct((8, 8, 8, 3), jnp.float32, sharding=mesh_lib.batch_sharding(mesh, 4))

  def loss_and_grads(p, z):
    with sharding.use(mesh_lib.activation_hook(mesh, "fsdp")):
      loss = lambda p: jnp.mean((nnx.merge(graphdef, p)(z, jnp.zeros(z.shape[:1])) - z) ** 2)
      return jax.value_and_grad(loss)(p)

  hlo = jax.jit(loss_and_grads, out_shardings=(mesh_lib.replicated(mesh), param_sh)).lower(
      params, z).compile().as_text()
  largest_param = max(np.prod(a.shape) * 4 for a in jax.tree.leaves(abstract))
  found = _collectives(hlo)
  # FSDP really is on: whole conv kernels are gathered (here [3, 3, 16, 32], level 1).
  assert any(op == "all-gather" and result.startswith("f32[3,3,16,32]")
             for op, result, _ in found), found
  too_big = [(op, result) for op, result, n in found if n > largest_param]
  assert not too_big, f"activation-sized collectives under FSDP: {too_big}"
  assert sum(op == "all-to-all" for op, _, _ in found) <= 4, found


def test_setup_traces_family_functions_under_the_hook_and_pins_grads():
  config = config_flags.load_config("configs/vdm/digits.py:runlocal", [
      "mesh.ici=(1, -1, 1)", "mesh.rules=fsdp"])
  setup = setup_lib.build(config)
  params = setup.abstract_state["params"]
  batch = {"image": jnp.zeros((8, 8, 8, 1), jnp.int32), "label": jnp.zeros((8,), jnp.int32)}
  rng = jax.random.key(0)
  count = lambda family: str(jax.make_jaxpr(
      lambda p: family.loss_and_grads(setup.graphdef, p, batch, rng, config))(params)).count(
          "sharding_constraint")
  plain = families.get_family(config.family)
  # One constraint per parameter (the gradients) plus the nets' activation constraints.
  assert count(plain) == 0
  assert count(setup.family) > len(jax.tree.leaves(params))
  assert sharding.active() is None   # the hook is active only while tracing
