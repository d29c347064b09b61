"""`jaxpref-train`: flags -> RunConfig -> setup -> the loop.

  jaxpref-train --flagfile=experiments/quickstart.flags --workdir=/tmp/jaxpref/quickstart

Exit codes (`jaxpref.cli_errors`): 0 done, 2 bad input (one FATAL line naming the flag,
file or record), 3 preempted (SIGTERM: a checkpoint was saved; run again to resume), 1
crashed (a traceback and a one-line summary).
"""

from __future__ import annotations


import jax
from absl import app, flags, logging

from jaxpref import cli_errors, paths
from jaxpref import flags as jflags
from jaxpref.parallel import distributed
from jaxpref.train import loop, memory, workdir
from jaxpref.train.setup import say

FLAGS = flags.FLAGS


def _user_error(kind: type, fn, *args):
  """`fn(*args)`, its ValueError (bad flags, data, tokenizer, mesh) as a one-line `kind`."""
  try:
    return fn(*args)
  except cli_errors.UserError:
    raise
  except ValueError as e:
    raise kind(str(e)) from e


def main(argv: list[str]) -> None:
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and jax are chatty at INFO; -v=0 restores it
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.estimate_only:
    try:
      memory.prepare_backend(FLAGS.estimate_devices)
    except RuntimeError as e:
      raise cli_errors.FlagError(str(e)) from e
  _user_error(cli_errors.FlagError, distributed.initialize, FLAGS.coordinator_address,
              FLAGS.num_processes, FLAGS.process_id)
  cfg = _user_error(cli_errors.FlagError, jflags.to_config)
  paths.makedirs(cfg.workdir)
  if FLAGS.estimate_only:
    prepared = _user_error(cli_errors.DataError, loop.setup, cfg)
    print(memory.report(memory.estimate(prepared, compile=FLAGS.estimate_compile),
                       prepared.mesh))
    return
  lock = workdir.WorkdirLock(cfg.workdir).acquire() if jax.process_index() == 0 else None
  try:
    if lock is not None and lock.note:
      say(lock.note)
    prepared = _user_error(cli_errors.DataError, loop.setup, cfg)
    if jax.process_index() == 0:
      step = workdir.latest_checkpoint(cfg.workdir)
      for line in workdir.begin(cfg, resuming=step is not None,
                                allow_changes=FLAGS.allow_flag_changes, step=step):
        say(line)
      # Written once the flags are checked, so a refused resume leaves the record intact.
      with paths.open(paths.join(cfg.workdir, "flags.txt"), "w") as f:
        f.write(jflags.resolved_flags(cfg))
    loop.train(prepared)
  finally:
    if lock is not None:
      lock.release()


def run() -> None:
  cli_errors.entry_point(app.run)(main, flags_parser=jflags.parse)


if __name__ == "__main__":
  run()
