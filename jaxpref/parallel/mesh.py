"""A named device mesh from a flag: `--mesh=data:2,fsdp:2,tensor:2` (-1 = the rest)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both; FSDP also shards weights


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


def make_mesh(spec: str, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh(spec, len(devices))
  return Mesh(np.asarray(devices).reshape([sizes[a] for a in AXES]), AXES)


def batch_axis_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)
