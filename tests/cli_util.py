"""Running `python -m jaxpref.main` / `jaxpref.sweep` as a user would, from the repo root."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "experiments", "quickstart.flags")


def env():
  e = dict(os.environ)
  e.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop
  e["JAX_PLATFORMS"] = "cpu"
  return e


def train_cmd(workdir, *flags, flagfile=QUICKSTART):
  return [sys.executable, "-m", "jaxpref.main", f"--flagfile={flagfile}",
          f"--workdir={workdir}", "--noprogress", *flags]


def train(workdir, *flags, flagfile=QUICKSTART, check=True):
  proc = subprocess.run(train_cmd(workdir, *flags, flagfile=flagfile), cwd=ROOT, env=env(),
                        capture_output=True, text=True, timeout=900)
  if check and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return proc


def metrics(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]
