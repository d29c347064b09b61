"""Loading tpu/launch.py and tpu/slurm.py (scripts, not a package) and running them in
--dry-run, for the launcher tests."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  # tpu/ is a folder of scripts, not a package: load each file as a module.
  spec = importlib.util.spec_from_file_location(f"tpu_{name}", os.path.join(REPO, "tpu", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


launch = _load("launch")
slurm = _load("slurm")

GC = "gcloud compute tpus tpu-vm"
QR = "gcloud compute tpus queued-resources"
SCOPE = "--zone=us-west4-a"


def _with_dry_run(argv):
  # --dry-run must precede "--": after it, it would be a jaxpref-train flag.
  argv = list(argv)
  i = argv.index("--") if "--" in argv else len(argv)
  return argv[:i] + ["--dry-run"] + argv[i:]


def dry(capsys, *argv):
  """Runs launch.py in --dry-run; returns its printed commands, one per line."""
  rc = launch.main(_with_dry_run(argv))
  out = capsys.readouterr()
  assert rc == 0, out.err
  return out.out.splitlines()


def error(capsys, *argv, module=launch):
  """Runs with --dry-run, expects a failure; returns stderr."""
  try:
    rc = module.main(_with_dry_run(argv))
  except SystemExit as e:  # argparse: missing or malformed flags
    rc = e.code
  out = capsys.readouterr()
  assert rc != 0 and out.out == ""
  return out.err
