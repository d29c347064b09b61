"""What the loop does beside stepping, as hooks called at fixed points of every step.

A hook is an object with any of: `start()` (after the restore, before step `start`),
`before_step(step)`, `on_batch(step)` (the batch is built, not yet stepped),
`after_update(done)` (the state is updated), `after_step(done)` (metrics logged) and
`finish()` (after the loop, also after a SIGTERM stop). The loop object they share holds
the program, the writers and the rows logged so far.
"""

from __future__ import annotations

import contextlib
import collections
import json
import os
import signal
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref import cli_errors, paths
from jaxpref.data import passes
from jaxpref.models import hf_export
from jaxpref.train import plots, reference, rounds as rounds_lib
from jaxpref.train.step import NONFINITE
from jaxpref.train.metrics import RecordLog, read_metrics
from jaxpref.train.setup import say


PREEMPTED_EXIT = cli_errors.PREEMPTED_EXIT  # a run stopped by SIGTERM (done: 0, crashed: 1)
ZERO_GRAD_STEPS = 10  # this many steps in a row with a gradient norm of exactly 0 warns


class Preempted(cli_errors.Preempted):
  """SIGTERM stopped the run after saving a checkpoint; re-running the command resumes it.
  No final_metrics.json is written, so a scheduler does not read the run as finished."""


class NonFinite(cli_errors.RunError):
  """A step's loss or gradient was not finite (its update was dropped) under
  --nonfinite=stop."""


class Loop:
  """The state the hooks share: the program, the metric writers (one per member), the rows
  last logged and whether the loop must stop."""

  def __init__(self, cfg, prog, writers: list, start: int, saved: Callable[[], Any], ckpt):
    self.cfg, self.prog, self.writers, self.start = cfg, prog, writers, start
    self.saved, self.ckpt = saved, ckpt
    self.last_train: list[dict] | None = None
    self.last_eval: list[dict] | None = None
    self.metrics: dict = {}  # the last step's metrics, on device
    self.guard = None  # the numeric guard, which the checkpoint hook asks before saving
    self.sinks: list = list(writers)  # what a checkpoint syncs to disk
    self.stop = False  # a hook asks the loop to end after this step (SIGTERM)
    self.preempted = False
    self._closers: list[Callable[[], None]] = [ckpt.wait, ckpt.close] + [w.close for w in writers]

  @property
  def final(self) -> list[dict] | None:
    return self.last_eval or self.last_train

  def write(self, step: int, split: str, rows: list[dict]) -> list[dict]:
    return [w.write(step, split, r) for w, r in zip(self.writers, rows)]

  def call(self, hooks: list, event: str, *args) -> None:
    for h in hooks:
      fn = getattr(h, event, None)
      if fn is not None:
        fn(*args)

  def on_close(self, fn: Callable[[], None]) -> None:
    self._closers.append(fn)

  def close(self) -> None:
    for fn in self._closers:
      fn()


class Eval:
  """Held-out metrics at step 0 (a fresh run), every --eval_every steps and at the end."""

  def __init__(self, loop: Loop, eval_ds):
    self.loop, self.ds = loop, eval_ds

  def run(self, step: int) -> None:
    if self.ds is None:
      return
    prog, cfg = self.loop.prog, self.loop.cfg
    if prog.evaluate is not None:  # the online role samples the held-out prompts
      rows = self.loop.last_eval = self.loop.write(step, "eval", prog.evaluate())
      say(f"step {step:>6} eval  reward {rows[0]['reward/mean']:.3f}  length "
          f"{rows[0]['length/mean']:.1f}")
      return
    means = passes.weighted_means(lambda b: prog.eval_step(prog.state.params, prog.ref, b),
                                  self.ds, cfg.data.eval_batch_size, prog.put_eval)
    rows = self.loop.last_eval = self.loop.write(step, "eval", prog.rows(means))
    if len(rows) == 1:
      r = rows[0]
      say(f"step {step:>6} eval  loss {r['loss']:.4f}  accuracy {r['rewards/accuracy']:.3f}  "
          f"margin {r['rewards/margin']:.3f}")
    else:
      say(f"step {step:>6} eval  accuracy " + " ".join(f"{r['rewards/accuracy']:.3f}"
                                                       for r in rows))

  def start(self) -> None:
    if self.loop.start == 0:
      self.run(0)

  def after_step(self, done: int) -> None:
    cfg = self.loop.cfg
    if done % cfg.eval_every == 0 or done == cfg.steps:
      self.run(done)


