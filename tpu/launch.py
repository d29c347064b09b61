#!/usr/bin/env python3
"""Launch jaxpref on a Cloud TPU VM slice with gcloud: create, install, run, logs, copy, delete.

  python tpu/launch.py up --name=dpo --zone=us-west4-a --accelerator=v5litepod-8 \
      --git=https://github.com/OWNER/jaxpref.git \
      --flagfile=experiments/quickstart.flags --workdir=runs/quickstart --follow

Every subcommand takes --dry-run: it prints the exact commands, one per line, and runs
nothing. Stdlib only (no jax), so it runs on a laptop that has nothing but gcloud.
See tpu/README.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile

# Runtime (software) versions for JAX, per TPU generation (cloud.google.com/tpu/docs/runtimes).
RUNTIMES = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",  # v5e
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
REMOTE_DIR = "jaxpref_run"         # on every worker, relative to the ssh user's home
REMOTE_BUNDLE = "jaxpref-bundle.tar.gz"
LOG = "train.log"                  # one per worker: each worker has its own disk
# Non-interactive ssh shells do not read ~/.profile, and pip --user installs scripts there.
PATH_FIX = 'export PATH="$HOME/.local/bin:$PATH"'


class LaunchError(Exception):
  """A problem with the request, reported as one line without a traceback."""


def runtime_version(accelerator: str) -> str:
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator or "")
  if not m or m.group(1) not in RUNTIMES:
    known = ", ".join(f"{g}-N" for g in RUNTIMES)
    raise LaunchError(f"--accelerator: unknown accelerator type {accelerator!r}; "
                      f"expected one of {known} (e.g. v5litepod-8, v5p-64)")
  return RUNTIMES[m.group(1)]


# ---- gcloud command builders: each returns one argv list ----

def _scope(args) -> list[str]:
  out = [f"--zone={args.zone}"]
  if args.project:
    out.append(f"--project={args.project}")
  return out


def tpu_vm(args, verb: str, *rest: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, args.name, *_scope(args), *rest]


def queued(args, verb: str, *rest: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", verb, args.name, *_scope(args), *rest]


def ssh(args, command: str, worker: str = "all") -> list[str]:
  return tpu_vm(args, "ssh", f"--worker={worker}", "--command", command)


def scp_to_workers(args, local: str, remote: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{args.name}:{remote}",
          *_scope(args), "--worker=all"]


# ---- subcommands: each returns the list of commands it would run ----

def create_cmds(args) -> list[list[str]]:
  default = runtime_version(args.accelerator)  # validates the type even with --version
  version = args.version or default
  if args.spot and args.preemptible:
    raise LaunchError("--spot and --preemptible exclude each other (spot is the newer model)")
  if not args.queued:
    cmd = tpu_vm(args, "create", f"--accelerator-type={args.accelerator}", f"--version={version}")
    return [cmd + (["--spot"] if args.spot else []) + (["--preemptible"] if args.preemptible else [])]
  if args.preemptible:
    raise LaunchError("--preemptible: queued resources take --spot instead")
  # The queued resource and the TPU VM it provisions share one name, so every other
  # subcommand (ssh, scp) addresses the node by --name whichever way it was created.
  cmd = queued(args, "create", f"--node-id={args.name}", f"--accelerator-type={args.accelerator}",
               f"--runtime-version={version}")
  return [cmd + (["--spot"] if args.spot else []), wait_cmd(args)]


def wait_cmd(args) -> list[str]:
  """A queued request returns at once; install must wait until the slice is ACTIVE."""
  describe = shlex.join(queued(args, "describe", "--format=value(state.state)"))
  loop = (f's=""; until [ "$s" = ACTIVE ]; do s=$({describe}) || exit 1; '
          f'echo "queued resource {args.name}: $s"; '
          'case "$s" in FAILED|SUSPENDED) exit 1;; ACTIVE) ;; *) sleep 30;; esac; done')
  return ["bash", "-c", loop]


def install_cmds(args) -> list[list[str]]:
  if bool(args.git) == bool(args.sdist):
    raise LaunchError("install: give exactly one of --git=URL or --sdist=FILE "
                      "(python setup.py sdist writes dist/jaxpref-VERSION.tar.gz)")
  pip = "python3 -m pip install --upgrade pip && python3 -m pip install "
  if args.git:
    url = args.git if args.git.startswith("git+") else "git+" + args.git
    return [ssh(args, pip + shlex.quote(f"jaxpref[{args.extra}] @ {url}"))]
  if not os.path.isfile(args.sdist):
    raise LaunchError(f"--sdist: no such file {args.sdist!r}")
  base = os.path.basename(args.sdist)
  # pip accepts extras after a local archive path: ./jaxpref-0.1.0.tar.gz[tpu]
  return [scp_to_workers(args, args.sdist, base),
          ssh(args, pip + shlex.quote(f"./{base}[{args.extra}]"))]


def _include_path(base: str, value: str) -> str:
  """Where jaxpref finds --flagfile=VALUE written in a file in folder BASE."""
  path = os.path.expanduser(value)
  if base and not os.path.isabs(path) and os.path.exists(os.path.join(base, path)):
    path = os.path.join(base, path)
  return path


def flag_files(flagfile: str, extra: list[str]) -> list[str]:
  """Local files a run reads: the flag files (with includes) and file-valued flags.

  Mirrors jaxpref.flags.expand_flagfiles: an included --flagfile is looked up from the
  including file's folder first; --loss_module likewise; other paths are from the cwd.
  """
  found: list[str] = []

  def visit(lines: list[str], base: str, seen: tuple, parent: str = "") -> None:
    for line in lines:
      name, _, value = line.lstrip("-").partition("=")
      if not line.startswith("-") or not value:
        continue
      if name == "flagfile":
        path = _include_path(base, value)
        if not os.path.isfile(path):
          raise LaunchError(f"--flagfile: no such file {path!r}"
                            + (f" (included from {parent})" if parent else ""))
        if os.path.abspath(path) in seen:
          raise LaunchError(f"--flagfile: {path} includes itself")
        found.append(path)
        with open(path) as f:
          inner = [ln.strip() for ln in f]
        inner = [ln for ln in inner if ln and not ln.startswith(("#", "//"))]
        visit(inner, os.path.dirname(path), seen + (os.path.abspath(path),), path)
      elif name == "workdir":
        continue
      elif name == "loss_module" and base and os.path.isfile(os.path.join(base, value)):
        found.append(os.path.join(base, value))
      elif os.path.isfile(value):
        found.append(value)

  visit([f"--flagfile={flagfile}", *extra], "", ())
  for p in sorted({p for p in found if os.path.isabs(p)}):
    print(f"note: {p} is not copied: an absolute path must exist on every worker", file=sys.stderr)
  return sorted({_inside_cwd(p) for p in found if not os.path.isabs(p)})


def _inside_cwd(path: str) -> str:
  """Files keep their path relative to the cwd on the workers, so relative flags still work."""
  rel = os.path.relpath(os.path.abspath(path))
  if rel.startswith(".."):
    raise LaunchError(f"{path} is outside the current folder; run tpu/launch.py from a folder "
                      "that contains every flag and data file, or give an absolute path that "
                      "exists on every worker")
  return rel


def run_cmds(args, extra: list[str]) -> list[list[str]]:
  if any(a.startswith(("--workdir=", "-workdir=")) for a in extra):
    raise LaunchError("give the work dir as run's own --workdir, not after --")
  top = _inside_cwd(args.flagfile)
  files = flag_files(top, extra)
  bundle = os.path.join(tempfile.gettempdir(), f"jaxpref-{args.name}.tar.gz")
  train = ["jaxpref-train", f"--flagfile={top}", f"--workdir={args.workdir}", *extra]
  rdir = shlex.quote(args.remote_dir)
  remote = (f"mkdir -p {rdir} && tar -xzf {REMOTE_BUNDLE} -C {rdir} && cd {rdir} || exit 1; "
            f"{PATH_FIX}; "
            f"nohup {shlex.join(train)} > {LOG} 2>&1 < /dev/null & "
            f'echo "started on $(hostname): pid $!, log ~/{args.remote_dir}/{LOG}"')
  cmds = [["tar", "-czf", bundle, *files],
          scp_to_workers(args, bundle, REMOTE_BUNDLE),
          ssh(args, remote)]
  return cmds + (logs_cmds(args) if args.follow else [])


def logs_cmds(args) -> list[list[str]]:
  # -F keeps following across a restart that recreates the log.
  log = shlex.quote(f"{args.remote_dir}/{LOG}")
  return [ssh(args, f"tail -n +1 -F {log}", worker=str(getattr(args, "worker", "0")))]


def copy_cmds(args) -> list[list[str]]:
  if not args.dest.startswith("gs://"):
    raise LaunchError(f"--dest must be a gs:// URL, got {args.dest!r}")
  src = args.workdir if os.path.isabs(args.workdir) else f"{args.remote_dir}/{args.workdir}"
  # Worker 0 is JAX process 0, the one that writes metrics and plots.
  return [ssh(args, shlex.join(["gcloud", "storage", "rsync", "--recursive", src, args.dest]),
              worker="0")]


def delete_cmds(args) -> list[list[str]]:
  if args.queued:  # --force deletes the TPU VM the queued resource holds, too
    return [queued(args, "delete", "--force", "--quiet")]
  return [tpu_vm(args, "delete", "--quiet")]


def up_cmds(args, extra: list[str]) -> list[list[str]]:
  return create_cmds(args) + install_cmds(args) + run_cmds(args, extra)


# ---- running ----

def execute(cmds: list[list[str]], dry_run: bool) -> None:
  for cmd in cmds:
    line = shlex.join(cmd)
    if dry_run:
      print(line)
      continue
    print(f"+ {line}", file=sys.stderr, flush=True)
    try:
      rc = subprocess.run(cmd).returncode
    except FileNotFoundError:
      raise LaunchError(f"{cmd[0]}: command not found (install the Google Cloud CLI)") from None
    if rc != 0:
      raise LaunchError(f"stopped: exit status {rc} from: {line}")


def _common(p: argparse.ArgumentParser) -> None:
  p.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
  p.add_argument("--zone", required=True, help="e.g. us-west4-a (v5e), us-east5-a (v5p)")
  p.add_argument("--project", help="GCP project (default: gcloud config's)")
  p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")


def _create_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--accelerator", required=True, help="e.g. v5litepod-8, v5litepod-256, v5p-64")
  p.add_argument("--version", help="TPU runtime version (default: per generation, see RUNTIMES)")
  p.add_argument("--queued", action="store_true", help="request a queued resource")
  p.add_argument("--spot", action="store_true", help="Spot capacity (can be preempted)")
  p.add_argument("--preemptible", action="store_true", help="preemptible TPU VM (older model)")


def _install_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--git", help="git URL to pip install from, e.g. https://github.com/O/jaxpref.git@main")
  p.add_argument("--sdist", help="local sdist to copy and pip install (python setup.py sdist)")
  p.add_argument("--extra", default="tpu", help="setup.py extra to install (default tpu)")


def _run_flags(p: argparse.ArgumentParser, run: bool = True) -> None:
  if run:
    p.add_argument("--flagfile", required=True, help="experiment flag file, relative to the cwd")
    p.add_argument("--follow", action="store_true", help="then stream worker 0's log")
  p.add_argument("--workdir", required=True, help="jaxpref-train --workdir (relative: under --remote-dir)")
  p.add_argument("--remote-dir", default=REMOTE_DIR, help="folder on each worker (default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="tpu/launch.py", description=__doc__.split("\n")[0],
      epilog="Flags after -- go to jaxpref-train on every worker (run, up).")
  sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
  adders = {
      "create": ("create a TPU VM or queued resource", [_create_flags]),
      "install": ("pip install jaxpref[tpu] on every worker", [_install_flags]),
      "run": ("start jaxpref-train on every worker", [_run_flags]),
      "logs": ("stream a worker's log", []),
      "copy": ("copy the work dir from worker 0 to GCS", [lambda p: _run_flags(p, run=False)]),
      "delete": ("delete the TPU VM or queued resource", []),
      "up": ("create + install + run", [_create_flags, _install_flags, _run_flags]),
  }
  for name, (help_, adds) in adders.items():
    p = sub.add_parser(name, help=help_, description=help_)
    _common(p)
    for add in adds:
      add(p)
    if name == "logs":
      p.add_argument("--worker", default="0", help="worker index (default 0)")
      p.add_argument("--remote-dir", default=REMOTE_DIR)
    if name == "copy":
      p.add_argument("--dest", required=True, help="gs://BUCKET/PATH")
    if name == "delete":
      p.add_argument("--queued", action="store_true", help="it was created with --queued")
  return parser


def plan(args, extra: list[str]) -> list[list[str]]:
  if "--dry-run" in extra:  # a typo that would run everything for real
    raise LaunchError("--dry-run must come before --, not among jaxpref-train's flags")
  if extra and args.cmd not in ("run", "up"):
    raise LaunchError(f"{args.cmd}: flags after -- are only for run and up")
  return {
      "create": lambda: create_cmds(args),
      "install": lambda: install_cmds(args),
      "run": lambda: run_cmds(args, extra),
      "logs": lambda: logs_cmds(args),
      "copy": lambda: copy_cmds(args),
      "delete": lambda: delete_cmds(args),
      "up": lambda: up_cmds(args, extra),
  }[args.cmd]()


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  # Split by hand: argparse would take jaxpref flags after -- for its own.
  extra = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  args = build_parser().parse_args(argv)
  try:
    execute(plan(args, extra), args.dry_run)
  except LaunchError as e:
    print(f"tpu/launch.py {args.cmd}: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
