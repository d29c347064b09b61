"""The papers' properties of `lipo` (LiPO-lambda), `spo` (preference-degree auxiliary) and
per-pair label smoothing in `dpo`. Values against the float64 references of
tests/loss_refs.py are in tests/losses/test_losses.py (LISTWISE, PAIRWISE, SCORED)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import loss_refs as R
from jaxpref import losses
from jaxpref.losses.listwise import lambda_weights
from jaxpref.types import Logps
from test_losses import list_inputs, make_lp, pair_inputs

K2_DELTA = 1.0 - 1.0 / np.log2(3.0)  # |1/D(1) - 1/D(2)|, the only discount gap of a pair


def with_policy(lp, policy):
  return Logps(**{**lp.__dict__, "policy": policy})


def with_eps(lp, eps):
  return Logps(**{**lp.__dict__, "label_smoothing": jnp.asarray(eps, jnp.float32)})


# ---- lipo ------------------------------------------------------------------------------

def test_lipo_k2_is_dpo_times_its_lambda_weight():
  policy, ref, length, weight = pair_inputs(20)
  lp = make_lp(policy, ref, length, weight)
  dpo = float(losses.get("dpo")(lp, beta=0.3)[0])
  # Graded labels (1, 0): gain gap 1.
  np.testing.assert_allclose(losses.get("lipo")(lp, beta=0.3)[0], K2_DELTA * dpo, rtol=1e-5)
  # Scores (3, 1): gain gap 2^3 - 2^1 = 6.
  scored = make_lp(policy, ref, length, weight, scores=np.tile([3.0, 1.0], (len(weight), 1)))
  np.testing.assert_allclose(losses.get("lipo")(scored, beta=0.3)[0], 6 * K2_DELTA * dpo, rtol=1e-5)


def test_lipo_is_a_lambda_weighted_ranknet():
  # One list of 3, model order (1, 0, 2) against labels (2, 1, 0): each labelled pair's
  # RankNet term (ranknet on the list cut to those two members) times its Delta.
  policy, ref = np.array([[-3.0, -1.0, -6.0]]), np.zeros((1, 3))
  lp = make_lp(policy, ref, np.ones((1, 3)), [1.0])
  tau = np.array([2.0, 1.0, 3.0])
  gain, inv_d = 2.0 ** np.array([2.0, 1.0, 0.0]) - 1, 1 / np.log2(1 + tau)

  def weighted_ranknet(p):
    total = 0.0
    for i, j in [(0, 1), (0, 2), (1, 2)]:
      keep = np.zeros((1, 3), bool)
      keep[0, [i, j]] = True
      sub = Logps(**{**lp.__dict__, "policy": p, "valid": jnp.asarray(keep)})
      delta = abs(gain[i] - gain[j]) * abs(inv_d[i] - inv_d[j])
      total = total + delta * losses.get("ranknet")(sub, beta=0.5)[0]
    return total / 3

  lipo = lambda p: losses.get("lipo")(with_policy(lp, p), beta=0.5)[0]
  p = jnp.asarray(policy, jnp.float32)
  np.testing.assert_allclose(lipo(p), weighted_ranknet(p), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(lipo)(p), jax.grad(weighted_ranknet)(p), rtol=1e-5)


def test_lambda_weights_stress_the_top_of_the_list():
  psi = jnp.array([[2.0, 1.0, 0.0]])
  delta = np.asarray(lambda_weights(psi, jnp.array([[3.0, 2.0, 1.0]]), jnp.ones((1, 3), bool)))[0]
  d = 1 / np.log2(np.array([2.0, 3.0, 4.0]))
  np.testing.assert_allclose(delta, [[0, 2 * (d[0] - d[1]), 3 * (d[0] - d[2])],
                                     [0, 0, d[1] - d[2]], [0, 0, 0]], rtol=1e-6)
  assert delta[0, 1] > delta[1, 2]  # a mistake at the top costs more than one below it


def test_lipo_pairs_come_from_the_scores_not_the_list_order():
  policy, ref, length, weight, valid, scores = list_inputs(21)
  rng = np.random.default_rng(21)
  perm = np.stack([rng.permutation(4) for _ in weight])
  take = lambda x: np.take_along_axis(x, perm, axis=1)
  all_valid = np.ones_like(valid)
  shuffled = make_lp(take(policy), take(ref), take(length), weight, all_valid, take(scores))
  got = float(losses.get("lipo")(shuffled)[0])
  np.testing.assert_allclose(got, R.lipo(take(policy), take(ref), take(length), weight, all_valid,
                                         take(scores)), rtol=2e-4)
  # Tied labels make no pair: a list whose members all score the same costs nothing.
  tied = make_lp(policy, ref, length, weight, all_valid, np.ones_like(scores))
  assert float(losses.get("lipo")(tied)[0]) == 0.0


def test_lipo_ignores_padded_members_and_orders_the_gradient():
  policy, ref, length, weight, valid, _ = list_inputs(22)
  lp = make_lp(policy, ref, length, weight, valid)
  moved = make_lp(np.where(valid, policy, policy - 1e4), ref, length, weight, valid)
  np.testing.assert_allclose(losses.get("lipo")(lp)[0], losses.get("lipo")(moved)[0], rtol=1e-6)
  g = np.asarray(jax.grad(lambda p: losses.get("lipo")(with_policy(lp, p))[0])(lp.policy))
  assert (g[~valid] == 0).all()
  real = np.asarray(weight) > 0
  n = valid.sum(1)
  assert (g[real, 0] < 0).all()  # the best member's reward rises ...
  assert (g[real, n[real] - 1] > 0).all()  # ... and the worst one's falls


def test_lipo_gradients_with_scores_match_finite_differences():
  policy, ref, length, weight, valid, scores = list_inputs(23)
  with jax.enable_x64(True):
    lp = make_lp(policy, ref, length, weight, valid, scores, dtype=jnp.float64)
    check_grads(lambda p: losses.get("lipo")(with_policy(lp, p), beta=0.5)[0], (lp.policy,),
                order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


# ---- spo -------------------------------------------------------------------------------

def test_spo_reduces_to_dpo():
  policy, ref, length, weight = pair_inputs(24)
  scores = np.random.default_rng(24).normal(0, 2, (len(weight), 2))
  dpo = float(losses.get("dpo")(make_lp(policy, ref, length, weight))[0])
  scored = make_lp(policy, ref, length, weight, scores=scores)
  np.testing.assert_allclose(losses.get("spo")(scored, degree_weight=0.0)[0], dpo, rtol=1e-6)
  np.testing.assert_allclose(losses.get("spo")(make_lp(policy, ref, length, weight))[0], dpo,
                             rtol=1e-6)


def test_spo_optimal_margin_grows_with_the_degree():
  # DPO alone pushes every margin to infinity; the degree term holds a pair's optimum near
  # its class, so more strongly preferred pairs settle at larger margins.
  zs = jnp.linspace(-5, 15, 4001)

  def argmin_margin(gap):
    def loss(z):
      lp = make_lp(jnp.stack([z, 0.0])[None], [[0.0, 0.0]], [[1.0, 1.0]], [1.0], scores=[[gap, 0.0]])
      return losses.get("spo")(with_policy(lp, lp.policy), beta=1.0, degree_weight=1.0,
                               num_degrees=4, degree_margin=2.0)[0]
    return float(zs[jnp.argmin(jax.vmap(loss)(zs))])

  optima = [argmin_margin(g) for g in (0.0, 1.0, 2.0)]
  assert optima[0] < optima[1] < optima[2] < 15.0, optima
  # Each settles just above its class centre (0, 2, 4): DPO's term adds a small push up.
  np.testing.assert_allclose(optima, [0.0, 2.0, 4.0], atol=0.5)
  # The top class is open-ended: there the degree term agrees with DPO and the margin runs off.
  assert argmin_margin(3.0) == pytest.approx(15.0)


def test_spo_gradients_with_scores_match_finite_differences():
  policy, ref, length, weight = pair_inputs(25, b=6, spread=2.0)
  scores = np.random.default_rng(25).normal(0, 2, (6, 2))
  with jax.enable_x64(True):
    lp = make_lp(policy, ref, length, weight, scores=scores, dtype=jnp.float64)
    check_grads(lambda p: losses.get("spo")(with_policy(lp, p), degree_weight=1.0)[0],
                (lp.policy,), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_spo_needs_two_degrees():
  lp = make_lp([[0.0, 0.0]], [[0.0, 0.0]], [[1.0, 1.0]], [1.0], scores=[[1.0, 0.0]])
  with pytest.raises(ValueError, match="num_degrees"):
    losses.get("spo")(lp, num_degrees=1)


# ---- per-pair label smoothing ----------------------------------------------------------

def test_per_pair_label_smoothing_matches_numpy():
  policy, ref, length, weight = pair_inputs(26, spread=20.0)
  eps = np.random.default_rng(26).uniform(0.0, 0.5, len(weight))
  lp = with_eps(make_lp(policy, ref, length, weight), eps)
  got = jax.jit(losses.bind("dpo", {"beta": 0.2, "label_smoothing": 0.4}))(lp)[0]
  # The per-pair values replace the scalar 0.4 entirely.
  np.testing.assert_allclose(got, R.dpo(policy, ref, length, weight, beta=0.2, label_smoothing=eps),
                             rtol=2e-4, atol=2e-4)


def test_equal_per_pair_values_are_scalar_smoothing_and_zero_is_dpo():
  policy, ref, length, weight = pair_inputs(27)
  lp = make_lp(policy, ref, length, weight)
  b = len(weight)
  scalar = losses.get("dpo")(lp, label_smoothing=0.2)[0]
  np.testing.assert_allclose(losses.get("dpo")(with_eps(lp, np.full(b, 0.2)))[0], scalar, rtol=1e-6)
  np.testing.assert_allclose(losses.get("dpo")(with_eps(lp, np.zeros(b)), label_smoothing=0.3)[0],
                             losses.get("dpo")(lp)[0], rtol=1e-6)


def test_each_pair_settles_at_its_own_flip_rate():
  # cDPO's optimum beta h = log((1 - eps) / eps), now per pair; the gradient's sign flips there.
  eps = jnp.array([0.1, 0.3])
  opt = np.log((1 - eps) / eps)
  for shift, sign in ((-0.5, -1), (0.5, 1)):
    h = jnp.stack([opt + shift, jnp.zeros(2)], axis=1)
    lp = with_eps(make_lp(h, np.zeros((2, 2)), np.ones((2, 2)), [1.0, 1.0]), eps)
    g = jax.grad(lambda p: losses.get("dpo")(with_policy(lp, p), beta=1.0)[0])(lp.policy)
    assert (np.sign(g[:, 0]) == sign).all(), g
