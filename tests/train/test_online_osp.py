"""OSP online (the policy ranks its own samples): --online.pairs=ranked pairs each group's
responses i and i + K/2 by score, and --online.judge_model=policy makes the judge the
weights that sampled the rollout."""

import numpy as np
import pytest

from jaxpref.train import loop
from jaxpref.train.online import pair_rule
from jaxpref.types import GroupBatch

from test_online import config, rows


def test_ranked_pairs_pair_i_with_i_plus_half_and_drop_ties():
  t = np.arange(2 * 4 * 3).reshape(2, 4, 3)
  valid = np.array([[True] * 4, [True, True, True, False]])
  batch = GroupBatch(tokens=t, loss_mask=t * 1.0, segment_ids=t, valid=valid,
                     weight=np.ones(2, np.float32),
                     scores=np.array([[0.1, 0.9, 0.5, 0.3], [0.5, 0.2, 0.5, 0.9]], np.float32))
  pairs = pair_rule(batch, "ranked")
  assert pairs.tokens.shape == (4, 2, 3)
  # Group 0 sorted: 1 (0.9), 2 (0.5), 3 (0.3), 0 (0.1) -> pairs (1, 3) and (2, 0).
  np.testing.assert_array_equal(pairs.tokens[0], t[0, [1, 3]])
  np.testing.assert_array_equal(pairs.tokens[1], t[0, [2, 0]])
  # Group 1 (member 3 invalid): 0 (0.5), 2 (0.5), 1 (0.2), 3 -> (0, 1) and (2, 3).
  np.testing.assert_array_equal(pairs.scores[2], np.float32([0.5, 0.2]))
  np.testing.assert_array_equal(pairs.tokens[3], t[1, [2, 3]])
  np.testing.assert_array_equal(pairs.weight, [1.0, 1.0, 1.0, 0.0])  # the invalid member's
  tie = GroupBatch(tokens=t[:1], loss_mask=t[:1] * 1.0, segment_ids=t[:1],
                   valid=np.ones((1, 4), bool), weight=np.ones(1, np.float32),
                   scores=np.array([[0.5, 0.2, 0.5, 0.5]], np.float32))
  # Sorted 0, 2, 3 (all 0.5), 1 (0.2): (0, 3) ties -> weight 0; (2, 1) -> 1.
  np.testing.assert_array_equal(pair_rule(tie, "ranked").weight, [0.0, 1.0])
  with pytest.raises(ValueError, match="--online.pairs must be"):
    pair_rule(batch, "all")


@pytest.mark.slow  # two sampler programs and the judge compile (~20 s)
def test_osp_self_judging_run_trains_on_ranked_pairs(tmp_path):
  """The held-out samples are scored by --online.eval_reward (the length function here),
  the training rollouts by the self-judge."""
  final = loop.run(config(tmp_path / "osp", loss="osp", steps=2, reward="judge",
                          judge_model="policy", judge_labels="a,i", pairs="ranked",
                          eval_reward="fn"))
  train = rows(tmp_path / "osp")
  assert len(train) == 2 and all(np.isfinite(r["loss"]) for r in train)
  # Win rates of a judge that sees both orders average 1/2 over full groups.
  assert all(r["reward/mean"] == pytest.approx(0.5, abs=1e-6) for r in train)
  assert "rewards/accuracy" in train[0]
  evals = rows(tmp_path / "osp", "eval")
  # The length reward of greedy held-out samples (chars / 10), not the judge's 1/2.
  assert evals and all(r["reward/mean"] > 0 and abs(r["reward/mean"] - 0.5) > 1e-3
                       for r in evals)
  assert final["reward/mean"] == evals[-1]["reward/mean"]


def test_ranked_pairs_are_checked_at_start_up(tmp_path):
  with pytest.raises(ValueError, match="needs an even --online.num_generations"):
    loop.run(config(tmp_path / "odd", loss="osp", num_generations=3, pairs="ranked"))
  with pytest.raises(ValueError, match="a pairwise --loss"):
    loop.run(config(tmp_path / "pg", loss="grpo", pairs="ranked"))
