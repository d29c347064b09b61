"""`--estimate_only`: per-device memory of a run's train step on its mesh, allocating nothing.

Parameters, optimizer state, reference and batch come from their sharded shapes
(`sharding.bytes_per_device` of ShapeDtypeStructs); activations are the compiled step's
temporary buffers (`memory_analysis().temp_size_in_bytes`), since lowering and compiling
from ShapeDtypeStructs that carry shardings touches no device memory. The train step
donates the state, so its outputs reuse the inputs' buffers and are not counted twice.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpref import models
from jaxpref.models import lora
from jaxpref.parallel import mesh as mesh_lib
from jaxpref.parallel import sharding
from jaxpref.train.optimizer import make_optimizer
from jaxpref.train.reference import Reference
from jaxpref.train.state import build_steps
from jaxpref.train.step import TrainState
from flax import nnx

MIB = 2 ** 20


@dataclasses.dataclass
class Estimate:
  parts: dict[str, int]  # name -> bytes per device, in print order
  compiled: Any  # the compiled train step, for its own memory_analysis()

  @property
  def total(self) -> int:
    return sum(self.parts.values())


def estimate(s) -> Estimate:
  """Per-device bytes of the train step of `s` (a `train.setup.Setup`) on `s.mesh`."""
  cfg, mesh = s.cfg, s.mesh
  optimizer = make_optimizer(cfg.optim, cfg.steps)
  graphdef, params = sharding.abstract_params(
      lambda: models.Decoder(cfg.model, rngs=nnx.Rngs(cfg.seed)), mesh)
  step = jax.ShapeDtypeStruct((), np.int32, sharding=NamedSharding(mesh, P()))
  base = None
  if cfg.lora is not None:  # the state trains the adapters; the base rides with the reference
    base, params = params, _abstract_adapters(cfg, params, mesh)
  state = TrainState(step=step, params=params,
                     opt_state=sharding.abstract_opt_state(optimizer, params, mesh))
  ref = (params if base is None else base) if cfg.reference == "model" else None
  batch_sharding = NamedSharding(mesh, P(mesh_lib.BATCH_AXES))
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding),
                       _example_batch(s))
  train_step, _ = build_steps(cfg, graphdef, optimizer, state, mesh)
  compiled = train_step.lower(state, Reference(cfg.reference, ref, base), batch).compile()
  parts = {"parameters": sharding.bytes_per_device(params),
           **({} if base is None else {"base (frozen)": sharding.bytes_per_device(base)}),
           "optimizer state": sharding.bytes_per_device((state.opt_state, step)),
           "reference": sharding.bytes_per_device(ref),
           "batch": sharding.bytes_per_device(batch),
           "activations": compiled.memory_analysis().temp_size_in_bytes}
  return Estimate(parts, compiled)


def _abstract_adapters(cfg, base, mesh):
  shapes = jax.eval_shape(lambda: lora.init(base, cfg.lora, jax.random.key(0)))
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                      shapes, sharding.param_shardings(shapes, mesh))


def _example_batch(s):
  """A host batch of the run's train shapes (with placeholder reference log-probs when the
  run would precompute them)."""
  ds, cfg = s.train_ds, s.cfg
  idx = np.arange(cfg.data.batch_size) % ds.n
  if cfg.reference != "precomputed" or ds.ref_logps is not None:
    return ds.batch(idx)
  ds.ref_logps = np.zeros(ds.tokens.shape[:2], np.float32)
  try:
    return ds.batch(idx)
  finally:
    ds.ref_logps = None


def compiled_bytes(compiled) -> int:
  """What XLA reserves per device for one call: arguments + outputs + temporaries, less the
  outputs that alias donated arguments."""
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)


def report(est: Estimate, mesh) -> str:
  lines = [f"per-device memory on mesh {dict(mesh.shape)} ({mesh.devices.size} devices):"]
  for name, n in est.parts.items():
    lines.append(f"  {name:<16} {n / MIB:10.2f} MiB")
  lines.append(f"  {'total':<16} {est.total / MIB:10.2f} MiB")
  return "\n".join(lines)


# XLA:CPU's default scheduler orders work for concurrency, not memory: it keeps activations
# alive that a memory-aware scheduler (as on TPU and GPU) frees, and so even reports more
# memory with --model.remat=full than without. The memory-minimising scheduler makes the
# CPU estimate follow the remat policy (measured in docs/design.md).
_CPU_MEMORY_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def prepare_backend(devices: int = 0) -> None:
  """Sets XLA's flags for an estimate; must run before JAX starts its backends. `devices` > 0
  estimates on that many fake CPU devices, to plan a slice from a machine without one."""
  from jax._src import xla_bridge  # private: asks whether backends exist without starting one
  if xla_bridge.backends_are_initialized():
    raise RuntimeError("memory.prepare_backend must run before JAX uses a device")
  add = [_CPU_MEMORY_SCHEDULER]
  if devices:
    if devices < 1:
      raise RuntimeError(f"--estimate_devices must be >= 0, got {devices}")
    add.append(f"--xla_force_host_platform_device_count={devices}")
    jax.config.update("jax_platforms", "cpu")
  replaced = tuple(f.split("=")[0] for f in add)
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(replaced)]
  os.environ["XLA_FLAGS"] = " ".join(kept + add)
