"""Where every parameter lives on the mesh: logical axis names from its path, and one table
from logical axes to mesh axes.

A parameter's logical axes come from the last name in its path that `LOGICAL_AXES` knows,
if the rank agrees (`embed` [V, D] -> ("vocab", "embed")). `RULES` then maps each logical
axis to a mesh axis: FSDP shards the model dimension over `fsdp`; tensor parallelism splits
heads, the MLP's hidden dimension and the vocabulary over `tensor`. The same rules place
the optimizer state, whose leaves end in the parameters' paths (optax's `mu`/`nu` mirror
the params tree), so a moment lives with its parameter; scalars such as Adam's `count` and
leaves no rule names (a new kind of parameter) are replicated.

A dimension is sharded only when the mesh axis has size > 1 and divides it; otherwise that
dimension falls back to replicated (the `tiny` preset's 2 K/V heads on `tensor:4`, say), so
any mesh is valid for any model, at the cost of memory on the dimensions that do not divide.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpref.parallel.mesh import BATCH_AXES

# Parameter name (the last path key that names one) -> logical axes, one per dimension.
LOGICAL_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "q": ("embed", "heads", "head_dim"),
    "k": ("embed", "heads", "head_dim"),
    "v": ("embed", "heads", "head_dim"),
    "o": ("heads", "head_dim", "embed"),
    "gate": ("embed", "mlp"),
    "up": ("embed", "mlp"),
    "down": ("mlp", "embed"),
    "scale": ("embed",),
    # Mixtral's experts (jaxpref.models.moe): the expert axis first; the router is small.
    "router": ("embed", None),
    "expert_gate": ("experts", "embed", "mlp"),
    "expert_up": ("experts", "embed", "mlp"),
    "expert_down": ("experts", "mlp", "embed"),
}

# The one table from logical axes to mesh axes (None: never sharded).
RULES: dict[str, Optional[str]] = {
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "mlp": "tensor",
    # Expert parallelism: each `tensor` device holds whole experts (their `mlp` axis then
    # stays unsplit, as a mesh axis shards one dimension of a weight at most).
    "experts": "tensor",
    "head_dim": None,
    "lora_rank": None,
    # A scanned stack's layer axis: every device holds every layer's shard, so the scan
    # slices one layer locally; a pipeline axis would name a mesh axis here.
    "layers": None,
}


def _names(path) -> list[str]:
  out = []
  for key in path:
    name = getattr(key, "key", getattr(key, "name", None))
    if isinstance(name, str):
      out.append(name)
  return out


def _scanned(path) -> bool:
  """The leaf is a scanned stack's (`--model.scan_layers`): `layers/attn/q`, with no layer
  index after `layers` as the unrolled `layers/0/attn/q` has."""
  keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
  return any(a == "layers" and isinstance(b, str) for a, b in zip(keys, keys[1:]))


def logical_axes(path, ndim: int) -> tuple[Optional[str], ...]:
  """The logical axes of the leaf at `path` (a jax key path); None for unnamed dims. A
  scanned stack's leaf [L, ...] gets the `layers` axis, then its parameter's axes."""
  names = _names(path)
  if _scanned(path):
    return ("layers", *_leaf_axes(names, ndim - 1)) if ndim > 0 else ()
  return _leaf_axes(names, ndim)


def _leaf_axes(names: list[str], ndim: int) -> tuple[Optional[str], ...]:
  if len(names) >= 2 and names[-1] in ("lora_a", "lora_b"):
    return _lora_axes(names[-2].rsplit("/", 1)[-1], names[-1], ndim)
  for name in reversed(names):
    axes = LOGICAL_AXES.get(name)
    if axes is not None and len(axes) == ndim:
      return axes
  return (None,) * ndim


def _lora_axes(weight: str, factor: str, ndim: int) -> tuple[Optional[str], ...]:
  """A LoRA factor of `weight` (`jaxpref.models.lora`) follows the weight: A [*in, r] keeps
  its input axes, B [r, *out] its output axes, so A @ B comes out in the weight's layout."""
  axes = LOGICAL_AXES.get(weight)
  if axes is None or ndim - 1 >= len(axes):
    return (None,) * ndim
  if factor == "lora_a":
    return (*axes[:ndim - 1], "lora_rank")
  return ("lora_rank", *axes[len(axes) - ndim + 1:])