class Guard:
  """The numeric guard. The step drops a non-finite update and flags it (`NONFINITE`);
  the flags are summed on device, with the first flagged step and the run of zero
  gradient norms, and read on the host only at log and checkpoint steps. Under
  --nonfinite=stop the run then stops naming the step, its groups and the culprit
  (before any checkpoint of a later step); under skip, skipped steps are counted."""

  def __init__(self, loop: Loop):
    self.loop = loop
    loop.guard = self
    self.state = (jnp.zeros((), jnp.float32), jnp.full((), -1, jnp.int32),
                  jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    self.ids = collections.deque(maxlen=loop.cfg.log_every + loop.cfg.checkpoint_every + 1)
    self.seen, self.warned = 0.0, False

  def on_batch(self, step: int) -> None:
    self.ids.append((step + 1, np.ravel(self.loop.prog.batchers[0].last_indices)
                     if hasattr(self.loop.prog.batchers[0], "last_indices") else None))

  def after_update(self, done: int) -> None:
    m = self.loop.metrics
    self.state = _track(self.state, m.pop(NONFINITE), m["grad_norm"], done)

  def after_step(self, done: int) -> None:
    if done % self.loop.cfg.log_every == 0:
      self.verify(done)

  def verify(self, done: int) -> None:
    """Reads the device counters (a host sync): at log steps, and before every checkpoint."""
    cfg = self.loop.cfg
    count, first, bits, zeros = (np.asarray(x) for x in jax.device_get(self.state))
    if count > self.seen:
      what = " and ".join(n for b, n in ((1, "the loss"), (2, "the gradient norm"))
                          if int(bits) & b)
      ids = dict(self.ids).get(int(first))
      groups = "" if ids is None else f" (its groups: {', '.join(map(str, ids[:16].tolist()))}"
      groups += ", ..." if ids is not None and len(ids) > 16 else ""
      groups += ")" if ids is not None else ""
      if cfg.nonfinite == "stop":
        raise NonFinite(f"step {int(first)}: {what} is not finite{groups}; its update was "
                        f"dropped and no checkpoint holds it. Lower --learning_rate or the "
                        f"loss's hyperparameters, check the records' weights and scores, or "
                        f"pass --nonfinite=skip to skip such steps")
      say(f"step {done}: {int(count - self.seen)} non-finite step(s) skipped (--nonfinite=skip; "
          f"first at step {int(first)}: {what}{groups}); {int(count)} in all")
      self.seen = float(count)
    if int(zeros) >= ZERO_GRAD_STEPS and not self.warned:
      say(f"warning: the gradient norm has been exactly 0 for {int(zeros)} steps (to step "
          f"{done}): the model has stopped learning (a --learning_rate too large for it?)")
      self.warned = True


@jax.jit
def _track(state, flag, grad_norm, step):
  count, first, bits, zeros = state
  flag = jnp.sum(flag)  # an ensemble flags each member
  new = (flag > 0) & (first < 0)
  return (count + (flag > 0), jnp.where(new, step, first), jnp.where(new, flag, bits),
          jnp.where(jnp.all(grad_norm == 0), zeros + 1, 0))


class Checkpoint:
  """Saves every --checkpoint_every steps and at the end; SIGTERM (a TPU VM preemption
  notice) saves at once and stops the loop."""

  def __init__(self, loop: Loop):
    self.loop = loop
    self.requested = False
    # Outside the main thread (a test runner's) no handler can be set: SIGTERM then
    # keeps its default action.
    with contextlib.suppress(ValueError):
      old = signal.signal(signal.SIGTERM, self._handle)
      loop.on_close(lambda: signal.signal(signal.SIGTERM, old))

  def _handle(self, signum, frame):
    self.requested = True

  def after_step(self, done: int) -> None:
    loop, cfg = self.loop, self.loop.cfg
    force = self.requested or done == cfg.steps
    if not force and done % cfg.checkpoint_every:
      return
    if loop.guard is not None:
      loop.guard.verify(done)  # never checkpoint past a non-finite step under stop
    self.save(done, force)
    if self.requested:
      say(f"SIGTERM: saved a checkpoint at step {done} and stopped")
      loop.stop = loop.preempted = True

  def save(self, done: int, force: bool) -> None:
    loop, cfg = self.loop, self.loop.cfg
    position = {"seed": cfg.data.seed, "step": done, "order": loop.prog.order()}
    if loop.ckpt.save(done, loop.saved(), position, force=force):
      for sink in loop.sinks:  # rows up to a checkpoint reach the disk with it
        sink.sync()


class Records:
  """--log_records: each step's groups, per host and member (exact-resume checks)."""

  def __init__(self, loop: Loop):
    self.loop = loop
    self.logs = [RecordLog(w, jax.process_index(), loop.start) for w in loop.prog.workdirs]
    for log in self.logs:
      loop.on_close(log.close)
      loop.sinks.append(log)
      for note in log.notes:
        say(note)

  def on_batch(self, step: int) -> None:
    for log, b in zip(self.logs, self.loop.prog.batchers):
      log.write(step + 1, b.last_indices)


class Rounds:
  """--rounds: a fresh reference (and re-ranked groups) at each round's first step."""

  def __init__(self, loop: Loop, s):
    self.loop = loop
    prog = loop.prog
    self.rounds = rounds_lib.Rounds(s.cfg, prog.batchers[0], prog.graphdef, s.train_ds,
                                    prog.put_eval, s.mesh, say, loop.start)

  def before_step(self, step: int) -> None:
    prog = self.loop.prog
    params = self.rounds.begin(step, prog.state.params, prog.ref.params,
                               lambda p, r, a: reference.sync(p, prog.ref, a).params)
    prog.ref = prog.ref.replace(params=params)


class RefSync:
  """TR-DPO: every --ref_sync_every steps, ref <- alpha * policy + (1 - alpha) * ref."""

  def __init__(self, loop: Loop, every: int, alpha: float):
    self.loop, self.every, self.alpha = loop, every, alpha

  def after_update(self, done: int) -> None:
    prog = self.loop.prog
    if done % self.every == 0:
      prog.ref = reference.sync(prog.state.params, prog.ref, self.alpha)


class Finish:
  """After the loop: the plot, the Hugging Face export and final_metrics.json."""

  def __init__(self, loop: Loop):
    self.loop = loop

  def finish(self) -> None:
    loop, cfg = self.loop, self.loop.cfg
    process0 = jax.process_index() == 0
    if cfg.plot and process0:
      for w in loop.writers:
        plots.plot_run(read_metrics(w.path), paths.join(paths.dirname(w.path), "metrics.png"),
                       title=f"{cfg.loss} on {os.path.basename(cfg.data.train_data)}",
                       panels=loop.prog.panels or plots.PANELS)
    if cfg.export_hf and not loop.preempted:  # all processes gather; process 0 writes
      hf_export.export(cfg, loop.prog.state.params, loop.prog.ref, say)
    if process0 and not loop.preempted:
      for w, row in zip(loop.prog.workdirs, loop.final or [{}] * len(loop.prog.workdirs)):
        with paths.open(paths.join(w, "final_metrics.json"), "w") as f:
          json.dump(row, f, indent=1)


def default_hooks(cfg, prog, s, loop: Loop) -> list:
  """The hooks a run's flags ask for, in the order they act within a step."""
  hooks: list = []
  if cfg.rounds > 1 and cfg.role != "online":
    hooks.append(Rounds(loop, s))
  if cfg.log_records:
    hooks.append(Records(loop))
  if cfg.ref_sync_every:
    hooks.append(RefSync(loop, cfg.ref_sync_every, cfg.ref_sync_alpha))
  elif cfg.role == "online" and cfg.rounds > 1:  # iterative online DPO: reference <- policy
    hooks.append(RefSync(loop, cfg.steps // cfg.rounds, 1.0))
  hooks += [Guard(loop), Eval(loop, s.eval_ds), Checkpoint(loop), Finish(loop)]
  return hooks
