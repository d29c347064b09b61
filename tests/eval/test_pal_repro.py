"""A shortened experiments/repro/pal_groups, through its own flag files and script: on user
groups hidden from the prompt, PAL's per-user mixtures beat a single BT reward for every
user, and fitting only a new user's mixture weights improves with its number of pairs
(docs/reward_models.md#pal)."""

import json
import os
import subprocess
import sys

import pytest

from cli_util import ROOT, env, train
from jaxpref.data import synthetic

REPRO = os.path.join(ROOT, "experiments", "repro", "pal_groups")
STEPS = 300


@pytest.mark.slow
def test_pal_beats_bt_per_user_and_adapts_with_few_pairs(tmp_path):
  data = tmp_path / "data"
  assert synthetic.main(["groups", "--hide_group", f"--out_dir={data}", "--n_train=3000",
                         "--n_eval=600"]) == 0
  for loss in ("bt", "pal"):
    train(str(tmp_path / loss), f"--train_data={data}/train.jsonl",
          f"--eval_data={data}/eval.jsonl", f"--steps={STEPS}", f"--eval_every={STEPS}",
          f"--checkpoint_every={STEPS}", "--noplot", flagfile=os.path.join(REPRO, f"{loss}.flags"))
  proc = subprocess.run([sys.executable, os.path.join(REPRO, "fewshot.py"), f"--pal={tmp_path}/pal",
                         f"--bt={tmp_path}/bt", f"--data={data}", "--draws=5"],
                        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.load(open(tmp_path / "pal" / "results.json"))
  assert os.path.getsize(tmp_path / "pal" / "fewshot.png") > 0
  pal, bt = res["pal_per_user"], res["bt_per_user"]
  assert set(pal) == {"0", "1", "2"}, res
  # No scalar reward orders the items for three ideal points at once: BT trails on some
  # user by far; PAL fits each user's own ordering.
  assert min(pal.values()) >= 0.85 and min(bt.values()) <= 0.75, res
  assert all(pal[u] >= bt[u] for u in pal), res
  assert res["pal_accuracy"] - res["bt_accuracy"] >= 0.1, res
  shots = {int(n): acc for n, acc in res["fewshot"].items()}
  assert shots[32] - shots[1] >= 0.05 and shots[32] > shots[0], shots
