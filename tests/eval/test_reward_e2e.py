"""`--role=reward` end to end as a user runs it: train on the tiny data from the CLI, then
score a RewardBench-layout file with `jaxpref-eval`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cli_util import ROOT, env, metrics, train

TINY_FLAGS = os.path.join(ROOT, "experiments", "tiny.flags")
RUN = ("--role=reward", "--loss=bt", "--loss.center_rewards=0.01", "--steps=6", "--log_every=2",
       "--eval_every=3", "--checkpoint_every=6", "--eval_batch_size=100")
SUBSETS = ("alpacaeval-easy", "mt-bench-hard", "math-prm", "hep-go", "hep-rust", "my-subset")


def jaxpref_eval(*args):
  return subprocess.run([sys.executable, "-m", "jaxpref.eval.reward_eval", *args], cwd=ROOT,
                        env=env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reward") / "bt")
  train(workdir, *RUN, flagfile=TINY_FLAGS)
  return workdir


@pytest.mark.slow
def test_reward_role_writes_its_metrics(reward_run):
  for name in ("flags.txt", "metrics.jsonl", "metrics.png", "final_metrics.json"):
    assert os.path.getsize(os.path.join(reward_run, name)) > 0, name
  assert "6" in os.listdir(os.path.join(reward_run, "checkpoints"))
  train_rows, eval_rows = metrics(reward_run, "train"), metrics(reward_run, "eval")
  assert [r["step"] for r in train_rows] == [2, 4, 6]
  assert [r["step"] for r in eval_rows] == [0, 3, 6]
  for row in (train_rows[-1], eval_rows[-1]):
    for key in ("loss", "loss/center", "rewards/accuracy", "rewards/margin", "rewards/ece",
                "rewards/mean", "rewards/std", "rewards/chosen", "rewards/rejected"):
      assert np.isfinite(row[key]), key
    assert not any(k.startswith("calib/") or k == "rewards/sq_mean" for k in row)
    assert 0 <= row["rewards/ece"] <= 1 and row["rewards/std"] >= 0
  assert "grad_norm" in train_rows[-1] and "logps/chosen" not in train_rows[-1]
  assert "--role=reward" in open(os.path.join(reward_run, "flags.txt")).read()


@pytest.mark.slow
def test_jaxpref_eval_scores_subsets_and_matches_the_run(reward_run, tmp_path):
  bench = tmp_path / "bench.jsonl"
  with open(os.path.join(ROOT, "jaxpref", "data", "tiny", "eval.jsonl")) as f, open(bench, "w") as out:
    for i, line in enumerate(f):
      out.write(json.dumps({**json.loads(line), "subset": SUBSETS[i % len(SUBSETS)]}) + "\n")
  proc = jaxpref_eval(f"--workdir={reward_run}", f"--data={bench}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "average over 4 categories" in proc.stdout and "my-subset" in proc.stdout
  res = json.load(open(os.path.join(reward_run, "eval_results.json")))
  assert res["step"] == 6 and res["n_pairs"] == 300
  assert set(res["categories"]) == {"chat", "chat_hard", "reasoning", "my-subset"}
  # Every pair once: the pooled accuracy is the run's own final eval accuracy.
  pooled = sum(v["accuracy"] * v["n"] for v in res["subsets"].values()) / 300
  assert pooled == pytest.approx(metrics(reward_run, "eval")[-1]["rewards/accuracy"], abs=1e-6)
  # Reasoning: math-prm weighs as much as the hep-* subsets together.
  s = res["subsets"]
  want = 0.5 * s["math-prm"]["accuracy"] + 0.25 * (s["hep-go"]["accuracy"] + s["hep-rust"]["accuracy"])
  assert res["categories"]["reasoning"]["accuracy"] == pytest.approx(want)
  assert res["average"] == pytest.approx(np.mean([c["accuracy"] for c in res["categories"].values()]))


@pytest.mark.slow
def test_jaxpref_eval_errors_name_the_problem(reward_run, tmp_path):
  bench = tmp_path / "bad.jsonl"
  bench.write_text('{"prompt": "a", "chosen": "b", "rejected": "c", "subset": "x"}\n\n'
                   '{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
  proc = jaxpref_eval(f"--workdir={reward_run}", f"--data={bench}")
  assert proc.returncode == 1 and f"{bench}:3: field 'subset'" in proc.stderr
  proc = jaxpref_eval(f"--workdir={tmp_path}", f"--data={bench}")
  assert proc.returncode == 1 and "flags.txt: no such file" in proc.stderr
