"""`--estimate_only`: per-device memory of a run's train step on its mesh, allocating nothing.

The figures are `memory_plan`'s analytic count from the config, the mesh's axis sizes and
the run's batch shape (no compile: it plans an 8B slice in seconds). With
`--estimate_compile` the compiled step's own `memory_analysis()` is printed beside it,
labelled with the compiler that produced it: on the slice itself that is the TPU or GPU
compiler's figure; on a laptop it is XLA:CPU's, which does not keep to the remat policy
(docs/cloud.md#memory-plan). Lowering and compiling from ShapeDtypeStructs that carry
shardings touches no device memory; the train step donates the state, so its outputs
reuse the inputs' buffers and are not counted twice.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpref import cli_errors, models
from jaxpref.models import lora, token_mask, value_head
from jaxpref.parallel import mesh as mesh_lib
from jaxpref.parallel import sharding
from jaxpref.train import memory_plan, roles
from jaxpref.train.optimizer import make_optimizer
from jaxpref.train.reference import Reference, frozen_copy
from jaxpref.train.state import build_steps
from jaxpref.train.step import TrainState
from flax import nnx

MIB = memory_plan.MIB


@dataclasses.dataclass
class Estimate:
  plan: memory_plan.Plan  # the analytic count, line by line
  compiled: Any = None  # with compile=True: the compiled train step (its memory_analysis())

  @property
  def parts(self) -> dict[str, int]:
    return {x.name: x.bytes for x in self.plan.lines}

  @property
  def total(self) -> int:
    return self.plan.total


def estimate(s, compile: bool = False) -> Estimate:
  """Per-device bytes of the train step of `s` (a `train.setup.Setup`) on `s.mesh`: the
  analytic plan, and with `compile` the step compiled from sharded shapes."""
  cfg, mesh = s.cfg, s.mesh
  if cfg.role == "online":
    raise cli_errors.FlagError("--estimate_only does not plan --role=online yet (its step "
                               "trains on rollouts, not on the data's batches)")
  batch = _abstract_batch(s)
  lora_leaves = None
  if cfg.lora is not None:
    lora_leaves = _leaves(_abstract_adapters(cfg, _abstract_params(cfg, mesh)[1], mesh))
  optimizer = make_optimizer(cfg.optim, cfg.steps)
  scalars = sum(x.ndim == 0 for x in jax.tree.leaves(jax.eval_shape(
      optimizer.init, {"w": jax.ShapeDtypeStruct((1,), np.float32)}))) + 1  # + the step
  plan = memory_plan.plan(cfg, dict(mesh.shape), batch.tokens.shape,
                          sharding.bytes_per_device(batch), lora_leaves, scalars,
                          leaves=_model_leaves(cfg, mesh), reference=_has_reference(cfg),
                          lm_head=cfg.role != "reward")
  return Estimate(plan, _compile(s, batch, optimizer) if compile else None)


def _abstract_params(cfg, mesh):
  if cfg.role == "reward":
    return sharding.abstract_params(lambda: roles.get("reward").make_model(cfg), mesh)
  needs = cfg.loss_spec.needs  # the policy role's model (`roles.policy.init`)
  value = getattr(getattr(cfg, "online", None), "value", "head")
  return sharding.abstract_params(lambda: value_head.attach(token_mask.attach(
      models.Decoder(cfg.model, rngs=nnx.Rngs(cfg.seed)), needs, cfg.seed), needs, value), mesh)


def _has_reference(cfg) -> bool:
  """Whether the step holds a reference model (`roles.*.init`; the reward role never does)."""
  return cfg.reference == "model" and cfg.role == "policy"


def _model_leaves(cfg, mesh):
  """The parameters the plan counts: the decoder's, written out from its config, unless the
  role adds a head, a value function or a token-mask network, or the model holds leaves the
  config count does not know (a family added since): then every leaf, from the model's
  shapes (a second of tracing at 8B)."""
  shapes = _leaves(_abstract_params(cfg, mesh)[1])
  needs = cfg.loss_spec.needs
  if (cfg.role != "reward" and getattr(needs, "token_mask", None) != "learned"
      and not getattr(needs, "values", False)
      and {(p, tuple(s)) for p, s, _ in shapes}
      == {(p, tuple(s)) for p, s, _ in memory_plan.decoder_leaves(cfg.model)}):
    return None
  return shapes


def _leaves(tree):
  """(slash path, shape, logical axes) of every leaf, as `memory_plan` counts them."""
  def name(k):
    return str(next(getattr(k, a) for a in ("key", "idx", "name") if hasattr(k, a)))
  return [("/".join(n for n in map(name, p) if n != "value"), x.shape,
           sharding.logical_axes(p, x.ndim))
          for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def _compile(s, batch, optimizer):
  """The train step lowered and compiled from sharded shapes (its reference in the dtypes
  `reference.frozen_copy` stores)."""
  cfg, mesh = s.cfg, s.mesh
  graphdef, params = _abstract_params(cfg, mesh)
  step = jax.ShapeDtypeStruct((), np.int32, sharding=NamedSharding(mesh, P()))
  base = None
  if cfg.lora is not None:  # the state trains the adapters; the base rides with the reference
    base, params = params, _abstract_adapters(cfg, params, mesh)
  state = TrainState(step=step, params=params,
                     opt_state=sharding.abstract_opt_state(optimizer, params, mesh))
  ref = None
  if _has_reference(cfg):
    ref = jax.eval_shape(lambda p: frozen_copy(p, cfg), params if base is None else base)
    ref = jax.tree.map(lambda r, p: jax.ShapeDtypeStruct(r.shape, r.dtype, sharding=p.sharding),
                       ref, params if base is None else base)
  train_step, _ = build_steps(cfg, graphdef, optimizer, state, mesh)
  kind = "none" if cfg.role == "reward" or (cfg.reference == "model" and ref is None) \
      else cfg.reference
  return train_step.lower(state, Reference(kind, ref, base), batch).compile()


def _abstract_batch(s):
  batch_sharding = NamedSharding(s.mesh, P(mesh_lib.BATCH_AXES))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding),
                      _example_batch(s))


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
  out = memory_plan.table(est.plan, f"per-device memory on mesh {dict(mesh.shape)} "
                          f"({mesh.devices.size} devices), analytic (docs/cloud.md#memory-plan):")
  if est.compiled is not None:
    m = est.compiled.memory_analysis()
    platform = {"cpu": "XLA:CPU", "tpu": "XLA:TPU", "gpu": "XLA:GPU", "cuda": "XLA:GPU"}.get(
        mesh.devices.flat[0].platform, mesh.devices.flat[0].platform)
    out += (f"\n  compiled by {platform}: {compiled_bytes(est.compiled) / MIB:.2f} MiB "
            f"(temporaries {m.temp_size_in_bytes / MIB:.2f} MiB)"
            + ("; XLA:CPU does not keep to the remat policy, so this overstates TPU and GPU"
               if platform == "XLA:CPU" else ""))
  return out


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