def partition_spec(axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh) -> P:
  """Logical axes -> PartitionSpec under `RULES`, replicating dims the mesh axis does not
  divide (and a mesh axis a dim before already took)."""
  spec, used = [], set()
  for axis, size in zip(axes, shape):
    mesh_axis = RULES.get(axis) if axis else None
    n = mesh.shape[mesh_axis] if mesh_axis else 1
    if n > 1 and size % n == 0 and mesh_axis not in used:
      spec.append(mesh_axis)
      used.add(mesh_axis)
    else:
      spec.append(None)
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def param_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedSharding for every leaf of a params state, or of anything whose leaves' paths end
  in parameter paths (the optimizer state); arrays or ShapeDtypeStructs."""
  def one(path, x):
    shape = getattr(x, "shape", ())
    return NamedSharding(mesh, partition_spec(logical_axes(path, len(shape)), shape, mesh))
  return jax.tree_util.tree_map_with_path(one, tree)


def opt_state_shardings(optimizer, params: Any, mesh: Mesh) -> Any:
  """Shardings of `optimizer.init(params)`, from its shapes alone (nothing allocated)."""
  return param_shardings(jax.eval_shape(optimizer.init, params), mesh)


def abstract_params(make_module: Callable[[], nnx.Module], mesh: Mesh):
  """(graphdef, params as ShapeDtypeStructs carrying their shardings), allocating nothing."""
  graphdef, shapes = nnx.split(nnx.eval_shape(make_module))
  shardings = param_shardings(shapes, mesh)
  return graphdef, jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_params(make_module: Callable[[], nnx.Module], mesh: Mesh):
  """(graphdef, params) built directly into their shardings: each device initialises only
  its shards, so a model too large for one device never exists whole. Values do not depend
  on the mesh (partitionable threefry)."""
  graphdef, abstract = abstract_params(make_module, mesh)
  shardings = jax.tree.map(lambda s: s.sharding, abstract)
  params = jax.jit(lambda: nnx.split(make_module())[1], out_shardings=shardings)()
  return graphdef, params


def init_tree(make: Callable[[], Any], mesh: Mesh) -> Any:
  """`make()` (a tree of arrays, e.g. LoRA adapters) built directly into the rules'
  shardings of its leaves' paths."""
  return jax.jit(make, out_shardings=param_shardings(jax.eval_shape(make), mesh))()


def init_opt_state(optimizer, params: Any, mesh: Mesh) -> Any:
  return jax.jit(optimizer.init, out_shardings=opt_state_shardings(optimizer, params, mesh))(params)


def abstract_opt_state(optimizer, params: Any, mesh: Mesh) -> Any:
  shapes = jax.eval_shape(optimizer.init, params)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, param_shardings(shapes, mesh))


def copy(tree: Any) -> Any:
  """Fresh buffers in the same shardings (the reference must not share the policy's
  buffers, which the train step donates)."""
  return jax.tree.map(jnp.copy, tree)


def keep_state_shardings(train_step: Callable, state: Any, mesh: Mesh) -> Callable:
  """`train_step(state, ref, batch) -> (state, metrics)` jitted so the new state comes out
  in the shardings of `state` (arrays or ShapeDtypeStructs) and the old one is donated;
  the inputs keep their own shardings (placed arrays, or those the structs carry).
  Without out_shardings, XLA's propagation may pick another layout for an updated leaf.
  Traced under `mesh`, so `constrain_batch` inside the model takes effect."""
  shardings = jax.tree.map(lambda x: x.sharding, state)
  return jax.jit(in_mesh(train_step, mesh), out_shardings=(shardings, NamedSharding(mesh, P())),
                 donate_argnums=0)


def in_mesh(fn: Callable, mesh: Mesh) -> Callable:
  """`fn` traced with `mesh` as the ambient mesh (what `constrain_batch` reads)."""
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)
  return wrapped


def constrain_batch(x: jax.Array) -> jax.Array:
  """Pins an activation's leading (batch) dimension to the mesh's batch axes; a no-op
  outside `in_mesh`. Without it, XLA may follow the FSDP-sharded weights and gather the
  batch instead of the weights (measured: 7x the activation memory of `data:8` on
  `fsdp:8` for the tiny model; 1.1x with the residual stream pinned)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def bytes_per_device(tree: Any) -> int:
  """Bytes one device holds of `tree` (arrays, or ShapeDtypeStructs carrying shardings):
  a NamedSharding gives every device the same shard shape."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))
