"""The label-noise ensemble (experiments/repro/label_noise/strength.flags: 5 BT reward models,
300 steps of 32 pairs) trained one member after another vs vectorised (--ensemble_vectorize).

  python benchmarks/ensemble_vmap.py [--out=runs/bench_ensemble] [--members=5] [--steps=300]

Writes the noisy train pairs and the clean held-out pairs as run.sh does, then runs
`jaxpref-strength` twice, each in a fresh process on one device (sequential first, then
vectorised, or --rounds times alternating), and prints each run's wall time and CPU time
(user + system of the process), the ratios, and how far the two ensembles' strengths are
apart (both paths train the same members, so only float noise should separate them).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = os.path.join(ROOT, "experiments", "repro", "label_noise", "strength.flags")


def write_data(out: str) -> tuple[str, str]:
  from jaxpref.data import synthetic
  clean, noisy = os.path.join(out, "clean"), os.path.join(out, "noisy")
  if not os.path.exists(os.path.join(noisy, "train.jsonl")):
    assert synthetic.main(["bt", f"--out_dir={clean}", "--n_train=1000", "--n_eval=500",
                           "--seed=0"]) == 0
    assert synthetic.main(["bt", f"--out_dir={noisy}", "--n_train=1000", "--n_eval=0",
                           "--seed=0", "--flip_rate=0.25"]) == 0
  return os.path.join(noisy, "train.jsonl"), os.path.join(clean, "eval.jsonl")


def run(workdir: str, train: str, eval_: str, args, vectorize: bool) -> dict:
  shutil.rmtree(workdir, ignore_errors=True)  # a fresh ensemble, nothing reused
  cmd = [sys.executable, "-m", "jaxpref.eval.strength", f"--flagfile={FLAGS}",
         f"--workdir={workdir}", f"--train_data={train}", f"--eval_data={eval_}",
         f"--ensemble_size={args.members}", f"--steps={args.steps}", "--noprogress",
         "--ensemble_vectorize" if vectorize else "--noensemble_vectorize"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user's
  env.setdefault("JAX_PLATFORMS", "cpu")
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode:
    sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  with open(os.path.join(workdir, "strength.jsonl")) as f:
    mu = np.array([json.loads(line)["strength_mean"] for line in f])
  found = [line for line in proc.stdout.splitlines() if "ground truth" in line]
  return {"wall": wall, "cpu": cpu, "mu": mu, "detector": found[-1] if found else ""}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_ensemble"))
  parser.add_argument("--members", type=int, default=5)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--rounds", type=int, default=1)
  args = parser.parse_args()
  train, eval_ = write_data(args.out)
  print(f"cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; {args.members} "
        f"members x {args.steps} steps; {FLAGS}")
  runs = {"sequential": [], "vectorised": []}
  for _ in range(args.rounds):
    for name in runs:
      r = run(os.path.join(args.out, name), train, eval_, args, name == "vectorised")
      runs[name].append(r)
      print(f"{name:>10}: wall {r['wall']:7.1f} s, CPU {r['cpu']:7.1f} s (load average "
            f"{os.getloadavg()[0]:.1f}); {r['detector']}", flush=True)
  best = {k: (min(r["wall"] for r in v), min(r["cpu"] for r in v)) for k, v in runs.items()}
  (sw, sc), (vw, vc) = best["sequential"], best["vectorised"]
  mu_s, mu_v = runs["sequential"][-1]["mu"], runs["vectorised"][-1]["mu"]
  diff = np.abs(mu_s - mu_v)
  print(f"sequential / vectorised: wall {sw:.1f} / {vw:.1f} s = {sw / vw:.2f}x, CPU "
        f"{sc:.1f} / {vc:.1f} s = {sc / vc:.2f}x (best of {args.rounds})")
  print(f"strength_mean, sequential vs vectorised: max |diff| {diff.max():.2e}, mean "
        f"{diff.mean():.2e}; same sign on {np.mean(np.sign(mu_s) == np.sign(mu_v)):.1%} of pairs")


if __name__ == "__main__":
  main()
