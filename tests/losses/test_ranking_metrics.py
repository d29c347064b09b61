"""Ranking metrics (docs/losses.md#ranking-metrics) against hand-computed values and the flip-threshold identity on a tabular policy."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

import pytest

from jaxpref import losses
from jaxpref.eval import ranking
from jaxpref.types import Logps


def test_ranking_vs_reward_accuracy_differ():
  # The policy moved toward y_w (reward accuracy 1) but still prefers y_l (ranking 0).
  s_w, s_l = jnp.array([-10.0]), jnp.array([-5.0])
  ref_w, ref_l = jnp.array([-20.0]), jnp.array([-5.0])
  assert float(ranking.reward_accuracy(s_w - ref_w, s_l - ref_l)) == 1.0
  assert float(ranking.ranking_accuracy(s_w, s_l)) == 0.0


def test_ranking_accuracy_with_ties():
  s_w = jnp.log(jnp.array([0.30, 0.30, 0.30, 0.10]))
  s_l = jnp.log(jnp.array([0.305, 0.20, 0.20, 0.20]))
  alpha = jnp.array([0.5, 0.5, 0.75, 0.25])
  # tie within 0.01: right; 0.1 apart at alpha 0.5: wrong; majority y_w and pi agrees: right;
  # majority y_l and pi(y_w) < pi(y_l): right.
  np.testing.assert_allclose(ranking.ranking_accuracy(s_w, s_l, alpha), 0.75)


def test_idealized_ranking_accuracy_by_hand():
  ref_w = jnp.array([-5.0, -5.0, -5.0])
  ref_l = jnp.array([-4.0, -4.0, -1.0])
  alpha = jnp.array([1.0, 0.5, 0.75])
  # beta=0.1: logits -1 + 10 log(999) > 0; -1 + 0 < 0; -4 + 10 log 3 > 0.
  np.testing.assert_allclose(ranking.idealized_ranking_accuracy(ref_w, ref_l, alpha, 0.1), 2 / 3)
  # beta=10: -1 + 0.1 log 999 = -0.31 < 0; -1 < 0; -4 + 0.11 < 0.
  np.testing.assert_allclose(ranking.idealized_ranking_accuracy(ref_w, ref_l, alpha, 10.0), 0.0)


@pytest.mark.slow  # over 10 s on 2 cores: kept out of the fast tier
def test_flip_threshold_on_a_tabular_policy():
  """Gradient descent on DPO over a tabular policy: the pair's ranking flips exactly when the
  loss crosses -logsig(beta c) (Thm 4.1 of Chen et al.)."""
  rng = np.random.default_rng(0)
  beta = 0.5
  ref_logits = jnp.asarray(rng.normal(size=8), jnp.float32)
  ref_logits = ref_logits.at[1].set(ref_logits[0] + 3.0)  # reference prefers y_l = 1 strongly
  ref = jax.nn.log_softmax(ref_logits)
  threshold = float(ranking.dpo_flip_threshold(ref[0], ref[1], beta))

  def loss(theta):
    pol = jax.nn.log_softmax(theta)
    lp = Logps(policy=pol[None, :2], ref=ref[None, :2], length=jnp.ones((1, 2)),
               valid=jnp.ones((1, 2), bool), weight=jnp.ones(1))
    return losses.get("dpo")(lp, beta=beta)[0]

  theta, seen = ref_logits, set()
  for _ in range(400):
    pol = jax.nn.log_softmax(theta)
    ranked = bool(pol[0] >= pol[1])
    below = float(loss(theta)) <= threshold + 1e-6
    assert ranked == below
    seen.add(ranked)
    theta = theta - 0.5 * jax.grad(loss)(theta)
  assert seen == {False, True}  # it started mis-ranked and flipped


def test_kendall_tau():
  true = jnp.array([[4.0, 3.0, 2.0, 1.0]] * 3)
  pred = jnp.array([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 1.0, 2.0]])
  np.testing.assert_allclose(ranking.kendall_tau(pred, true), [1.0, -1.0, 4 / 6])
  valid = jnp.array([[True, True, False, False]] * 3)
  np.testing.assert_allclose(ranking.kendall_tau(pred, true, valid), [1.0, -1.0, 1.0])
  # Brute force over all pairs for a random list.
  rng = np.random.default_rng(1)
  p, t = rng.normal(size=6), rng.normal(size=6)
  want = np.mean([np.sign(p[i] - p[j]) * np.sign(t[i] - t[j])
                  for i, j in itertools.combinations(range(6), 2)])
  np.testing.assert_allclose(ranking.kendall_tau(jnp.asarray(p)[None], jnp.asarray(t)[None]), [want], rtol=1e-6)
