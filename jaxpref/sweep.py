"""`jaxpref-sweep DIR`: run every flag file of an ablation folder, then tabulate and plot.

A folder is `base.flags` plus one small file per row that includes it; files included by
another file of the folder are not rows. Each row runs as its own `jaxpref-train` process
in `WORKDIR_ROOT/<row>` (a finished row is skipped on a second call: it resumes at its
last step). Writes `WORKDIR_ROOT/results.md` (final eval metrics per row) and
`WORKDIR_ROOT/comparison.png`. A row whose run exited with the preempted code
(`cli_errors.PREEMPTED_EXIT`: SIGTERM, checkpoint saved) is reported as "preempted", not
failed; calling the sweep again resumes it. Exit code: 1 when a row failed, else 3 when one
was preempted, else 0.

  jaxpref-sweep experiments/dpo_beta [--workdir_root=DIR] [-- --steps=100 ...]
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys

from jaxpref import cli_errors
from jaxpref.train import plots
from jaxpref.train.metrics import read_metrics

TABLE_KEYS = ("loss", "rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected")
# An online run's held-out row: the mean reward of its samples (a verifier's accuracy).
ONLINE_KEYS = ("reward/mean", "length/mean", "length/truncated_fraction")


def rows_of(folder: str) -> list[str]:
  """The folder's flag files that no other file of the folder includes, sorted."""
  files = sorted(glob.glob(os.path.join(folder, "*.flags")))
  if not files:
    raise cli_errors.FlagError(f"jaxpref-sweep: no *.flags files in {folder}")
  included = set()
  for f in files:
    with open(f) as fh:
      for line in fh:
        line = line.strip()
        if line.startswith("--flagfile="):
          target = line.split("=", 1)[1]
          included.add(os.path.abspath(os.path.join(os.path.dirname(f), target)))
          included.add(os.path.abspath(target))
  return [f for f in files if os.path.abspath(f) not in included]


def final_eval(rows: list[dict]) -> dict:
  evals = [r for r in rows if r["split"] == "eval"]
  return evals[-1] if evals else {}


def markdown_table(results: dict[str, dict]) -> str:
  keys = [k for k in TABLE_KEYS + ONLINE_KEYS if any(k in r for r in results.values())]
  keys = keys or list(TABLE_KEYS)
  head = "| run | step | " + " | ".join(keys) + " |"
  lines = [head, "|" + "---|" * (len(keys) + 2)]
  for name, row in results.items():
    if row.get("status") == "preempted":
      lines.append(f"| {name} | preempted |" + " |" * len(keys))
      continue
    if not row:
      lines.append(f"| {name} | failed |" + " |" * len(keys))
      continue
    cells = " | ".join(f"{row[k]:.4f}" if k in row else "" for k in keys)
    lines.append(f"| {name} | {row['step']} | {cells} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="jaxpref-sweep", description=__doc__.split("\n\n")[0])
  parser.add_argument("folder")
  parser.add_argument("--workdir_root", default=None,
                      help="where row work dirs go (default: runs/<folder name>)")
  args, extra = parser.parse_known_args(argv)
  extra = [a for a in extra if a != "--"]
  root = args.workdir_root or os.path.join("runs", os.path.basename(os.path.normpath(args.folder)))
  os.makedirs(root, exist_ok=True)
  results, histories = {}, {}
  for i, flagfile in enumerate(rows_of(args.folder)):
    name = os.path.splitext(os.path.basename(flagfile))[0]
    workdir = os.path.join(root, name)
    print(f"[{i + 1}] {name}: jaxpref-train --flagfile={flagfile} --workdir={workdir}", flush=True)
    cmd = [sys.executable, "-m", "jaxpref.main", f"--flagfile={flagfile}",
           f"--workdir={workdir}", "--noprogress", *extra]
    code = subprocess.call(cmd)
    metrics = os.path.join(workdir, "metrics.jsonl")
    if code == cli_errors.PREEMPTED_EXIT:  # stopped by SIGTERM after a checkpoint, not failed
      print(f"    {name} preempted (exit code {code}); run the sweep again to resume it",
            file=sys.stderr)
      results[name] = {"status": "preempted"}
      continue
    if code != 0 or not os.path.exists(metrics):
      print(f"    {name} failed (exit code {code})", file=sys.stderr)
      results[name] = {}
      continue
    histories[name] = read_metrics(metrics)
    results[name] = final_eval(histories[name])
  table = markdown_table(results)
  with open(os.path.join(root, "results.md"), "w") as f:
    f.write(f"# {args.folder}\n\nFinal held-out metrics of each row.\n\n{table}")
  if histories:
    online = any("reward/mean" in r for rows in histories.values() for r in rows)
    plots.plot_runs(histories, os.path.join(root, "comparison.png"),
                    panels=plots.ONLINE_PANELS if online else plots.PANELS)
  print(table)
  print(f"wrote {root}/results.md and {root}/comparison.png")
  if any(not r for r in results.values()):
    return 1
  preempted = any(r.get("status") == "preempted" for r in results.values())
  return cli_errors.PREEMPTED_EXIT if preempted else 0


@cli_errors.entry_point
def run() -> int:
  return main(sys.argv[1:])


if __name__ == "__main__":
  run()
