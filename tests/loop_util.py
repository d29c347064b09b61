"""Training a few steps through `jaxpref.train.loop`'s own placement and jitted steps.

Shared by the tests that compare meshes, LoRA and the reward role: each needs the same
init -> build -> n steps sequence, with batches drawn exactly as the loop would.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpref import data as data_lib
from jaxpref.parallel import mesh as mesh_lib
from jaxpref.train import loop
from jaxpref.train.optimizer import make_optimizer
from jaxpref.train.state import build_steps, init_state


@dataclasses.dataclass
class Run:
  metrics: list[dict]  # host copies, one per step
  state: Any
  ref: Any  # the run's `reference.Reference` (kind "none" for the reward role)
  graphdef: Any
  eval_step: Callable
  put: Callable  # numpy batch -> batch sharded over the mesh's batch axes

  @property
  def losses(self) -> list[float]:
    return [float(m["loss"]) for m in self.metrics]


def train_steps(cfg, mesh, ds, n: int) -> Run:
  optimizer = make_optimizer(cfg.optim, cfg.steps)
  graphdef, state, ref = init_state(cfg, mesh, optimizer)
  train_step, eval_step = build_steps(cfg, graphdef, optimizer, state, mesh)
  put = lambda b: jax.device_put(b, NamedSharding(mesh, P(mesh_lib.BATCH_AXES)))
  metrics = []
  for step in range(n):
    idx = data_lib.batch_indices(ds.n, cfg.data.batch_size, step, cfg.data.seed)
    state, m = train_step(state, ref, put(ds.batch(idx)))
    metrics.append(jax.device_get(m))
  return Run(metrics, state, ref, graphdef, eval_step, put)


def train_rows(workdir: str) -> dict[int, dict]:
  """step -> the train row of WORKDIR/metrics.jsonl."""
  import json
  import os
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f) if r["split"] == "train"}


def resume_copy(cfg, at: int, workdir: str) -> dict[int, dict]:
  """Copies a finished run to `workdir`, deletes its checkpoints after step `at` (as if it
  had been killed there), resumes it in a fresh loop and returns its train rows."""
  import os
  import shutil
  shutil.copytree(cfg.workdir, workdir)
  ckpts = os.path.join(workdir, "checkpoints")
  for step in os.listdir(ckpts):
    if step.isdigit() and int(step) > at:
      shutil.rmtree(os.path.join(ckpts, step))
  loop.run(dataclasses.replace(cfg, workdir=workdir))
  return train_rows(workdir)
