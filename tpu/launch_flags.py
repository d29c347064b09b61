"""The command line of tpu/launch.py: its subcommands and their flags."""

from __future__ import annotations

import argparse

REMOTE_DIR = "jaxpref_run"         # on every worker, relative to the ssh user's home
VENV = "jaxpref_venv"              # likewise: the Python >= 3.11 virtualenv jaxpref runs in
# An unattended run's: its startup script runs as root, with no user home.
BOOT_REMOTE_DIR, BOOT_VENV = "/opt/jaxpref_run", "/opt/jaxpref_venv"
DESCRIPTION = ("Launch jaxpref on a Cloud TPU VM slice with gcloud: create, install, run, stop, "
               "logs, copy, delete, up.")


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
  p.add_argument("--reserved", action="store_true", help="use the project's TPU reservation")
  p.add_argument("--best-effort", action="store_true",
                 help="queued best-effort capacity (gcloud alpha; can be preempted)")
  p.add_argument("--valid-until", help="queued: drop the request if not ACTIVE by then (6h, 2d)")
  p.add_argument("--wait-timeout", default="8h",
                 help="queued: give up waiting for ACTIVE after this (default %(default)s)")
  p.add_argument("--poll-every", type=int, default=30, help="queued: seconds between polls")
  p.add_argument("--ssh-retries", type=int, default=20,
                 help="ssh readiness probes after create (default %(default)s)")
  p.add_argument("--ssh-retry-wait", default="15s", help="between probes (default %(default)s)")
  p.add_argument("--service-account", help="the VM's service account (default: Compute "
                 "Engine's default one)")
  p.add_argument("--scopes", help="OAuth scopes, e.g. https://www.googleapis.com/auth/"
                 "cloud-platform (needed to write to GCS with the default account)")
  p.add_argument("--startup-script", help="a script every worker runs as root at each boot")


def _install_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--git", help="git URL to pip install from, e.g. "
                 "https://github.com/O/jaxpref.git@main")
  p.add_argument("--sdist", help="local sdist to copy and pip install (python setup.py sdist)")
  p.add_argument("--extra", default="tpu", help="setup.py extra to install (default tpu)")
  p.add_argument("--python-via", choices=["uv", "deadsnakes"], default="uv",
                 help="how each worker gets Python 3.11 for the venv (default uv)")
  _venv_flag(p)


def _venv_flag(p: argparse.ArgumentParser) -> None:
  p.add_argument("--venv", default=VENV, help="virtualenv on each worker (relative: under the "
                 "home; default %(default)s)")


def _run_flags(p: argparse.ArgumentParser, run: bool = True) -> None:
  if run:
    p.add_argument("--flagfile", required=True, help="experiment flag file, relative to the cwd")
    p.add_argument("--follow", action="store_true", help="then stream worker 0's log")
  p.add_argument("--workdir", required=True,
                 help="jaxpref-train --workdir (relative: under --remote-dir)")
  _remote_dir_flag(p)


def _remote_dir_flag(p: argparse.ArgumentParser) -> None:
  p.add_argument("--remote-dir", default=REMOTE_DIR, help="folder on each worker (default "
                 "%(default)s; an unattended run's default is " + BOOT_REMOTE_DIR + ")")


def _logs_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--worker", default="0", help="worker index, or all (default 0)")
  p.add_argument("--gather", help="copy every worker's log into this local folder instead")
  p.add_argument("--accelerator", help="with --gather: the slice type (gives the worker count)")
  _remote_dir_flag(p)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="tpu/launch.py", description=DESCRIPTION,
      epilog="Flags after -- go to jaxpref-train on every worker (run, up, startup-script).")
  sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
  run_flags = [_install_flags, _run_flags]
  adders = {
      "create": ("create a TPU VM or queued resource", [_create_flags]),
      "install": ("a Python 3.11 venv with jaxpref[tpu] on every worker", [_install_flags]),
      "run": ("free the TPU, then start jaxpref-train on every worker",
              [_run_flags, _venv_flag]),
      "stop": ("SIGTERM the run on every worker, then free the TPU", [_remote_dir_flag]),
      "logs": ("stream a worker's log, or gather all of them", [_logs_flags]),
      "copy": ("copy the work dir from every worker (or a gs:// one) to GCS",
               [lambda p: _run_flags(p, run=False)]),
      "delete": ("delete the TPU VM or queued resource", []),
      "up": ("create + install + run (--unattended: one startup script)",
             [_create_flags, *run_flags]),
      "startup-script": ("print the startup script of an unattended run", run_flags),
  }
  for name, (help_, adds) in adders.items():
    p = sub.add_parser(name, help=help_, description=help_)
    _common(p)
    for add in adds:
      add(p)
    if name == "stop":
      p.add_argument("--grace", default="120s", help="wait this long after SIGTERM (for the "
                     "checkpoint) before SIGKILL (default %(default)s)")
    if name == "copy":
      p.add_argument("--dest", required=True, help="gs://BUCKET/PATH")
    if name == "delete":
      p.add_argument("--queued", action="store_true", help="it was created with --queued")
    if name == "up":
      p.add_argument("--unattended", action="store_true", help="install and start from a "
                     "startup script at every boot, so a restarted VM resumes by itself")
  return parser
