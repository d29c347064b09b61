"""Multi-process start-up and host-to-device batch placement.

One `jaxpref-train` process runs per host (TPU VM worker, SLURM task, or a process on a
laptop in the tests). `initialize` joins them into one JAX runtime; afterwards
`jax.devices()` lists every process's devices and the mesh spans them all.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import urllib.request
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np


# The metadata server every GCE VM can reach; a Cloud TPU VM's lists its slice's workers.
METADATA_URL = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/[0-9]*")  # v2-v4; v5e, v5p and v6e


def tpu_hosts(accelerator: str) -> int:
  """Hosts in a slice of type `accelerator` (the rule tpu/launch.py's `hosts` also uses): the
  number counts TensorCores on v2-v4 and v5p (8 per host), chips on v5e and v6e (8 on a
  one-host slice, 4 per host beyond). 1 for a type it cannot read."""
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator.strip())
  if not m:
    return 1
  gen, n = m.group(1), int(m.group(2))
  if gen in ("v5litepod", "v5e", "v6e"):
    return 1 if n <= 8 else n // 4
  return max(1, n // 8)


def _metadata(key: str) -> Optional[str]:
  """A Cloud TPU VM's instance attribute, or None (not on GCE, or no such key)."""
  req = urllib.request.Request(METADATA_URL + key, headers={"Metadata-Flavor": "Google"})
  try:
    with urllib.request.urlopen(req, timeout=5) as r:
      return r.read().decode()
  except (OSError, ValueError):
    return None


def _on_tpu_vm() -> bool:
  """TPU chips attached to this host (cheap: no network), and JAX not told to skip the
  metadata server."""
  return ("TPU_SKIP_MDS_QUERY" not in os.environ
          and any(glob.glob(pattern) for pattern in TPU_DEVICE_GLOBS))


def cluster(env: Mapping[str, str], on_tpu_vm: bool = False,
            metadata: Callable[[str], Optional[str]] = _metadata) -> Optional[str]:
  """Which multi-host environment `jax.distributed.initialize()` (no arguments) can join
  by itself, or None for a single host.

  SLURM with several tasks (GPU nodes); a TPU slice of several hosts, from the variables
  GKE and some images set (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES listing several
  hosts, TPU_ACCELERATOR_TYPE of a multi-host type, MEGASCALE_NUM_SLICES > 1), or, on a
  gcloud TPU VM, which sets none of them in a user's shell, from the metadata server's
  list of the slice's workers: the same source JAX's own GCE TPU detection reads.
  """
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
    return "slurm"
  for name in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
    if "," in env.get(name, ""):
      return f"tpu ({name})"
  if tpu_hosts(env.get("TPU_ACCELERATOR_TYPE", "")) > 1:
    return f"tpu (TPU_ACCELERATOR_TYPE={env['TPU_ACCELERATOR_TYPE']})"
  if int(env.get("MEGASCALE_NUM_SLICES", "1") or 1) > 1:
    return "tpu (MEGASCALE_NUM_SLICES)"
  if on_tpu_vm:
    workers = metadata("worker-network-endpoints")
    if workers and len([w for w in workers.split(",") if w.strip()]) > 1:
      return "tpu (metadata worker-network-endpoints)"
    accelerator = metadata("accelerator-type")
    if accelerator and tpu_hosts(accelerator) > 1:
      return f"tpu (metadata accelerator-type={accelerator})"
  return None


def initialize(coordinator_address: str = "", num_processes: int = 1,
               process_id: int = 0) -> bool:
  """Joins the processes of a multi-host run; returns whether it did.

  Explicit flags win (any platform); otherwise `cluster` decides whether JAX's own
  cluster detection (`jax.distributed.initialize()` with no arguments) should run;
  otherwise this is a single-process run.
  """
  if num_processes > 1 and not coordinator_address:
    raise ValueError(f"--num_processes={num_processes} needs --coordinator_address=HOST:PORT")
  explicit = bool(coordinator_address) and num_processes > 1
  if explicit and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in [0, {num_processes})")
  found = None if explicit else cluster(os.environ, _on_tpu_vm())
  if not explicit and found is None:
    return False
  if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
    # CPU devices of different processes talk through gloo (tests, laptops).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  else:
    logging.info("multi-host environment: %s; jax.distributed.initialize()", found)
    jax.distributed.initialize()
  return True


def put_global(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Host arrays holding the whole global batch -> global jax.Arrays with `sharding`.

  Every process holds the same host batch (the batch order is a pure function of the
  seed and step); each copies only the rows its own devices hold, so nothing crosses
  hosts. With one process this is `jax.device_put`.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree.map(put, tree)


def local_rows(sharding: jax.sharding.Sharding, n_rows: int) -> slice | None:
  """The rows of an `n_rows` batch that this process's devices hold, as one slice, or None
  when they are not one contiguous block (e.g. a mesh axis that splits rows across hosts
  in an interleaved order)."""
  spans = sorted({(s[0].start or 0, n_rows if s[0].stop is None else s[0].stop)
                  for s in sharding.addressable_devices_indices_map((n_rows,)).values()})
  start, stop = spans[0]
  for a, b in spans[1:]:
    if a > stop:
      return None
    stop = max(stop, b)
  return slice(start, stop)


def put_host_rows(tree: Any, sharding: jax.sharding.Sharding, n_rows: int) -> Any:
  """This host's contiguous block of rows of a global batch (`local_rows`) -> global
  jax.Arrays of `n_rows` rows: no host builds or holds another host's rows."""
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, (n_rows, *x.shape[1:]))

  return jax.tree.map(put, tree)
