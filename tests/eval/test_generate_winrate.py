"""`jaxpref-generate` (samples through the rollout path) and `jaxpref-winrate` (win rate
under a reward or a position-swapped pairwise judge, with a bootstrap interval)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from cli_util import ROOT, env
from jaxpref.data import make_tiny
from jaxpref.eval import win_rate

TINY = make_tiny.OUT


def rows(*pairs):
  return [{"prompt": p, "responses": list(r)} for p, r in pairs]


def test_reward_outcomes_count_ties_half():
  a = rows(("p1", ["x", "yy"]), ("p2", ["zzz", "w"]))
  b = rows(("p1", ["xx", "yy"]), ("p2", ["z", "w"]))
  length = lambda prompts, responses: [[len(r) for r in g] for g in responses]
  # p1: x < xx (0), yy = yy (0.5); p2: zzz > z (1), w = w (0.5)
  np.testing.assert_array_equal(win_rate.outcomes(a, b, reward=length), [0.25, 0.75])


def test_a_position_biased_judge_gains_nothing():
  a, b = rows(("p", ["good"])), rows(("p", ["bad"]))
  first_wins = lambda prompt, x, y: 1.0
  assert win_rate.outcomes(a, b, judge=first_wins)[0] == 0.5
  fair = lambda prompt, x, y: 1.0 if x == "good" else 0.0
  assert win_rate.outcomes(a, b, judge=fair)[0] == 1.0


def test_mismatched_prompts_are_refused():
  with pytest.raises(ValueError, match="same prompts"):
    win_rate.outcomes(rows(("p", ["a"])), rows(("q", ["b"])), reward=lambda p, r: r)


def test_bootstrap_interval_brackets_the_mean_and_is_seeded():
  x = np.random.default_rng(1).uniform(size=40)
  lo, hi = win_rate.bootstrap(x, 2000)
  assert lo < x.mean() < hi and 0 <= lo and hi <= 1
  assert (lo, hi) == win_rate.bootstrap(x, 2000)
  assert hi - lo < 0.3


def test_generate_then_win_rate_from_the_cli(tmp_path):
  out = tmp_path / "samples.jsonl"
  gen = subprocess.run(
      [sys.executable, "-m", "jaxpref.eval.generate", "--flagfile=experiments/tiny.flags",
       f"--prompts={TINY}/prompts_eval.jsonl", f"--samples_out={out}",
       "--online.num_generations=2", "--online.max_new_tokens=4", "--online.temperature=1"],
      cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
  assert gen.returncode == 0, gen.stderr[-2000:]
  samples = [json.loads(line) for line in open(out)]
  assert len(samples) == 8 and all(len(s["responses"]) == 2 for s in samples)
  assert all(len(s["finished"]) == 2 for s in samples)
  win = subprocess.run(
      [sys.executable, "-m", "jaxpref.eval.win_rate", f"--samples_a={out}",
       f"--samples_b={out}", f"--reward_fn={ROOT}/tests/online_rewards.py:length",
       f"--winrate_out={tmp_path / 'w'}"],
      cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
  assert win.returncode == 0, win.stderr[-2000:]
  result = json.load(open(tmp_path / "w" / "win_rate.json"))
  assert result["win_rate"] == 0.5 and result["prompts"] == 8  # a file against itself
  assert (tmp_path / "w" / "win_rate.png").stat().st_size > 0
