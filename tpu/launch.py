#!/usr/bin/env python3
"""Launch jaxpref on a Cloud TPU VM slice with gcloud: create, install, run, stop, logs, copy,
delete, and up (create + install + run, or one unattended startup script).

  python tpu/launch.py up --name=dpo --zone=us-west4-a --accelerator=v5litepod-8 \
      --git=https://github.com/OWNER/jaxpref.git \
      --flagfile=experiments/quickstart.flags --workdir=runs/quickstart --follow

Every subcommand takes --dry-run: it prints the exact commands, one per line, and runs
nothing. Stdlib only (no jax), so it runs on a laptop that has nothing but gcloud.
What runs on the workers is in tpu/worker_shell.py. See tpu/README.md and docs/cloud.md.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tpu/ is not a package
import worker_shell  # noqa: E402
from launch_flags import (BOOT_REMOTE_DIR, BOOT_VENV, REMOTE_DIR, VENV,  # noqa: E402
                          build_parser)

# Runtime (software) versions for JAX, per TPU generation (cloud.google.com/tpu/docs/runtimes).
RUNTIMES = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
            "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
REMOTE_BUNDLE = "jaxpref-bundle.tar.gz"
LOG = "train.log"                  # one per worker: each worker has its own disk
METADATA_LIMIT = 256 * 1024  # bytes in one metadata value (the startup script)


class LaunchError(Exception):
  """A problem with the request, reported as one line without a traceback."""


def runtime_version(accelerator: str) -> str:
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator or "")
  if not m or m.group(1) not in RUNTIMES:
    known = ", ".join(f"{g}-N" for g in RUNTIMES)
    raise LaunchError(f"--accelerator: unknown accelerator type {accelerator!r}; "
                      f"expected one of {known} (e.g. v5litepod-8, v5p-64)")
  return RUNTIMES[m.group(1)]


def hosts(accelerator: str) -> int:
  """TPU VM workers in a slice. The number in the type counts TensorCores on v2-v4 and v5p
  (8 per host) and chips on v5e and v6e (8 on a one-host slice, 4 per host beyond)."""
  runtime_version(accelerator)
  gen, n = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator).groups()
  if gen in ("v5litepod", "v6e"):
    return 1 if int(n) <= 8 else int(n) // 4
  return max(1, int(n) // 8)


def seconds(value: str) -> int:
  """'90', '30s', '20m', '6h', '2d' -> seconds."""
  m = re.fullmatch(r"(\d+)([smhd]?)", value.strip())
  if not m:
    raise LaunchError(f"not a duration: {value!r} (e.g. 90, 30s, 20m, 6h, 2d)")
  return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


# ---- gcloud command builders: each returns one argv list ----

def _scope(args) -> list[str]:
  out = [f"--zone={args.zone}"]
  if args.project:
    out.append(f"--project={args.project}")
  return out


def tpu_vm(args, verb: str, *rest: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, args.name, *_scope(args), *rest]


def queued(args, verb: str, *rest: str, alpha: bool = False) -> list[str]:
  gcloud = ["gcloud", "alpha"] if alpha else ["gcloud"]
  return [*gcloud, "compute", "tpus", "queued-resources", verb, args.name, *_scope(args), *rest]


def ssh(args, command: str, worker: str = "all") -> list[str]:
  return tpu_vm(args, "ssh", f"--worker={worker}", "--command", command)


def scp(args, src: str, dest: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "scp", src, dest, *_scope(args),
          f"--worker={worker}"]


# ---- subcommands: each returns the list of commands it would run ----

def _capacity(args) -> str:
  """One of on-demand (default), spot, preemptible, reserved, best-effort."""
  chosen = [c for c in ("spot", "preemptible", "reserved", "best_effort") if getattr(args, c)]
  if len(chosen) > 1:
    raise LaunchError(f"--{' and --'.join(c.replace('_', '-') for c in chosen)} exclude each "
                      "other: pick one kind of capacity")
  kind = chosen[0].replace("_", "-") if chosen else "on-demand"
  if kind == "preemptible" and args.queued:
    raise LaunchError("--preemptible: queued resources take --spot instead")
  if kind == "best-effort" and not args.queued:
    raise LaunchError("--best-effort is a queued resource option: add --queued")
  if args.valid_until and not args.queued:
    raise LaunchError("--valid-until is a queued resource option: add --queued")
  return kind


def _vm_flags(args) -> list[str]:
  """Flags both kinds of create take: who the VM acts as, and what it runs at boot."""
  out = []
  if args.service_account:
    out.append(f"--service-account={args.service_account}")
  if args.scopes:
    out.append(f"--scopes={args.scopes}")
  if args.startup_script:
    out.append(f"--metadata-from-file=startup-script={args.startup_script}")
  return out


def create_cmds(args) -> list[list[str]]:
  default = runtime_version(args.accelerator)  # validates the type even with --version
  version = args.version or default
  kind = _capacity(args)
  if args.startup_script and not os.path.isfile(args.startup_script):
    raise LaunchError(f"--startup-script: no such file {args.startup_script!r}")
  extra = [] if kind == "on-demand" else [f"--{kind}"]
  if not args.queued:
    return [tpu_vm(args, "create", f"--accelerator-type={args.accelerator}",
                   f"--version={version}", *extra, *_vm_flags(args)), ssh_ready_cmd(args)]
  if args.valid_until:
    extra.append(f"--valid-until-duration={args.valid_until}")
  # The queued resource and the TPU VM it provisions share one name, so every other
  # subcommand (ssh, scp) addresses the node by --name whichever way it was created.
  # --best-effort exists only in the alpha command group.
  cmd = queued(args, "create", f"--node-id={args.name}", f"--accelerator-type={args.accelerator}",
               f"--runtime-version={version}", *extra, *_vm_flags(args),
               alpha=kind == "best-effort")
  return [cmd, wait_cmd(args), ssh_ready_cmd(args)]


def wait_cmd(args) -> list[str]:
  """A queued request returns at once; wait, at most --wait-timeout, until it is ACTIVE."""
  limit = seconds(args.wait_timeout)
  describe = shlex.join(queued(args, "describe", "--format=value(state.state)"))
  loop = (f's=""; until [ "$s" = ACTIVE ]; do s=$({describe}) || exit 1; '
          f'echo "queued resource {args.name}: $s"; '
          'case "$s" in FAILED|SUSPENDED) exit 1;; ACTIVE) ;; *) '
          f'if [ $SECONDS -ge {limit} ]; then echo "still $s after {args.wait_timeout}: '
          f'giving up (the request stays queued; delete it with delete --queued)"; exit 1; fi; '
          f'sleep {args.poll_every};; esac; done')
  return ["bash", "-c", loop]


def ssh_ready_cmd(args) -> list[str]:
  """ACTIVE is not ready: sshd and the ssh keys gcloud pushes reach the workers a little
  later. Retry a no-op ssh on every worker, a bounded number of times."""
  probe = shlex.join(ssh(args, "true"))
  tries, wait = args.ssh_retries, seconds(args.ssh_retry_wait)
  loop = (f"for i in $(seq {tries}); do {probe} && exit 0; "
          f'echo "ssh to {args.name} not ready (try $i of {tries}); retrying in {wait}s"; '
          f'sleep {wait}; done; echo "no ssh to {args.name} after {tries} tries"; exit 1')
  return ["bash", "-c", loop]


def _spec(args) -> str:
  """What pip installs: the git URL or the copied sdist, with the --extra."""
  if bool(args.git) == bool(args.sdist):
    raise LaunchError("install: give exactly one of --git=URL or --sdist=FILE "
                      "(python setup.py sdist writes dist/jaxpref-VERSION.tar.gz)")
  if args.git:
    url = args.git if args.git.startswith("git+") else "git+" + args.git
    return f"jaxpref[{args.extra}] @ {url}"
  if not os.path.isfile(args.sdist):
    raise LaunchError(f"--sdist: no such file {args.sdist!r}")
  # pip accepts extras after a local archive path: ./jaxpref-0.1.0.tar.gz[tpu]
  return f"./{os.path.basename(args.sdist)}[{args.extra}]"


def install_cmds(args) -> list[list[str]]:
  spec = _spec(args)
  script = worker_shell.install(args.venv, args.python_via, spec)
  if args.git:
    return [ssh(args, script)]
  return [scp(args, args.sdist, f"{args.name}:{os.path.basename(args.sdist)}"), ssh(args, script)]


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


def _train(args, extra: list[str]) -> tuple[list[str], list[str]]:
  """(files to bundle, the jaxpref-train argv)."""
  if any(a.startswith(("--workdir=", "-workdir=")) for a in extra):
    raise LaunchError("give the work dir as run's own --workdir, not after --")
  top = _inside_cwd(args.flagfile)
  return flag_files(top, extra), ["jaxpref-train", f"--flagfile={top}",
                                  f"--workdir={args.workdir}", *extra]


def run_cmds(args, extra: list[str]) -> list[list[str]]:
  files, train = _train(args, extra)
  bundle = os.path.join(tempfile.gettempdir(), f"jaxpref-{args.name}.tar.gz")
  rdir = worker_shell.path(args.remote_dir)
  remote = (f"mkdir -p {rdir} && tar -xzf {REMOTE_BUNDLE} -C {rdir} || exit 1; "
            + worker_shell.start(args.remote_dir, args.venv, train, LOG))
  cmds = [["tar", "-czf", bundle, *files],
          scp(args, bundle, f"{args.name}:{REMOTE_BUNDLE}"),
          ssh(args, remote)]
  return cmds + (logs_cmds(args) if args.follow else [])


def stop_cmds(args) -> list[list[str]]:
  return [ssh(args, worker_shell.stop(args.remote_dir, seconds(args.grace)))]


def logs_cmds(args) -> list[list[str]]:
  log = worker_shell.path(f"{args.remote_dir}/{LOG}")
  gather = getattr(args, "gather", None)
  if gather:  # one file per worker, copied back: worker-0.log, worker-1.log, ...
    if not getattr(args, "accelerator", None):
      raise LaunchError("logs --gather needs --accelerator (to know how many workers)")
    return [["mkdir", "-p", gather]] + [
        scp(args, f"{args.name}:{args.remote_dir}/{LOG}", f"{gather}/worker-{w}.log", str(w))
        for w in range(hosts(args.accelerator))]
  worker = str(getattr(args, "worker", "0"))
  if worker == "all":  # every worker's lines, each prefixed with its host name
    return [ssh(args, f'tail -n +1 -F {log} | sed -u "s/^/$(hostname): /"')]
  return [ssh(args, f"tail -n +1 -F {log}", worker=worker)]  # -F: survives a log re-created


def copy_cmds(args) -> list[list[str]]:
  if not args.dest.startswith("gs://"):
    raise LaunchError(f"--dest must be a gs:// URL, got {args.dest!r}")
  if args.workdir.startswith("gs://"):  # the run wrote there: copied inside GCS, from here
    if args.workdir.rstrip("/") == args.dest.rstrip("/"):
      raise LaunchError(f"--workdir={args.workdir} is already --dest; nothing to copy")
    return [["gcloud", "storage", "rsync", "--recursive", args.workdir, args.dest]]
  src = args.workdir if os.path.isabs(args.workdir) else f"{args.remote_dir}/{args.workdir}"
  # Every worker: each holds its own process's checkpoint shards (orbax's ocdbt.process_N);
  # worker 0 (JAX process 0) also metrics, plots and the run record. No two write one file.
  return [ssh(args, shlex.join(["gcloud", "storage", "rsync", "--recursive", src, args.dest]))]


def delete_cmds(args) -> list[list[str]]:
  if args.queued:  # --force deletes the TPU VM the queued resource holds, too
    return [queued(args, "delete", "--force", "--quiet")]
  return [tpu_vm(args, "delete", "--quiet")]


def startup_script(args, extra: list[str]) -> str:
  """The boot script of an unattended run: install, unpack the embedded bundle, start."""
  if args.sdist:
    raise LaunchError("--unattended installs from --git (a startup script cannot scp)")
  files, train = _train(args, extra)
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as tar:
    for path in files:
      tar.add(path)
  b64 = base64.b64encode(buf.getvalue()).decode()
  try:
    script = worker_shell.startup_script(
        via=args.python_via, spec=_spec(args), bundle_b64=b64, train=train, log=LOG,
        rdir=args.remote_dir if args.remote_dir != REMOTE_DIR else BOOT_REMOTE_DIR,
        venv_dir=args.venv if args.venv != VENV else BOOT_VENV)
  except ValueError as e:
    raise LaunchError(str(e)) from None
  if len(script.encode()) > METADATA_LIMIT:
    raise LaunchError(f"the startup script is {len(script.encode())} bytes, over the "
                      f"{METADATA_LIMIT}-byte metadata limit: the bundled flag and data "
                      "files are too large; put the data on a path every worker can read")
  return script


def up_cmds(args, extra: list[str]) -> list[list[str]]:
  if not args.unattended:
    return create_cmds(args) + install_cmds(args) + run_cmds(args, extra)
  if args.startup_script:
    raise LaunchError("--unattended writes its own startup script; drop --startup-script")
  script = startup_script(args, extra)
  args.startup_script = os.path.join(tempfile.gettempdir(), f"jaxpref-{args.name}-startup.sh")
  with open(args.startup_script, "w") as f:
    f.write(script)
  print(f"note: startup script written to {args.startup_script} (view it with the "
        "startup-script subcommand)", file=sys.stderr)
  return create_cmds(args)[:-1]  # nothing to ssh into: no readiness probe


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


def plan(args, extra: list[str]) -> list[list[str]]:
  if "--dry-run" in extra:  # a typo that would run everything for real
    raise LaunchError("--dry-run must come before --, not among jaxpref-train's flags")
  if extra and args.cmd not in ("run", "up", "startup-script"):
    raise LaunchError(f"{args.cmd}: flags after -- are only for run, up and startup-script")
  return {
      "create": lambda: create_cmds(args),
      "install": lambda: install_cmds(args),
      "run": lambda: run_cmds(args, extra),
      "stop": lambda: stop_cmds(args),
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
    if args.cmd == "startup-script":  # the script itself, not commands
      print(startup_script(args, extra), end="")
    else:
      execute(plan(args, extra), args.dry_run)
  except LaunchError as e:
    print(f"tpu/launch.py {args.cmd}: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
