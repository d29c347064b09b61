"""The one training loop, for every role and for a vmapped ensemble of M models alike.

`train(setup)` builds a `Program` (what is stepped: state, reference, steps, batches, and
how metrics split into rows, one per member) and runs it; everything else a run does (eval,
checkpoints and SIGTERM, record logs, rounds, reference syncing, plots, export, the final
metrics) is a hook of `hooks.py` called at fixed points of the loop.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from jaxpref import cli_errors, models, paths
from jaxpref.data import batching
from jaxpref.parallel import distributed, mesh as mesh_lib
from jaxpref.train import checkpoint as ckpt_lib
from jaxpref.train import hooks as hooks_lib
from jaxpref.train import flops, online, precompute
from jaxpref.train.config import RunConfig
from jaxpref.train.metrics import MetricWriter, read_metrics
from jaxpref.train.optimizer import learning_rate_schedule, make_optimizer
from jaxpref.train.program import Program
from jaxpref.train.setup import Setup, batcher_of, say, setup
from jaxpref.train.state import build_steps, init_state

__all__ = ["Program", "Setup", "run", "setup", "train"]


def run(cfg: RunConfig) -> dict:
  return train(setup(cfg))


def program(s: Setup) -> Program:
  """One model of the run's role, with its reference prepared (precomputed log-probs
  stored with the data, or read from --reference_cache)."""
  cfg, mesh = s.cfg, s.mesh
  batch_sharding = NamedSharding(mesh, P(mesh_lib.BATCH_AXES))
  put = lambda batch: distributed.put_global(batch, batch_sharding)
  batcher = s.batcher or batcher_of(cfg, s.train_ds, mesh_lib.batch_axis_size(mesh))
  rows, put_train = _host_rows(batcher, batch_sharding)
  eff, n_est = batcher.estimate(min(-(-s.train_ds.n // cfg.data.batch_size), 200))
  say(f"train batches: {batcher.describe()}; padding efficiency {eff:.1%} (real / computed "
      f"tokens, first {n_est} batches)"
      + (f"; curriculum {batcher.curriculum.describe()}" if batcher.curriculum else ""))

  optimizer = make_optimizer(cfg.optim, cfg.steps)
  graphdef, state, ref = init_state(cfg, mesh, optimizer)
  if cfg.reference == "precomputed":
    ref = precompute.reference(cfg, graphdef, ref, (s.train_ds, s.eval_ds), put)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  say(f"model: preset {cfg.model_preset}, {n_params:,} parameters; mesh {dict(mesh.shape)} "
      f"on {jax.device_count()} {jax.devices()[0].platform} device(s); loss "
      f"{cfg.loss_spec.describe()}")
  if cfg.lora is not None:
    say(f"LoRA: those are rank-{cfg.lora.rank} adapters on {len(state.params)} weights; the "
        f"{sum(x.size for x in jax.tree.leaves(ref.base)):,} base weights are frozen")
  train_step, eval_step = build_steps(cfg, graphdef, optimizer, state, mesh)

  def batch(step):
    host = batcher.batch(step, rows)
    return host, put_train(host)

  return Program(cfg, mesh, graphdef, state, ref, train_step, eval_step, [batcher], batch,
                 put, [cfg.workdir])


def train(s: Setup, prog: Program | None = None) -> dict:
  """Runs `prog` (by default the run's one model) from its latest checkpoint to --steps;
  returns the final eval metrics (or train metrics without eval data; an ensemble's: the
  first member's, every member's rows being in its own folder)."""
  cfg = s.cfg
  if prog is None:
    prog = online.program(s) if cfg.role == "online" else program(s)
  ckpt = ckpt_lib.Checkpointer(paths.join(cfg.workdir, "checkpoints"),
                               cfg.checkpoint_every, cfg.keep_checkpoints)
  ckpt.data_iterator = getattr(prog.batchers[0], "iterator", None)  # grain's, saved with it
  syncing = ckpt_lib.holds_reference(cfg)
  saved = lambda: ckpt_lib.saved_layout(cfg, prog.state, prog.ref.params)
  start = 0
  if ckpt.latest_step is not None:
    restored, position, start = ckpt.restore(saved())
    if syncing:
      prog.state, prog.ref = restored["train"], prog.ref.replace(params=restored["ref"])
    else:
      prog.state = restored
    if position.get("seed") != cfg.data.seed:
      raise cli_errors.WorkdirError(
          f"{cfg.workdir}: checkpoint was written with --data_seed={position.get('seed')}, "
          f"this run has --data_seed={cfg.data.seed}")
    if position.get("order", prog.order()) != prog.order():
      raise cli_errors.WorkdirError(
          f"{cfg.workdir}: checkpoint was written with {position['order']}, this run has "
          f"{prog.order()}: the batches after resuming would differ")
    say(f"resuming from step {start} ({cfg.workdir}/checkpoints)")
  if start >= cfg.steps:
    ckpt.close()
    return _already_done(cfg, prog, start)

  process0 = jax.process_index() == 0
  # A fresh start drops every row a run killed before its first checkpoint left behind.
  writers = [MetricWriter(w, resume_step=start if start else -1, enabled=process0,
                          tie_accuracy=cfg.tie_accuracy)
             for w in prog.workdirs]
  for note in [n for w in writers for n in w.notes] + ckpt.notes:
    say(note)
  loop = hooks_lib.Loop(cfg, prog, writers, start, saved, ckpt)
  hooks = hooks_lib.default_hooks(cfg, prog, s, loop) + prog.hooks
  schedule = learning_rate_schedule(cfg.optim, cfg.steps)
  loop.call(hooks, "start")
  bar = _progress(cfg, start, prog.members)
  t0, steps_done = time.perf_counter(), 0
  t_log = t0
  n_params = models.param_count(cfg.model)
  updates = cfg.online.updates_per_rollout if cfg.role == "online" else 1
  per_token = lambda host: updates * flops.per_token(
      cfg.model, n_params, host.tokens.shape[-1], prog.ref.model is not None)
  tokens = np.zeros(2, np.int64)  # real, computed since the last log (host-side, no device cost)
  try:
    for step in range(start, cfg.steps):
      loop.call(hooks, "before_step", step)
      host, placed = prog.batch(step)
      loop.call(hooks, "on_batch", step)
      tokens += batching.padding_efficiency(host)
      prog.state, metrics = prog.train_step(prog.state, prog.ref, placed)
      loop.metrics = metrics
      done = step + 1
      steps_done += 1
      loop.call(hooks, "after_update", done)
      if bar is not None:
        bar.update(1)
      if done % cfg.log_every == 0 or done == cfg.steps:
        now = time.perf_counter()
        extra = {"learning_rate": float(schedule(step)),
                 "steps_per_sec": steps_done / (now - t0),
                 "data/padding_efficiency": float(tokens[0] / tokens[1]),
                 **flops.metrics(per_token(host), int(tokens[1]), now - t_log,
                                 jax.device_count(), jax.devices()[0].device_kind)}
        tokens[:] = 0
        t_log = now
        extra.update(prog.extra() if prog.extra is not None else {})
        rows = [{**r, **extra} for r in prog.rows(jax.device_get(metrics))]
        loop.last_train = loop.write(done, "train", rows)
        _show(bar, done, loop.last_train)
      loop.call(hooks, "after_step", done)
      if loop.stop:
        break
  except cli_errors.WriterError:
    _save_after_writer_error(loop, hooks)
    raise
  finally:
    if bar is not None:
      bar.close()
    loop.close()
  loop.call(hooks, "finish")
  if loop.preempted:
    raise hooks_lib.Preempted(f"SIGTERM: stopped at step {int(np.max(jax.device_get(prog.state.step)))} "
                              f"of --steps={cfg.steps} after saving a checkpoint; run the same "
                              f"command again to resume ({cfg.workdir})")
  return loop.final[0] if loop.final else {}


def _save_after_writer_error(loop, hooks) -> None:
  """A metrics writer failed (a full disk?): try to checkpoint the last finished step."""
  done = int(np.max(jax.device_get(loop.prog.state.step)))
  for h in hooks:
    if isinstance(h, hooks_lib.Checkpoint):
      try:
        h.save(done, force=True)
        loop.ckpt.wait()
        say(f"a writer failed: saved a checkpoint at step {done}")
      except Exception as e:  # noqa: BLE001 (the writer's error is the one to report)
        say(f"a writer failed, and so did the checkpoint at step {done}: {e}")


def _show(bar, done: int, rows: list[dict]) -> None:
  losses = " ".join(f"{r['loss']:.4f}" for r in rows)
  if bar is not None and len(rows) == 1 and "reward/mean" in rows[0]:
    bar.set_postfix(loss=losses, reward=f"{rows[0]['reward/mean']:.3f}")
  elif bar is not None and len(rows) == 1:
    bar.set_postfix(loss=losses, acc=f"{rows[0]['rewards/accuracy']:.2f}",
                    **({"mfu": f"{rows[0]['perf/mfu']:.1%}"} if "perf/mfu" in rows[0] else {}))
  elif bar is not None:
    bar.set_postfix_str(f"loss {losses}")
  else:
    say(f"step {done:>6} train loss {losses}  {rows[0]['steps_per_sec']:.1f} steps/s")


def _already_done(cfg: RunConfig, prog: Program, start: int) -> dict:
  path = paths.join(prog.workdirs[0], "metrics.jsonl")
  rows = [r for r in read_metrics(path) if r["step"] <= start]
  say(f"{cfg.workdir} already finished {start} of --steps={cfg.steps}; nothing to do")
  evals = [r for r in rows if r["split"] == "eval"]
  final = evals[-1] if evals else rows[-1] if rows else {}
  path = paths.join(prog.workdirs[0], "final_metrics.json")
  if jax.process_index() == 0 and prog.members == 1 and not paths.exists(path):
    with paths.open(path, "w") as f:  # killed after its last checkpoint: finish the record
      json.dump(final, f, indent=1)
  return final


def _host_rows(batcher, batch_sharding):
  """(rows this host builds, how to place them). With several processes each host builds
  only the block of rows its devices hold, when that block is one contiguous slice."""
  everything = (slice(None), lambda b: distributed.put_global(b, batch_sharding))
  if jax.process_count() == 1:
    return everything
  mine = batching.host_rows(batcher.rows, jax.process_index(), jax.process_count())
  if distributed.local_rows(batch_sharding, batcher.rows) != mine:
    say("train batches: this host's devices do not hold one contiguous block of rows; "
        "every host builds the whole batch")
    return everything
  return mine, lambda b: distributed.put_host_rows(b, batch_sharding, batcher.rows)


def _progress(cfg: RunConfig, start: int, members: int):
  if not cfg.progress or jax.process_index() != 0:
    return None
  return tqdm(total=cfg.steps, initial=start, desc="train" if members == 1 else
              f"ensemble x{members}", unit="step", dynamic_ncols=True, mininterval=0.5)

