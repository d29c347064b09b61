"""A named device mesh from a flag: `--mesh=data:2,fsdp:2,tensor:2` (-1 = the rest)."""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both; FSDP also shards weights
# Device kinds whose physical axes a mesh axis may split (as jax.make_mesh allows).
SPLIT_AXIS_KINDS = ("TPU v5 lite", "TPU v5e")


def parse_mesh(spec: str, n_devices: int) -> dict[str, int]:
  """'data:-1' -> {'data': n, 'fsdp': 1, 'tensor': 1}; errors name the flag and the problem."""
  sizes = {a: 1 for a in AXES}
  free = None
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, _, size = part.partition(":")
    if name not in AXES:
      raise ValueError(f"--mesh: unknown axis {name!r} in {spec!r}; axes are {', '.join(AXES)}")
    try:
      n = int(size)
    except ValueError:
      raise ValueError(f"--mesh: size of axis {name!r} must be an integer, got {size!r}") from None
    if n == -1:
      if free is not None:
        raise ValueError(f"--mesh: only one axis may be -1 in {spec!r}")
      free = name
    elif n < 1:
      raise ValueError(f"--mesh: size of axis {name!r} must be >= 1 or -1, got {n}")
    sizes[name] = n
  fixed = math.prod(v for k, v in sizes.items() if k != free)
  if free is not None:
    if n_devices % fixed:
      raise ValueError(f"--mesh={spec}: {n_devices} devices are not divisible by {fixed}")
    sizes[free] = n_devices // fixed
  if math.prod(sizes.values()) != n_devices:
    raise ValueError(f"--mesh={spec}: the axes multiply to {math.prod(sizes.values())}, "
                     f"but there are {n_devices} devices")
  return sizes


def device_grid(shape: Sequence[int], devices: Sequence[jax.Device]) -> np.ndarray:
  """`devices` laid out as `shape`, following the hardware's topology where JAX knows it.

  TPU: `mesh_utils.create_device_mesh` maps the mesh axes onto the chips' torus so each
  axis's collectives run over neighbouring links (`np.reshape` of `jax.devices()` can put
  a ring's neighbours hops apart); v5e/v5litepod may split a physical axis, as
  `jax.make_mesh` allows there. GPU: devices sorted by id. CPU: the plain reshape, so
  results there are unchanged. A shape the topology cannot take (or several slices) falls
  back to the plain reshape, with a warning. Not `jax.make_mesh` itself: it would make
  every axis Explicit, and jaxpref shards by annotation (Auto axes).
  """
  split = devices[0].device_kind in SPLIT_AXIS_KINDS
  if len({getattr(d, "slice_index", 0) for d in devices}) == 1:
    try:
      return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=split)
    except (ValueError, NotImplementedError, AssertionError) as e:
      reason = str(e)
  else:
    reason = "several slices (a hybrid mesh is not built yet)"
  logging.warning("mesh %s: devices in jax.devices() order, not the topology's: %s",
                  tuple(shape), reason)
  return np.asarray(devices).reshape(shape)


def make_mesh(spec: str, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh(spec, len(devices))
  return Mesh(device_grid([sizes[a] for a in AXES], devices), AXES)


def batch_axis_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)
