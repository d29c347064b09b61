"""`jaxpref-train`: flags -> RunConfig -> train.run.

  jaxpref-train --flagfile=experiments/quickstart.flags --workdir=/tmp/jaxpref/quickstart
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from jaxpref import flags as jflags

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and jax are chatty at INFO; -v=0 restores it
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.estimate_only:
    from jaxpref.train import memory
    try:
      memory.prepare_backend(FLAGS.estimate_devices)
    except RuntimeError as e:
      print(f"FATAL: {e}", file=sys.stderr)
      sys.exit(1)
  from jaxpref.parallel import distributed  # before anything touches a device
  try:
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    cfg = jflags.to_config()
  except ValueError as e:
    print(f"FATAL: {e}", file=sys.stderr)
    sys.exit(1)
  os.makedirs(cfg.workdir, exist_ok=True)
  import jax
  from jaxpref.train import hooks, loop  # after flags: keeps --help fast
  try:
    prepared = loop.setup(cfg)
  except (ValueError, OSError) as e:  # bad data, tokenizer path, mesh: no traceback
    print(f"FATAL: {e}", file=sys.stderr)
    sys.exit(1)
  if FLAGS.estimate_only:
    from jaxpref.train import memory
    print(memory.report(memory.estimate(prepared), prepared.mesh))
    return
  if jax.process_index() == 0:  # re-runs a training run; written once its flags are checked
    with open(os.path.join(cfg.workdir, "flags.txt"), "w") as f:
      f.write(jflags.resolved_flags())
  try:
    loop.train(prepared)
  except hooks.Preempted as e:
    print(f"PREEMPTED: {e}", file=sys.stderr)
    sys.exit(hooks.PREEMPTED_EXIT)
  except ValueError as e:  # a refused resume, a data problem found mid-run
    print(f"FATAL: {e}", file=sys.stderr)
    sys.exit(1)


def run() -> None:
  app.run(main, flags_parser=jflags.parse)


if __name__ == "__main__":
  run()
