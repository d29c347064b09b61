"""`--init_from` at scale: a checkpoint's tensors placed straight into their sharded layout.

Building the whole float32 model on the host and then `device_put`-ing it needs the model
once on the host and, as `jnp.asarray` commits to device 0, once on the first chip (32 GB
for an 8B model: over a v5e chip's 16 GB). Here the run's parameters are first built in
their shardings (`sharding.init_params`, each device drawing only its shards), then each
checkpoint tensor replaces its leaf: a Hugging Face folder's safetensors are memory-mapped
and read one tensor at a time, converted to jaxpref's layout and cut into the pieces this
host's devices hold (`jax.make_array_from_callback`); a jaxpref folder's orbax checkpoint
restores straight into the target shardings. At any moment the host holds one tensor, and
each device its shards plus one leaf's.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping

import jax
import numpy as np
from flax import nnx

from jaxpref.models import hf
from jaxpref.models.convert import CONFIG_FILE, PARAMS_DIR
from jaxpref.models.decoder import Decoder, ModelConfig


class LazyTensors(Mapping):
  """A safetensors checkpoint's tensors by name, each read from its memory-mapped file only
  when asked for (the names come from the files' headers)."""

  def __init__(self, path: str, stack: contextlib.ExitStack):
    from safetensors import safe_open  # only the loader needs it at call time
    self._file: dict[str, Any] = {}
    for name in hf.shard_files(path):
      f = stack.enter_context(safe_open(os.path.join(path, name), framework="np"))
      self._file.update(dict.fromkeys(f.keys(), f))

  def __getitem__(self, name: str) -> np.ndarray:
    return self._file[name].get_tensor(name)

  def __iter__(self):
    return iter(self._file)

  def __len__(self) -> int:
    return len(self._file)


def hf_leaves(path: str, cfg: ModelConfig) -> Iterator[tuple[tuple, np.ndarray]]:
  """(jaxpref param path, array in jaxpref's layout) per checkpoint tensor, one at a time;
  the names are checked first, as `hf.model_from_tensors` checks them."""
  with contextlib.ExitStack() as stack:
    tensors = LazyTensors(path, stack)
    entries = hf.tensor_map(cfg)
    hf.check_names(cfg, tensors, entries, path)
    part_of = {p: name for name, parts in hf.fused_tensors(cfg) for p in parts}
    experts = dict(hf.stacked_tensors(cfg))  # Mixtral: a stack's per-expert tensors
    split: dict = {}  # Phi-3's fused tensor last read, split into its parts
    for name, param_path, to_ours, _ in entries:
      if name in experts:  # one layer's experts at a time, as hf.stack_experts stacks them
        parts = [tensors[p] for p in experts[name]]
        if len({a.shape for a in parts}) != 1:
          raise hf.UnsupportedCheckpoint(f"{path}: the experts of {name} differ in shape: "
                                         f"{sorted({a.shape for a in parts})}")
        array = np.stack(parts)
      elif name in part_of:
        if split.get(None) != part_of[name]:
          fused = part_of[name]
          split = {None: fused, **hf.split_fused(cfg, {fused: tensors[fused]}, path)}
        array = split[name]
      else:
        array = tensors[name]
      yield param_path, to_ours(array)


def _place(array: np.ndarray, like: jax.Array, where: str) -> jax.Array:
  """`array` cast to `like`'s dtype, each local device given only its shard of it."""
  if array.shape != like.shape:
    raise hf.UnsupportedCheckpoint(f"{where} has shape {array.shape}, the model wants "
                                   f"{like.shape} for this config")
  array = np.asarray(array, like.dtype)
  return jax.make_array_from_callback(like.shape, like.sharding, lambda idx: array[idx])


def load_into(path: str, cfg: ModelConfig, params: nnx.State) -> nnx.State:
  """`params` (a sharded State whose decoder leaves sit at the Decoder's paths; other leaves,
  such as an attached value head, are kept) with every decoder leaf replaced by the
  checkpoint's at `path` (a Hugging Face or a jaxpref folder), in the same shardings."""
  pure = nnx.to_pure_dict(params)
  if os.path.isfile(os.path.join(path, CONFIG_FILE)):
    _restore_jaxpref(path, cfg, pure)
  else:
    hf.check_causal(path)
    for param_path, array in hf_leaves(path, cfg):
      node = pure
      for key in param_path[:-1]:
        node = node[key]
      where = f"{path}: {'/'.join(map(str, param_path))}"
      node[param_path[-1]] = _place(array, node[param_path[-1]], where)
      del array  # the host copy goes before the next tensor is read
  nnx.replace_by_pure_dict(params, pure)
  return params


def _restore_jaxpref(path: str, cfg: ModelConfig, pure: dict) -> None:
  """A jaxpref folder's orbax checkpoint restored straight into `pure`'s decoder leaves'
  shardings and dtypes."""
  import orbax.checkpoint as ocp  # heavy; only jaxpref folders need it here
  shapes = nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))[1])

  def like(shape_tree: dict, leaves: dict) -> dict:
    return {k: like(v, leaves[k]) if isinstance(v, dict) else
            jax.ShapeDtypeStruct(leaves[k].shape, leaves[k].dtype, sharding=leaves[k].sharding)
            for k, v in shape_tree.items()}

  def merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
      if isinstance(v, dict):
        merge(dst[k], v)
      else:
        dst[k] = v

  ckpt = ocp.StandardCheckpointer()
  try:
    merge(pure, ckpt.restore(os.path.join(os.path.abspath(path), PARAMS_DIR), like(shapes, pure)))
  finally:
    ckpt.close()
