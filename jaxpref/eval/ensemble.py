"""`jaxpref-strength --ensemble_vectorize`: the M reward models of the ensemble trained as
one program by the one training loop (docs/reward_models.md, the Secrets-II ensemble).

Member j is the sequential path's member j (`strength.member_config`: its own folder,
`--seed` + j, `--data_seed` + j): its state is initialised by the reward role exactly as a
sequential run's, its batches come from its own `Batcher`, and its step is the reward
role's step from the one step builder. Here the M states are stacked on a leading axis and
that step is `jax.vmap`ped over (state, batch), so one compiled program advances every
member (the learning-rate schedule, a function of the shared step count, is the same for
all). Memory is M times one member's.

The loop checkpoints the stacked state in WORKDIR/checkpoints, so a vectorised run killed
midway resumes where it stopped (SIGTERM saves and stops). Each member's rows go to its own
folder's metrics.jsonl and TensorBoard; when the run ends, member j's final checkpoint is
written to WORKDIR/member_j/checkpoints/STEPS (so either path reuses it, and
`reward_eval.restore` reads it) with its final_metrics.json, and every member's rows are
gathered in WORKDIR/ensemble_metrics.jsonl (a `member` field added).
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpref.data import batching, grain_source
from jaxpref.parallel import distributed, mesh as mesh_lib, sharding
from jaxpref.train import checkpoint as ckpt_lib
from jaxpref.train import loop
from jaxpref.train.metrics import read_metrics
from jaxpref.train.optimizer import make_optimizer
from jaxpref.train.state import init_state, make_steps

METRICS = "ensemble_metrics.jsonl"
HOW = "run without --ensemble_vectorize (members one after another)"


def check(cfg, s: loop.Setup | None = None) -> None:
  """Refuses what the vectorised path does not do (before anything is trained)."""
  bad = []
  if cfg.grad_accum > 1:
    bad.append(f"--grad_accum={cfg.grad_accum} (the vmapped step has no micro-batches)")
  if cfg.lora is not None:
    bad.append("--lora_rank (LoRA adapters over a shared frozen base are not stacked)")
  if cfg.data.batching != "pad":
    bad.append(f"--batching={cfg.data.batching} (members' batches would differ in length; "
               "stacking needs --batching=pad)")
  if cfg.data.shared_prompt:
    bad.append("--shared_prompt")
  if cfg.export_hf:
    bad.append("--export_hf (every member would write the same folder)")
  mesh = mesh_lib.make_mesh(cfg.mesh) if s is None else s.mesh
  if mesh.shape["tensor"] > 1 or mesh.shape["fsdp"] > 1:
    bad.append(f"--mesh={cfg.mesh} (tensor or fsdp sharding: tested only for a data-parallel "
               "mesh, which shards each member's batch)")
  if jax.process_count() > 1:
    bad.append(f"{jax.process_count()} processes (single-host only)")
  if s is not None and isinstance(s.train_ds, grain_source.PreparedDataset):
    bad.append(f"prepared data {cfg.data.train_data} (its grain iterator is one data order; "
               "use the JSONL file)")
  if bad:
    raise ValueError("--ensemble_vectorize does not support " + "; ".join(bad) + f": {HOW}")


def finished_step(member) -> int | None:
  """The latest checkpoint step of a member's folder (None: none yet)."""
  directory = os.path.join(member.workdir, "checkpoints")
  if not os.path.isdir(directory):
    return None
  ckpt = ckpt_lib.Checkpointer(directory, member.checkpoint_every, member.keep_checkpoints)
  try:
    return ckpt.latest_step
  finally:
    ckpt.close()


def _stack(trees: list, mesh) -> object:
  """Member trees -> one tree with a leading member axis, each leaf in its member's sharding
  with the member axis unsharded."""
  def one(*xs):
    spec = xs[0].sharding.spec if isinstance(xs[0].sharding, NamedSharding) else P()
    return jax.device_put(jnp.stack(xs), NamedSharding(mesh, P(None, *spec)))
  return jax.tree.map(one, *trees)


def _unstack(tree, j: int, like):
  """Member j's tree, in the shardings of `like` (a member's own state)."""
  return jax.tree.map(lambda x, l: jax.device_put(x[j], l.sharding), tree, like)


def vmapped_steps(cfg, graphdef, optimizer, stacked, mesh):
  """Jitted (train_step(states, ref, batches) -> (states, metrics [M]),
  eval_step(params, ref, batch) -> (metrics [M], weight [M])): the role's steps from the
  one step builder over the member axis (`ref` has none); the train step keeps `stacked`'s
  shardings and donates the old states."""
  train_step, eval_step = make_steps(cfg, graphdef, optimizer)
  step = jax.vmap(train_step, in_axes=(0, None, 0))
  ev = jax.vmap(eval_step, in_axes=(0, None, None))
  shardings = jax.tree.map(lambda x: x.sharding, stacked)
  return (jax.jit(sharding.in_mesh(step, mesh), out_shardings=(shardings, NamedSharding(mesh, P())),
                  donate_argnums=0),
          jax.jit(sharding.in_mesh(ev, mesh)))


