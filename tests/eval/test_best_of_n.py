"""Best-of-N reranking (`jaxpref-eval --best_of_n`): picks, ground-truth metrics, errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cli_util import ROOT, env, train
from jaxpref.eval import best_of_n

TINY_FLAGS = os.path.join(ROOT, "experiments", "tiny.flags")


def test_pick_argmax_accuracy_and_regret():
  objs = [{"prompt": "p", "candidates": ["a", "b", "c"], "scores": [1.0, 3.0, 2.0]},
          {"prompt": "q", "candidates": ["d", "e"], "best": 0},
          {"prompt": "r", "candidates": ["f", "g"], "scores": [0.0, 5.0], "best": 1},
          {"prompt": "s", "candidates": ["h"]}]
  rewards = [np.array([0.1, 0.2, 0.9]), np.array([2.0, -1.0]), np.array([0.0, 0.0]),
             np.array([7.0])]
  out, res = best_of_n.pick(objs, rewards)
  assert [o["picked_index"] for o in out] == [2, 0, 0, 0]  # first index on a tie
  assert out[0]["picked"] == "c" and out[0]["scores"] == [1.0, 3.0, 2.0]
  # Truth: record 0 by top score (wrong), 1 by best (right), 2 by best (wrong); 3 has none.
  assert res["n_with_truth"] == 3 and res["accuracy"] == pytest.approx(1 / 3)
  # Regret over the two records with scores: (3 - 2) and (5 - 0).
  assert res["regret"] == pytest.approx(3.0)
  assert res["picked_score"] == pytest.approx(1.0) and res["oracle_score"] == pytest.approx(4.0)
  assert res["mean_score"] == pytest.approx((2.0 + 2.5) / 2)
  assert "mean regret 3.0000" in best_of_n.format_summary(res)


def test_pick_without_truth_reports_no_accuracy():
  _, res = best_of_n.pick([{"prompt": "p", "candidates": ["a", "b"]}], [np.array([0.0, 1.0])])
  assert "accuracy" not in res and "regret" not in res and res["n_candidates"] == 2


@pytest.mark.parametrize("record, message", [
    ({"candidates": ["a"]}, "field 'prompt'"),
    ({"prompt": "p", "candidates": []}, "field 'candidates'"),
    ({"prompt": "p", "candidates": ["a", ""]}, "field 'candidates'"),
    ({"prompt": "p", "candidates": ["a", "b"], "scores": [1.0]}, "list of 2 finite numbers"),
    ({"prompt": "p", "candidates": ["a", "b"], "best": 2}, r"index in \[0, 2\)"),
    ({"prompt": "p", "candidates": ["a", "b"], "best": True}, "field 'best'"),
])
def test_bad_records_name_file_line_and_field(tmp_path, record, message):
  path = tmp_path / "c.jsonl"
  ok = {"prompt": "ok", "candidates": ["x"]}
  path.write_text(json.dumps(ok) + "\n" + json.dumps(record) + "\n")
  with pytest.raises(ValueError, match=message) as e:
    best_of_n.read_candidates(str(path))
  assert f"{path}:2" in str(e.value)


@pytest.mark.slow
def test_jaxpref_eval_best_of_n_end_to_end(tmp_path):
  workdir = str(tmp_path / "rm")
  train(workdir, "--role=reward", "--loss=bt", "--steps=4", "--log_every=2", "--eval_every=4",
        "--checkpoint_every=4", "--eval_batch_size=8", "--noplot", flagfile=TINY_FLAGS)
  cands = tmp_path / "cands.jsonl"
  recs = [{"prompt": "name a fruit.", "candidates": ["banana.", "rowing.", "my answer is drum."],
           "scores": [2.0, 0.0, 1.0]},
          # The same candidates in another order and group size: position must not matter.
          {"prompt": "name a fruit.", "candidates": ["my answer is drum.", "banana."], "best": 1},
          {"prompt": "name a fruit.", "candidates": ["rowing."]}]
  cands.write_text("".join(json.dumps(r) + "\n" for r in recs))
  out = tmp_path / "picked.jsonl"
  proc = subprocess.run([sys.executable, "-m", "jaxpref.eval.reward_eval", f"--workdir={workdir}",
                         f"--best_of_n={cands}", f"--best_of_n_out={out}"], cwd=ROOT, env=env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "best-of-N over 3 prompts (6 candidates)" in proc.stdout
  picked = [json.loads(line) for line in open(out)]
  assert len(picked) == 3
  r0, r1, r2 = (np.array(p["candidate_rewards"]) for p in picked)
  np.testing.assert_allclose([r1[1], r1[0]], [r0[0], r0[2]], rtol=1e-5, atol=1e-6)
  assert r2[0] == pytest.approx(r0[1], rel=1e-5, abs=1e-6)
  for p in picked:
    assert p["picked_index"] == int(np.argmax(p["candidate_rewards"]))
    assert p["picked"] == p["candidates"][p["picked_index"]]
  assert "picked the best in" in proc.stdout and "mean regret" in proc.stdout
