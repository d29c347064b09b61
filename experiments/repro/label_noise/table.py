"""The label-noise reproduction's table from its output folder (run.sh's last step).

  python experiments/repro/label_noise/table.py runs/label_noise
"""

import json
import os
import sys

import numpy as np

RUNS = (("clean", "BT on clean labels"), ("noisy", "BT on 25% flipped labels"),
        ("flip", "bt_flip by ensemble strength"), ("margin", "bt_adaptive_margin by strength"))


def results(out: str) -> dict:
  """Held-out accuracy per run and the ensemble's flip detection."""
  acc = {}
  for name, _ in RUNS:
    with open(os.path.join(out, f"{name}_run", "final_metrics.json")) as f:
      acc[name] = json.load(f)["rewards/accuracy"]
  with open(os.path.join(out, "ensemble", "strength.jsonl")) as f:
    recs = [json.loads(line) for line in f if line.strip()]
  mu = np.array([r["strength_mean"] for r in recs])
  flipped = np.array([r["flipped"] for r in recs], bool)
  neg = mu < 0
  return {"accuracy": acc, "n_pairs": len(recs), "n_flipped": int(flipped.sum()),
          "precision": float((neg & flipped).sum() / max(neg.sum(), 1)),
          "recall": float((neg & flipped).sum() / max(flipped.sum(), 1))}


def table(res: dict) -> str:
  lines = ["| run | held-out accuracy (clean labels) |", "|---|---|"]
  lines += [f"| {label} | {res['accuracy'][name]:.3f} |" for name, label in RUNS]
  lines += ["", f"Ensemble strength < 0 as a flip detector on the {res['n_pairs']} noisy train "
            f"pairs ({res['n_flipped']} truly flipped): precision {res['precision']:.3f}, "
            f"recall {res['recall']:.3f}"]
  return "\n".join(lines)


if __name__ == "__main__":
  print(table(results(sys.argv[1] if len(sys.argv) > 1 else "runs/label_noise")))
