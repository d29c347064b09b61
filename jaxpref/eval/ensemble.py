"""`jaxpref-strength --ensemble_vectorize`: the M reward models of the ensemble trained as
one program (LOSSES.md §5.1).

Member j is the sequential path's member j (`strength.member_config`: its own folder,
`--seed` + j, `--data_seed` + j): its train state is initialised by `state.init_state`
exactly as `loop.run` would, its batches come from its own `Batcher`, and its step is the
reward role's train step (`reward_step.make_steps`). Here the M states are stacked on a
leading axis and that step is `jax.vmap`ped over (state, batch), so one compiled program
advances every member (the learning-rate schedule, a function of the shared step count,
is the same for all). Memory is M times one member's.

What a finished run leaves is what the sequential path leaves: member j's final checkpoint
in WORKDIR/member_j/checkpoints/STEPS (so either path reuses it, and `reward_eval.restore`
reads it), its metrics.jsonl and final_metrics.json; every member's rows are also in
WORKDIR/ensemble_metrics.jsonl (a `member` field added). Only the final step is saved:
a vectorised run stopped midway starts again from step 0 (no mid-run resume).
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from jaxpref import data as data_lib
from jaxpref import losses
from jaxpref.data import batching, grain_source
from jaxpref.parallel import distributed, mesh as mesh_lib, sharding
from jaxpref.train import checkpoint as ckpt_lib
from jaxpref.train import loop, reward_step
from jaxpref.train.metrics import MetricWriter
from jaxpref.train.optimizer import learning_rate_schedule, make_optimizer
from jaxpref.train.state import init_state

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
  """Jitted (train_step(states, batches) -> (states, metrics [M]),
  eval_step(params, batch) -> (metrics [M], weight [M])): the reward role's steps over the
  member axis; the train step keeps `stacked`'s shardings and donates the old states."""
  train_step, eval_step = reward_step.make_steps(
      graphdef, losses.bind(cfg.loss, cfg.loss_hparams), optimizer,
      with_tokens=losses.needs_tokens(cfg.loss))
  step = jax.vmap(lambda st, b: train_step(st, None, b))
  ev = jax.vmap(lambda p, b: eval_step(p, None, b), in_axes=(0, None))
  shardings = jax.tree.map(lambda x: x.sharding, stacked)
  return (jax.jit(sharding.in_mesh(step, mesh), out_shardings=(shardings, NamedSharding(mesh, P())),
                  donate_argnums=0),
          jax.jit(sharding.in_mesh(ev, mesh)))


def _member_rows(metrics: dict, m: int) -> list[dict]:
  """Stacked metrics {name: [M]} -> one finished metrics dict per member."""
  host = jax.device_get(metrics)
  return [reward_step.finish_metrics({k: np.asarray(v)[j] for k, v in host.items()})
          for j in range(m)]


def evaluate(eval_step, params, ds, batch_size: int, put, m: int) -> list[dict]:
  """Each member's weighted mean of every metric over the whole eval set."""
  totals, weight = {}, np.zeros(m)
  for batch in data_lib.eval_batches(ds, batch_size):
    metrics, w = jax.device_get(eval_step(params, put(batch)))
    w = np.asarray(w, np.float64)
    for k, v in metrics.items():
      totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64) * w
    weight += w
  return _member_rows({k: v / weight for k, v in totals.items()}, m)


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
  mesh, train_ds, eval_ds = s.mesh, s.train_ds, s.eval_ds
  shards = mesh_lib.batch_axis_size(mesh)
  batchers = [batching.from_config(mc.data, train_ds, shards) for mc in mcfgs]
  optimizer = make_optimizer(cfg.optim, cfg.steps)
  graphdef, one, _ = init_state(mcfgs[0], mesh, optimizer)
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
  schedule = learning_rate_schedule(cfg.optim, cfg.steps)

  for mc in mcfgs:
    os.makedirs(mc.workdir, exist_ok=True)
  # resume_step=-1: rows left by a vectorised run stopped before its checkpoints are stale.
  writers = [MetricWriter(mc.workdir, resume_step=-1, tensorboard=False) for mc in mcfgs]
  log = open(os.path.join(cfg.workdir, METRICS), "w")
  last = [{} for _ in mcfgs]

  def write(step: int, split: str, rows: list[dict]) -> None:
    for j, (w, row) in enumerate(zip(writers, rows)):
      last[j] = w.write(step, split, row)
      log.write(json.dumps({"member": todo[j], "seed": mcfgs[j].seed,
                            "data_seed": mcfgs[j].data.seed, **last[j]}) + "\n")
    log.flush()

  def run_eval(step: int) -> None:
    if eval_ds is None:
      return
    write(step, "eval", evaluate(eval_step, state.params, eval_ds, cfg.data.eval_batch_size,
                                 put_eval, m))
    say(f"step {step:>6} eval  accuracy " + " ".join(f"{r['rewards/accuracy']:.3f}" for r in last))

  bar = (tqdm(total=cfg.steps, desc=f"ensemble x{m}", unit="step", dynamic_ncols=True,
              mininterval=0.5) if cfg.progress else None)
  t0 = time.perf_counter()
  tokens = np.zeros(2, np.int64)
  try:
    run_eval(0)
    for step in range(cfg.steps):
      host = [b.batch(step) for b in batchers]
      for h in host:
        tokens += batching.padding_efficiency(h)
      state, metrics = train_step(state, put_train(jax.tree.map(lambda *xs: np.stack(xs), *host)))
      done = step + 1
      if bar is not None:
        bar.update(1)
      if done % cfg.log_every == 0 or done == cfg.steps:
        extra = {"learning_rate": float(schedule(step)),
                 "steps_per_sec": done / (time.perf_counter() - t0),
                 "data/padding_efficiency": float(tokens[0] / tokens[1])}
        tokens[:] = 0
        write(done, "train", [{**r, **extra} for r in _member_rows(metrics, m)])
        losses_now = " ".join(f"{r['loss']:.4f}" for r in last)
        if bar is not None:
          bar.set_postfix_str(f"loss {losses_now}")
        else:
          say(f"step {done:>6} train loss {losses_now}  {extra['steps_per_sec']:.1f} steps/s")
      if done % cfg.eval_every == 0 or done == cfg.steps:
        run_eval(done)
  finally:
    if bar is not None:
      bar.close()
    for w in writers:
      w.close()
    log.close()

  finals = {}
  for j, (mc, b) in enumerate(zip(mcfgs, batchers)):
    ckpt = ckpt_lib.Checkpointer(os.path.join(mc.workdir, "checkpoints"), cfg.checkpoint_every,
                                 cfg.keep_checkpoints)
    try:
      ckpt.save(cfg.steps, _unstack(state, j, like),
                {"seed": mc.data.seed, "step": cfg.steps, "order": b.describe()}, force=True)
      ckpt.wait()
    finally:
      ckpt.close()
    with open(os.path.join(mc.workdir, "final_metrics.json"), "w") as f:
      json.dump(last[j], f, indent=1)
    finals[todo[j]] = last[j]
  say(f"ensemble: {m} members trained in {time.perf_counter() - t0:.1f} s; final checkpoints "
      f"in {', '.join(mc.workdir for mc in mcfgs)}")
  return finals
