#!/usr/bin/env python3
"""Write an sbatch script that runs jaxpref-train on GPU nodes under SLURM, and submit it.

  python tpu/slurm.py --nodes=1 --gpus-per-node=8 --partition=gpu --time=02:00:00 \
      --flagfile=experiments/quickstart.flags --workdir=runs/quickstart -- --steps=100

One task per node: JAX runs one process per host that drives all of its GPUs.
jax.distributed.initialize() with no arguments finds the coordinator from SLURM's
environment, so the script passes no coordinator address. --dry-run prints the script and
the sbatch command and writes nothing. Stdlib only. See tpu/README.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys


def sbatch_script(args, extra: list[str], cwd: str) -> str:
  train = ["jaxpref-train", f"--flagfile={args.flagfile}", f"--workdir={args.workdir}", *extra]
  lines = [
      "#!/bin/bash",
      f"#SBATCH --job-name={args.job_name}",
      f"#SBATCH --nodes={args.nodes}",
      "#SBATCH --ntasks-per-node=1",
      f"#SBATCH --gpus-per-node={args.gpus_per_node}",
      f"#SBATCH --cpus-per-task={args.cpus_per_task}",
      f"#SBATCH --time={args.time}",
      "#SBATCH --output=slurm-%x-%j.out",
  ]
  if args.partition:
    lines.append(f"#SBATCH --partition={args.partition}")
  if args.account:
    lines.append(f"#SBATCH --account={args.account}")
  lines += ["", "set -eo pipefail",
            # Flag files and data paths are relative to where the script was written.
            f"cd {shlex.quote(cwd)}"]
  if args.setup:
    lines.append(args.setup)
  # JAX preallocates 75% of each GPU's memory by default; a training job owns its GPUs, so
  # it may take more (set after --setup, which might otherwise override it).
  lines += [f"export XLA_PYTHON_CLIENT_MEM_FRACTION={args.mem_fraction}",
            "srun " + shlex.join(train), ""]
  return "\n".join(lines)


def check(args) -> None:
  if args.nodes < 1 or args.gpus_per_node < 1 or args.cpus_per_task < 1:
    raise ValueError("--nodes, --gpus-per-node and --cpus-per-task must be >= 1")
  if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", args.time):
    raise ValueError(f"--time: expected [D-]HH:MM:SS or minutes, got {args.time!r}")
  if not os.path.isfile(args.flagfile):
    raise ValueError(f"--flagfile: no such file {args.flagfile!r}")
  if not 0 < args.mem_fraction <= 1:
    raise ValueError(f"--mem-fraction must be in (0, 1], got {args.mem_fraction}")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="tpu/slurm.py", description=__doc__.split("\n")[0],
                              epilog="Flags after -- go to jaxpref-train.")
  p.add_argument("--flagfile", required=True, help="experiment flag file, relative to the cwd")
  p.add_argument("--workdir", required=True,
                 help="jaxpref-train --workdir (on a shared filesystem)")
  p.add_argument("--nodes", type=int, default=1)
  p.add_argument("--gpus-per-node", type=int, default=8)
  p.add_argument("--cpus-per-task", type=int, default=16)
  p.add_argument("--time", default="04:00:00", help="wall-clock limit, [D-]HH:MM:SS")
  p.add_argument("--partition", help="SLURM partition (default: the cluster's)")
  p.add_argument("--account", help="SLURM account to charge")
  p.add_argument("--job-name", default="jaxpref")
  p.add_argument("--mem-fraction", type=float, default=0.9, help="XLA_PYTHON_CLIENT_MEM_FRACTION: "
                 "the share of each GPU's memory JAX preallocates (default %(default)s)")
  p.add_argument("--setup", help="a shell line run before srun, e.g. 'source .venv/bin/activate'")
  p.add_argument("--script", help="where to write the script (default: JOB_NAME.sbatch)")
  p.add_argument("--dry-run", action="store_true", help="print the script and sbatch command only")
  return p


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  args = build_parser().parse_args(argv)
  try:
    if "--dry-run" in extra:  # a typo that would submit the job for real
      raise ValueError("--dry-run must come before --, not among jaxpref-train's flags")
    check(args)
  except ValueError as e:
    print(f"tpu/slurm.py: error: {e}", file=sys.stderr)
    return 1
  script = sbatch_script(args, extra, os.getcwd())
  path = args.script or f"{args.job_name}.sbatch"
  cmd = ["sbatch", path]
  if args.dry_run:
    print(f"# {path}")
    print(script)
    print(shlex.join(cmd))
    return 0
  with open(path, "w") as f:
    f.write(script)
  print(f"wrote {path}\n+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
  try:
    rc = subprocess.run(cmd).returncode
  except FileNotFoundError:
    print("tpu/slurm.py: error: sbatch: command not found (run this on a SLURM login node)",
          file=sys.stderr)
    return 1
  if rc != 0:
    print(f"tpu/slurm.py: error: exit status {rc} from: {shlex.join(cmd)}", file=sys.stderr)
  return 1 if rc else 0


if __name__ == "__main__":
  sys.exit(main())