class _Finish:
  """Writes each member's final checkpoint where the sequential loop would, and gathers
  every member's rows into WORKDIR/ensemble_metrics.jsonl."""

  def __init__(self, cfg, mcfgs, todo, batchers, like, prog_ref: Callable, say):
    self.cfg, self.mcfgs, self.todo, self.batchers = cfg, mcfgs, todo, batchers
    self.like, self.prog, self.say = like, prog_ref, say

  def finish(self) -> None:
    cfg, state = self.cfg, self.prog().state
    if np.min(jax.device_get(state.step)) < cfg.steps:  # stopped by SIGTERM: resume finishes it
      return
    for j, (mc, b) in enumerate(zip(self.mcfgs, self.batchers)):
      ckpt = ckpt_lib.Checkpointer(os.path.join(mc.workdir, "checkpoints"),
                                   cfg.checkpoint_every, cfg.keep_checkpoints)
      try:
        ckpt.save(cfg.steps, _unstack(state, j, self.like),
                  {"seed": mc.data.seed, "step": cfg.steps, "order": b.describe()}, force=True)
        ckpt.wait()
      finally:
        ckpt.close()
    # The members' rows interleaved as the loop wrote them: each logged row, member by member.
    logs = [read_metrics(os.path.join(mc.workdir, "metrics.jsonl")) for mc in self.mcfgs]
    with open(os.path.join(cfg.workdir, METRICS), "w") as log:
      for rows in zip(*logs):
        for j, (mc, row) in enumerate(zip(self.mcfgs, rows)):
          log.write(json.dumps({"member": self.todo[j], "seed": mc.seed,
                                "data_seed": mc.data.seed, **row}) + "\n")


def train(cfg, members: list, say: Callable[[str], None] = print) -> dict[int, dict]:
  """Trains the `members` (member configs; the ones without a checkpoint at --steps) as one
  vmapped program; returns {member index: final metrics} and leaves each member's final
  checkpoint where the sequential loop would."""
  check(cfg)
  todo, partial = [], []
  for j in range(len(members)):
    step = finished_step(members[j])
    if step is None:
      todo.append(j)
    elif step < cfg.steps:
      partial.append(f"{members[j].workdir} (step {step})")
  if partial:
    raise ValueError(f"--ensemble_vectorize cannot resume members trained part-way: "
                     f"{', '.join(partial)} of --steps={cfg.steps}; {HOW} to finish them, or "
                     "delete those folders to retrain them vectorised")
  if not todo:
    return {}
  mcfgs = [members[j] for j in todo]
  m = len(mcfgs)
  s = loop.setup(mcfgs[0])  # data, tokenizer, mesh and every start-up check, once
  check(cfg, s)
  s.cfg = cfg  # the loop's checkpoints, SIGTERM and progress are the ensemble's own
  mesh, train_ds = s.mesh, s.train_ds
  shards = mesh_lib.batch_axis_size(mesh)
  batchers = [batching.from_config(mc.data, train_ds, shards) for mc in mcfgs]
  optimizer = make_optimizer(cfg.optim, cfg.steps)
  graphdef, one, ref = init_state(mcfgs[0], mesh, optimizer)
  states = [one] + [init_state(mc, mesh, optimizer)[1] for mc in mcfgs[1:]]
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), one)
  state = _stack(states, mesh)
  del states, one
  n_params = sum(x.size for x in jax.tree.leaves(state.params)) // m
  say(f"ensemble: {m} members {', '.join(str(j) for j in todo)} vectorised (jax.vmap), "
      f"{n_params:,} parameters each; mesh {dict(mesh.shape)}; {batchers[0].describe()}")
  train_step, eval_step = vmapped_steps(cfg, graphdef, optimizer, state, mesh)
  put_train = lambda b: distributed.put_global(
      b, NamedSharding(mesh, P(None, mesh_lib.BATCH_AXES)))
  put_eval = lambda b: distributed.put_global(b, NamedSharding(mesh, P(mesh_lib.BATCH_AXES)))

  def batch(step):
    host = [b.batch(step) for b in batchers]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *host)
    return stacked, put_train(stacked)

  for mc in mcfgs:
    os.makedirs(mc.workdir, exist_ok=True)
  prog = loop.Program(cfg, mesh, graphdef, state, ref, train_step, eval_step, batchers, batch,
                      put_eval, [mc.workdir for mc in mcfgs], members=m)
  prog.hooks.append(_Finish(cfg, mcfgs, todo, batchers, like, lambda: prog, say))
  loop.train(s, prog)
  finals = {}
  for j, mc in zip(todo, mcfgs):
    path = os.path.join(mc.workdir, "final_metrics.json")
    with open(path) as f:
      finals[j] = json.load(f)
  say(f"ensemble: {m} members trained; final checkpoints in "
      f"{', '.join(mc.workdir for mc in mcfgs)}")
  return finals
