"""The papers' properties of `wpo` (Weighted Preference Optimization) and `mcts_dpo`
(visit-count label smoothing). Values against the float64 references of
tests/loss_refs.py are in tests/losses/test_losses.py (PAIRWISE, SCORED)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import loss_refs as R
from jaxpref import losses
from jaxpref.losses.weighted import visit_count_flip_rate, weighted_dpo, wpo_weight
from jaxpref.types import Logps
from test_losses import make_lp, pair_inputs


def WPO(lp, **kw):
  """`wpo` without the weight alignment (whose tests give `Logps.prob_sq` explicitly)."""
  return losses.get("wpo")(lp, **{"align": False, **kw})


def replace(lp, **fields):
  return Logps(**{**lp.__dict__, **fields})


# ---- wpo -------------------------------------------------------------------------------

def test_wpo_weight_is_the_product_of_length_normalised_probabilities():
  policy, ref, length, weight = pair_inputs(30, spread=3.0)
  w = np.asarray(wpo_weight(make_lp(policy, ref, length, weight)))
  want = np.exp(policy[:, 0] / length[:, 0]) * np.exp(policy[:, 1] / length[:, 1])
  np.testing.assert_allclose(w, want, rtol=1e-5)
  assert (w > 0).all() and (w <= 1).all()


def test_wpo_gradient_treats_the_weight_as_a_constant():
  policy, ref, length, weight = pair_inputs(31, b=6, spread=2.0)
  with jax.enable_x64(True):
    lp = make_lp(policy, ref, length, weight, dtype=jnp.float64)
    w0 = wpo_weight(lp)
    frozen = lambda p: weighted_dpo(replace(lp, policy=p), w0, 0.5, 0.1)[0]
    check_grads(frozen, (lp.policy,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
    got = jax.grad(lambda p: WPO(replace(lp, policy=p), beta=0.5,
                                               label_smoothing=0.1)[0])(lp.policy)
    np.testing.assert_allclose(got, jax.grad(frozen)(lp.policy), rtol=1e-10, atol=1e-14)
    # Per pair: w times DPO's gradient (the value of w moves, its gradient is not taken).
    one = make_lp([[-2.0, -3.0]], [[-2.5, -2.5]], [[2.0, 4.0]], [1.0], dtype=jnp.float64)
    g_wpo = jax.grad(lambda p: WPO(replace(one, policy=p), beta=0.5)[0])(one.policy)
    g_dpo = jax.grad(lambda p: losses.get("dpo")(replace(one, policy=p), beta=0.5)[0])(one.policy)
    np.testing.assert_allclose(g_wpo, np.exp(-1.0 - 0.75) * g_dpo, rtol=1e-12)


def test_wpo_weights_pairs_by_policy_likelihood_not_by_margin():
  # Shifting S_pol and S_ref of both responses by the same delta keeps h (DPO's loss) and
  # moves the weight by exp(delta/L_w + delta/L_l).
  policy, ref, length, weight = pair_inputs(32, spread=2.0)
  lp = make_lp(policy, ref, length, weight)
  shifted = make_lp(policy - 3.0, ref - 3.0, length, weight)
  dpo = losses.get("dpo")
  np.testing.assert_allclose(dpo(lp, beta=0.01)[0], dpo(shifted, beta=0.01)[0], rtol=1e-6)
  w, w_shift = np.asarray(wpo_weight(lp)), np.asarray(wpo_weight(shifted))
  np.testing.assert_allclose(w_shift / w, np.exp(-3.0 / length[:, 0] - 3.0 / length[:, 1]), rtol=1e-4)
  assert float(WPO(shifted)[0]) < float(WPO(lp)[0])


def test_wpo_on_certain_pairs_is_dpo():
  # A policy that puts probability 1 on both responses weighs the pair fully.
  policy, ref, length, weight = pair_inputs(33)
  certain = make_lp(np.full_like(policy, -1e-7), ref, length, weight)
  np.testing.assert_allclose(WPO(certain, beta=0.3)[0],
                             losses.get("dpo")(certain, beta=0.3)[0], rtol=1e-5)
  assert float(WPO(certain)[1]["wpo/weight"]) == pytest.approx(1.0, abs=1e-5)


def test_wpo_stays_finite_at_extreme_log_probs():
  lp = make_lp([[-4000.0, -1e-6], [-1e-6, -3000.0]], [[-10.0, -200.0], [-300.0, -1.0]],
               [[1.0, 1.0], [1.0, 2.0]], [1.0, 1.0])
  loss, metrics = WPO(lp, beta=1.0)
  grads = jax.grad(lambda p: WPO(replace(lp, policy=p), beta=1.0)[0])(lp.policy)
  assert np.isfinite(float(loss)) and np.isfinite(np.asarray(grads)).all()
  assert float(metrics["wpo/weight"]) == 0.0  # both pairs are unreachable for this policy


def test_wpo_reads_per_pair_label_smoothing_from_the_records():
  policy, ref, length, weight = pair_inputs(34, spread=3.0)
  eps = np.random.default_rng(34).uniform(0, 0.4, len(weight))
  lp = replace(make_lp(policy, ref, length, weight), label_smoothing=jnp.asarray(eps, jnp.float32))
  want = R.wmean(np.minimum(np.exp(policy[:, 0] / length[:, 0] + policy[:, 1] / length[:, 1]), 1)
                 * (-(1 - eps) * R.logsig(0.01 * R.h_of(policy, ref))
                    - eps * R.logsig(-0.01 * R.h_of(policy, ref))), weight)
  np.testing.assert_allclose(float(WPO(lp, label_smoothing=0.3)[0]), want, rtol=1e-4)


def aligned_inputs(seed):
  policy, ref, length, weight = pair_inputs(seed, spread=3.0)
  # Per token, log sum_v pi(v)^2 lies in [-log V, 0]; here between -3 and 0.
  prob_sq = -np.random.default_rng(seed).uniform(0, 3, policy.shape) * length
  return policy, ref, length, weight, prob_sq


@pytest.mark.parametrize("hp", [{}, {"beta": 0.5, "label_smoothing": 0.1}])
def test_wpo_aligned_weight_matches_float64_reference(hp):
  policy, ref, length, weight, prob_sq = aligned_inputs(35)
  lp = replace(make_lp(policy, ref, length, weight), prob_sq=jnp.asarray(prob_sq, jnp.float32))
  loss, metrics = jax.jit(lambda l: losses.get("wpo")(l, **hp))(lp)
  np.testing.assert_allclose(float(loss), R.wpo(policy, ref, length, weight, prob_sq=prob_sq, **hp),
                             rtol=2e-4, atol=1e-6)
  # Alignment divides each token's probability by sum_v pi^2 <= 1: weights only grow.
  assert float(metrics["wpo/weight"]) >= float(WPO(lp, **hp)[1]["wpo/weight"])


def test_wpo_aligned_weight_is_one_for_a_pair_the_policy_samples_like_its_own():
  # A uniform policy over V tokens: pi(y_t) = 1/V = sum_v pi(v)^2, so the aligned weight is 1
  # however long the responses, where the plain one is V^-(2) per pair.
  length = np.array([[3.0, 7.0], [1.0, 20.0]])
  logv = np.log(32000.0)
  lp = replace(make_lp(-logv * length, -logv * length, length, np.ones(2)),
               prob_sq=jnp.asarray(-logv * length, jnp.float32))
  w_aligned = np.asarray(wpo_weight(lp, align=True))
  np.testing.assert_allclose(w_aligned, 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(wpo_weight(lp)), np.exp(-2 * logv), rtol=1e-4)


def test_wpo_alignment_without_prob_sq_is_a_clear_error():
  policy, ref, length, weight = pair_inputs(36)
  with pytest.raises(ValueError, match="prob_sq"):
    losses.get("wpo")(make_lp(policy, ref, length, weight))
  assert losses.needs_tokens("wpo").prob_sq and not losses.needs_tokens("wpo")


def test_wpo_aligned_gradient_treats_the_weight_as_a_constant():
  policy, ref, length, weight, prob_sq = aligned_inputs(37)
  with jax.enable_x64(True):
    lp = replace(make_lp(policy, ref, length, weight, dtype=jnp.float64),
                 prob_sq=jnp.asarray(prob_sq))
    w0 = wpo_weight(lp, align=True)
    frozen = lambda p: weighted_dpo(replace(lp, policy=p), w0, 0.5, 0.0)[0]
    got = jax.grad(lambda p: losses.get("wpo")(replace(lp, policy=p), beta=0.5)[0])(lp.policy)
    np.testing.assert_allclose(got, jax.grad(frozen)(lp.policy), rtol=1e-10, atol=1e-14)
    check_grads(frozen, (lp.policy,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


# ---- mcts_dpo --------------------------------------------------------------------------

def visits(seed, b):
  rng = np.random.default_rng(seed)
  return np.stack([rng.integers(0, 64, b), rng.integers(0, 64, b)], axis=1).astype(np.float64)


def test_mcts_dpo_flip_rate_from_visit_counts():
  lp = make_lp(np.zeros((5, 2)), np.zeros((5, 2)), np.ones((5, 2)), np.ones(5),
               scores=[[30.0, 10.0], [0.0, 0.0], [0.0, 3.0], [4.0, 9.0], [5.0, -2.0]])
  # 1 - 1/(1 + N_l/max(1, N_w)), capped at 1/2; a negative count reads as 0.
  np.testing.assert_allclose(visit_count_flip_rate(lp), [0.25, 0.0, 0.5, 0.5, 0.0], rtol=1e-6)


def test_mcts_dpo_scored_matches_numpy_with_integer_visits_and_extremes():
  for spread in (3.0, 200.0):
    policy, ref, length, weight = pair_inputs(35, spread=spread)
    scores = visits(35, len(weight))
    lp = make_lp(policy, ref, length, weight, scores=scores)
    for hp in ({}, {"length_normalize": True, "length_penalty": 1.25}, {"ipo": True}):
      loss, metrics = jax.jit(losses.bind("mcts_dpo", hp))(lp)
      want = R.mcts_dpo_scored(policy, ref, length, weight, scores, **hp)
      assert np.isfinite(want) and np.isfinite(float(loss))
      np.testing.assert_allclose(float(loss), want, rtol=2e-4, atol=2e-4)


def test_mcts_dpo_gradients_with_visit_counts():
  policy, ref, length, weight = pair_inputs(36, b=6, spread=2.0)
  with jax.enable_x64(True):
    lp = make_lp(policy, ref, length, weight, scores=visits(36, 6), dtype=jnp.float64)
    for hp in ({}, {"length_normalize": True, "length_penalty": 1.25}):
      fn = losses.bind("mcts_dpo", hp)
      check_grads(lambda p: fn(replace(lp, policy=p))[0], (lp.policy,), order=1, modes=["rev"],
                  atol=1e-5, rtol=1e-5)


def test_mcts_dpo_is_minimised_where_the_model_matches_the_search_confidence():
  # cDPO with eps = N_l/(N_w + N_l) is minimised at sig(beta h) = 1 - eps = N_w/(N_w + N_l):
  # the implicit reward margin settles at log(N_w/N_l) instead of growing without bound.
  hs = jnp.linspace(-40, 40, 8001)
  pair = lambda h: make_lp([[h, 0.0]], [[0.0, 0.0]], [[1.0, 1.0]], [1.0], scores=[[12.0, 4.0]])
  vals = jax.vmap(lambda h: losses.get("mcts_dpo")(pair(h), beta=0.5)[0])(hs)
  np.testing.assert_allclose(0.5 * hs[jnp.argmin(vals)], np.log(3.0), atol=0.01)
  # A rejected sibling visited as often as the chosen teaches nothing: eps = 1/2, flat at h = 0.
  tie = lambda h: make_lp([[h, 0.0]], [[0.0, 0.0]], [[1.0, 1.0]], [1.0], scores=[[7.0, 7.0]])
  assert abs(float(jax.grad(lambda h: losses.get("mcts_dpo")(tie(h))[0])(0.0))) < 1e-7


def test_mcts_dpo_reductions():
  policy, ref, length, weight = pair_inputs(37)
  lp = make_lp(policy, ref, length, weight)
  get = lambda name, x=lp, **hp: float(losses.get(name)(x, **hp)[0])
  dpo = get("dpo", beta=0.3)
  assert get("mcts_dpo", beta=0.3) == pytest.approx(dpo, rel=1e-6)  # no visit counts
  scored = make_lp(policy, ref, length, weight, scores=visits(37, len(weight)))
  assert get("mcts_dpo", scored, beta=0.3, conservative=False) == pytest.approx(dpo, rel=1e-6)
  unvisited = make_lp(policy, ref, length, weight, scores=np.tile([5.0, 0.0], (len(weight), 1)))
  assert get("mcts_dpo", unvisited, beta=0.3) == pytest.approx(dpo, rel=1e-6)
  assert get("mcts_dpo", beta=2.0, length_normalize=True) == pytest.approx(
      get("sigmoid_norm", beta=2.0), rel=1e-6)
  assert get("mcts_dpo", beta=0.3, ipo=True) == pytest.approx(get("ipo", beta=0.3), rel=1e-6)
  # Without visit counts the records' own per-pair eps applies, as in `dpo`.
  eps = jnp.asarray(np.random.default_rng(37).uniform(0, 0.5, len(weight)), jnp.float32)
  assert get("mcts_dpo", replace(lp, label_smoothing=eps)) == pytest.approx(
      get("dpo", replace(lp, label_smoothing=eps)), rel=1e-6)


def test_mcts_dpo_ipo_minimum_and_length_penalty():
  beta, lp_exp = 0.25, 1.25
  length = (4.0, 9.0)
  target = 1 / (2 * beta)  # h at the minimum, in length-penalised log-ratios
  policy_w = target * length[0] ** lp_exp
  one = make_lp([[policy_w, 0.0]], [[0.0, 0.0]], [length], [1.0])
  f = lambda p: losses.get("mcts_dpo")(replace(one, policy=p), beta=beta, ipo=True,
                                       length_penalty=lp_exp)[0]
  assert abs(float(f(one.policy))) < 1e-8
  assert float(jnp.abs(jax.grad(f)(one.policy)).max()) < 1e-5
