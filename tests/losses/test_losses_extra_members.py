"""rdpo, rorpo, mapl, omnidpo, infifpo (jaxpref/losses/extra_members.py) against float64
numpy references written here from docs/losses.md (rdpo, rorpo, infifpo, omnidpo, mapl), plus gradients
and the stated properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref import losses
from jaxpref.types import Logps


def logsig(z):
  return np.where(z >= 0, -np.log1p(np.exp(-np.abs(z))), z - np.log1p(np.exp(-np.abs(z))))


def wmean(x, w):
  return np.sum(x * w) / np.sum(w)


def rationale_ref(s, gamma, rationale_term):
  return -logsig(gamma * s) if rationale_term == "logsig" else -gamma * s


def rdpo_ref(policy, ref, length, w, src, beta=0.1, gamma=0.1, rationale_term="logsig"):
  h = (policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1])
  return wmean(-logsig(beta * h) + rationale_ref(policy[:, 2], gamma, rationale_term), w)


def rorpo_ref(policy, ref, length, w, src, beta=0.1, gamma=1.0, rationale_term="linear"):
  a = policy[:, :2] / length[:, :2]
  logodds = a - np.log(-np.expm1(a))
  nll = np.sum(-policy[:, 0] * w) / np.sum(length[:, 0] * w)
  return (nll - beta * wmean(logsig(logodds[:, 0] - logodds[:, 1]), w)
          + wmean(rationale_ref(policy[:, 2], gamma, rationale_term), w))


def condition_ref(policy, ref, length, w, src, beta=0.1, condition_weight=1.0):
  rho = policy - ref
  return wmean(-logsig(beta * (rho[:, 0] - rho[:, 1]))
               - condition_weight * logsig(beta * (rho[:, 0] - rho[:, 2])), w)


def infifpo_ref(policy, ref, length, w, src, beta=2.5, length_normalize=True, fusion="mean",
                with_reference=False, clip=True, ref_offset=5.0):
  pol, src = policy[:, :2], src
  if with_reference:
    src = np.concatenate([ref[:, None, :2], src], axis=1)
  if length_normalize:
    pol, src = pol / length[:, :2], src / length[:, None, :2]
  if fusion == "mean":
    fused = src.mean(axis=1)
  else:
    best = np.argmax(src[:, :, 0] - src[:, :, 1], axis=1)
    fused = src[np.arange(len(src)), best]
  if clip:
    fused = np.maximum(fused, pol - ref_offset)
  rho = pol - fused
  return wmean(-logsig(beta * (rho[:, 0] - rho[:, 1])), w)


REFS = {"rdpo": rdpo_ref, "rorpo": rorpo_ref, "mapl": condition_ref, "omnidpo": condition_ref,
        "infifpo": infifpo_ref}
CASES = [("rdpo", {}), ("rdpo", {"rationale_term": "linear", "gamma": 0.3}),
         ("rorpo", {}), ("rorpo", {"rationale_term": "logsig", "beta": 0.5}),
         ("mapl", {}), ("mapl", {"condition_weight": 0.3, "beta": 0.5}), ("omnidpo", {}),
         ("infifpo", {}), ("infifpo", {"fusion": "max_margin"}),
         ("infifpo", {"length_normalize": False, "beta": 0.1, "ref_offset": 300.0}),
         ("infifpo", {"with_reference": True, "fusion": "max_margin", "clip": False})]


def inputs(seed, b=16, spread=10.0, s=3):
  """policy/ref/length [B,3], weight [B] (two padded groups), source log-probs [B,S,2]."""
  rng = np.random.default_rng(seed)
  length = rng.integers(1, 30, (b, 3)).astype(np.float64)
  ref = -rng.uniform(0.5, 3.0, (b, 3)) * length
  policy = np.minimum(ref + rng.normal(0, spread, (b, 3)), -1e-3)
  weight = rng.uniform(0.5, 2.0, b)
  weight[:2] = 0.0
  src = np.minimum(ref[:, None, :2] + rng.normal(0, spread, (b, s, 2)), -1e-3)
  return policy, ref, length, weight, src


def make_lp(policy, ref, length, weight, src, dtype=jnp.float32):
  policy = jnp.asarray(policy, dtype)
  return Logps(policy=policy, ref=jnp.asarray(ref, dtype), length=jnp.asarray(length, dtype),
               valid=jnp.ones(policy.shape, bool), weight=jnp.asarray(weight, dtype),
               source_logps=jnp.asarray(src, dtype))


def test_every_extra_member_loss_is_tested_and_declares_its_fields():
  # grao is the online one (its member is appended to rollouts): tests/losses/test_grao.py
  assert {n for n, _ in CASES} == set(losses.extra_members.RECORD_FIELDS) - {"grao"}
  assert losses.record_fields("grao") == losses.member_fields("grao") == ("chosen",)
  assert losses.record_fields("rdpo") == ("rationale",)
  assert losses.member_fields("0.5*mapl+infifpo") == ("rejected_prompt",)
  assert losses.record_fields("0.5*mapl+infifpo") == ("rejected_prompt", "source_logps")
  assert losses.record_fields("dpo") == losses.member_fields("dpo") == ()


@pytest.mark.parametrize("name,hp", CASES, ids=str)
@pytest.mark.parametrize("spread", [3.0, 200.0])
def test_matches_numpy_reference(name, hp, spread):
  policy, ref, length, weight, src = inputs(1, spread=spread)
  fn = jax.jit(losses.bind(name, hp))
  loss, metrics = fn(make_lp(policy, ref, length, weight, src))
  want = REFS[name](policy, ref, length, weight, src, **hp)
  assert np.isfinite(want)
  np.testing.assert_allclose(float(loss), want, rtol=2e-4, atol=2e-4)
  assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
  grads = jax.grad(lambda p: fn(make_lp(p, ref, length, weight, src))[0])(
      jnp.asarray(policy, jnp.float32))
  assert np.isfinite(np.asarray(grads)).all()
  np.testing.assert_array_equal(np.asarray(grads)[:2], 0.0)  # weight-0 groups: no gradient


@pytest.mark.parametrize("name,hp", CASES, ids=str)
def test_gradient_matches_finite_differences_of_the_reference(name, hp):
  policy, ref, length, weight, src = inputs(3, b=6, spread=2.0)
  with jax.enable_x64(True):
    fn = losses.bind(name, hp)
    got = np.asarray(jax.grad(lambda p: fn(make_lp(p, ref, length, weight, src, jnp.float64))[0])(
        jnp.asarray(policy, jnp.float64)))
  want, eps = np.zeros_like(policy), 1e-6
  for idx in np.ndindex(policy.shape):
    up, down = policy.copy(), policy.copy()
    up[idx] += eps
    down[idx] -= eps
    want[idx] = (REFS[name](up, ref, length, weight, src, **hp)
                 - REFS[name](down, ref, length, weight, src, **hp)) / (2 * eps)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_rdpo_with_gamma_zero_and_mapl_with_weight_zero_are_dpo():
  policy, ref, length, weight, src = inputs(4, spread=30.0)
  lp = make_lp(policy, ref, length, weight, src)
  pair = Logps(policy=lp.policy[:, :2], ref=lp.ref[:, :2], length=lp.length[:, :2],
               valid=lp.valid[:, :2], weight=lp.weight)
  dpo = float(losses.get("dpo")(pair, beta=0.3)[0])
  value = lambda name, **hp: float(losses.get(name)(lp, beta=0.3, **hp)[0])
  # logsig(0) = -log 2 is a constant: the gradient, not the value, is DPO's.
  assert value("rdpo", gamma=0.0) == pytest.approx(dpo + np.log(2), rel=1e-6)
  assert value("rdpo", gamma=0.0, rationale_term="linear") == pytest.approx(dpo, rel=1e-6)
  for name in ("mapl", "omnidpo"):
    assert value(name, condition_weight=0.0) == pytest.approx(dpo, rel=1e-6)
  grad = lambda fn, p: np.asarray(jax.grad(lambda q: fn(q)[0])(p))
  g_rdpo = grad(lambda q: losses.get("rdpo")(make_lp(q, ref, length, weight, src), beta=0.3,
                                             gamma=0.0), jnp.asarray(policy, jnp.float32))
  g_dpo = grad(lambda q: losses.get("dpo")(make_lp(q, ref[:, :2], length[:, :2], weight, src),
                                           beta=0.3), jnp.asarray(policy[:, :2], jnp.float32))
  np.testing.assert_allclose(g_rdpo[:, :2], g_dpo, rtol=1e-6, atol=1e-9)
  np.testing.assert_array_equal(g_rdpo[:, 2], 0.0)


def test_infifpo_with_the_reference_as_its_only_source_is_dpo():
  policy, ref, length, weight, _ = inputs(5, spread=30.0)
  lp = make_lp(policy, ref, length, weight, ref[:, None, :2])
  pair = Logps(policy=lp.policy[:, :2], ref=lp.ref[:, :2], length=lp.length[:, :2],
               valid=lp.valid[:, :2], weight=lp.weight)
  want = float(losses.get("dpo")(pair, beta=0.1)[0])
  for fusion in ("mean", "max_margin"):
    got = losses.get("infifpo")(lp, beta=0.1, length_normalize=False, clip=False, fusion=fusion)[0]
    assert float(got) == pytest.approx(want, rel=1e-6)


def test_infifpo_max_margin_picks_the_source_that_separates_the_pair_most():
  # Source 1 prefers y_w by 6 nats, source 0 by 1: max_margin uses source 1 alone.
  lp = make_lp([[-10.0, -10.0, -1.0]], [[0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0]], [1.0],
               [[[-4.0, -5.0], [-2.0, -8.0]]])
  z = float(losses.get("infifpo")(lp, beta=1.0, length_normalize=False, clip=False,
                                  fusion="max_margin")[0])
  assert z == pytest.approx(-logsig(np.float64(-6.0)), rel=1e-6)
  mean = float(losses.get("infifpo")(lp, beta=1.0, length_normalize=False, clip=False)[0])
  assert mean == pytest.approx(-logsig(np.float64(-3.5)), rel=1e-6)


def test_infifpo_clipping_bounds_each_log_ratio_by_ref_offset():
  # A source 100 nats below the policy on y_l would give a log-ratio of 100; clipped: 5.
  lp = make_lp([[-10.0, -10.0, -1.0]], [[0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0]], [1.0],
               [[[-10.0, -110.0]]])
  loss, m = losses.get("infifpo")(lp, beta=1.0, length_normalize=False, ref_offset=5.0)
  assert float(loss) == pytest.approx(-logsig(np.float64(-5.0)), rel=1e-6)
  assert float(m["rewards/rejected"]) == pytest.approx(5.0)


def test_gradient_signs():
  policy, ref, length, weight, src = inputs(6, spread=5.0)
  weight[:] = 1.0
  for name, member in (("rdpo", 2), ("rorpo", 2)):
    g = jax.grad(lambda p: losses.get(name)(make_lp(p, ref, length, weight, src))[0])(
        jnp.asarray(policy, jnp.float32))
    assert (np.asarray(g)[:, member] < 0).all(), name  # descent raises the rationale's log-prob
    assert (np.asarray(g)[:, 0] < 0).all() and (np.asarray(g)[:, 1] > 0).all(), name
  for name in ("mapl", "omnidpo"):
    g = np.asarray(jax.grad(lambda p: losses.get(name)(make_lp(p, ref, length, weight, src))[0])(
        jnp.asarray(policy, jnp.float32)))
    # y_w under x- is pushed down, y_w under x up, y_l down.
    assert (g[:, 2] > 0).all() and (g[:, 0] < 0).all() and (g[:, 1] > 0).all(), name


def test_condition_term_is_antisymmetric_in_the_two_prompts():
  # Swapping (x, y_w) and (x-, y_w) turns logsig(beta c) into logsig(-beta c):
  # l(c) - l(-c) = -beta c exactly, with the response pair held fixed (weight 1, beta 1).
  rho_w, rho_minus = 3.0, -1.0
  lp = lambda a, b: make_lp([[a, -2.0, b]], [[0.0, 0.0, 0.0]], [[1.0] * 3], [1.0], np.zeros((1, 1, 2)))
  term = lambda a, b: (losses.get("mapl")(lp(a, b), beta=1.0)[0]
                       - losses.get("mapl")(lp(a, b), beta=1.0, condition_weight=0.0)[0])
  diff = float(term(rho_w, rho_minus)) - float(-logsig(np.float64(rho_minus - rho_w)))
  assert diff == pytest.approx(-(rho_w - rho_minus), rel=1e-6)


def test_wrong_group_size_or_missing_sources_is_a_clear_error():
  policy, ref, length, weight, src = inputs(7)
  pair = make_lp(policy[:, :2], ref[:, :2], length[:, :2], weight, src)
  for name, field in (("rdpo", "rationale"), ("rorpo", "rationale"), ("mapl", "rejected_prompt")):
    with pytest.raises(ValueError, match=f"'{field}'.*groups of 3"):
      losses.get(name)(pair)
  no_src = Logps(policy=pair.policy, ref=pair.ref, length=pair.length, valid=pair.valid,
                 weight=pair.weight)
  with pytest.raises(ValueError, match="source_logps"):
    losses.get("infifpo")(no_src)
  with pytest.raises(ValueError, match="rationale_term"):
    losses.get("rdpo")(make_lp(policy, ref, length, weight, src), rationale_term="log")
  with pytest.raises(ValueError, match="fusion"):
    losses.get("infifpo")(pair, fusion="max")
