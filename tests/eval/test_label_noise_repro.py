"""A shortened experiments/repro/label_noise, through its own flag files: on Bradley-Terry
pairs with 25% of the labels flipped, an ensemble's preference strength finds the flipped
pairs, and the strength-driven losses train on it (docs/reward_models.md#toy-reproduction-label-noise-and-preference-strength)."""

import json
import os
import subprocess
import sys

import pytest

from cli_util import ROOT, env, train
from jaxpref.data import synthetic

REPRO = os.path.join(ROOT, "experiments", "repro", "label_noise")
sys.path.insert(0, REPRO)
import table  # noqa: E402  (the repro's own table script)

STEPS = 150
SHORT = (f"--steps={STEPS}", f"--eval_every={STEPS}", f"--checkpoint_every={STEPS}",
         "--noprogress")


@pytest.mark.slow
def test_strength_finds_flipped_labels_and_drives_the_remedies(tmp_path):
  out = tmp_path / "label_noise"
  assert synthetic.main(["bt", f"--out_dir={out}/clean", "--n_train=600", "--n_eval=300"]) == 0
  assert synthetic.main(["bt", f"--out_dir={out}/noisy", "--n_train=600", "--n_eval=0",
                         "--flip_rate=0.25"]) == 0
  data = (f"--eval_data={out}/clean/eval.jsonl",)
  proc = subprocess.run(
      [sys.executable, "-m", "jaxpref.eval.strength", f"--flagfile={REPRO}/strength.flags",
       f"--workdir={out}/ensemble", f"--train_data={out}/noisy/train.jsonl",
       "--ensemble_size=3", *data, *SHORT],
      cwd=ROOT, env=env(), capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name, train_file in (("clean", f"{out}/clean/train.jsonl"),
                           ("noisy", f"{out}/noisy/train.jsonl"),
                           ("flip", f"{out}/ensemble/strength.jsonl"),
                           ("margin", f"{out}/ensemble/strength.jsonl")):
    train(str(out / f"{name}_run"), f"--train_data={train_file}", *data, *SHORT,
          flagfile=os.path.join(REPRO, f"{name}.flags"))
  res = table.results(str(out))
  acc = res["accuracy"]
  # A random guess of 25% flips has precision 0.25; the ensemble does far better.
  assert res["precision"] >= 0.5 and res["recall"] >= 0.5, res
  # The flip run really trained on flipped pairs (its train metric counts them).
  rows = [json.loads(line) for line in open(out / "flip_run" / "metrics.jsonl")]
  flipped = [r["rewards/flipped"] for r in rows if r["split"] == "train"]
  assert 0.1 <= flipped[-1] <= 0.5, flipped
  assert acc["clean"] >= acc["noisy"], acc
  assert all(0.5 < a <= 1.0 for a in acc.values()), acc
  assert "| bt_flip by ensemble strength |" in table.table(res)
