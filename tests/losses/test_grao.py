"""GRAO (jaxpref/losses/grao.py) against float64 numpy references written from eq. 3 of
arXiv 2508.07750 one response at a time (never calling the loss), with its gradients and
the properties the paper states: samples above the group's mean reward are raised, those
below lowered; the reference answer (the group's last member) is imitated only when it
beats the samples; and without imitation and regulariser it is GRPO's on-policy gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxpref import losses
from jaxpref.losses.grao import grao_objective
from jaxpref.types import Logps


def rollout(seed, b=4, k=4, t=10):
  """k members: k - 1 samples, then the reference answer y (always valid)."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((b, k, t))
  for i in range(b):
    for j in range(k):
      start, n = rng.integers(1, 4), rng.integers(1, t - 3)
      mask[i, j, start:start + n] = 1.0
  pol = -rng.uniform(0.05, 3.0, (b, k, t)) * mask
  valid = np.ones((b, k), bool)
  valid[0, 0] = False  # a padded sample
  weight = rng.uniform(0.5, 2.0, b)
  weight[-1] = 0.0  # a padded group
  return dict(pol=pol, mask=mask, adv=rng.normal(0, 1, (b, k)), valid=valid, weight=weight)


def make_lp(d, dtype=jnp.float32, **over):
  d = {**d, **over}
  a = lambda x: None if x is None else jnp.asarray(x, dtype)
  pol, mask = a(d["pol"]), a(d["mask"])
  return Logps(policy=pol.sum(-1), ref=jnp.zeros(pol.shape[:2], dtype), length=mask.sum(-1),
               valid=jnp.asarray(d["valid"]), weight=a(d["weight"]), policy_tok=pol,
               mask=mask, old_tok=a(d.get("old")), advantages=a(d["adv"]))


def np_grao(d, imitation, lam):
  """(loss, d loss / d lp [B, K, T]) in float64, one response at a time: per group, with
  l the token mean, y the last member and the valid samples i (G of them),
  J = 1/G sum_i [A_i l_i + beta A_y l_y + lam A_i (l_i - l_y)]; the loss is minus the
  weighted mean of J over groups with a sample."""
  b_n, k_n, t_n = d["pol"].shape
  num, den, grad = 0.0, 0.0, np.zeros((b_n, k_n, t_n))
  tok_mean = lambda b, i: (np.sum(d["pol"][b, i] * d["mask"][b, i]) /
                           max(d["mask"][b, i].sum(), 1.0))
  for b in range(b_n):
    kept = [i for i in range(k_n - 1) if d["valid"][b, i]]
    if not kept:
      continue
    w, g, y = d["weight"][b], len(kept), k_n - 1
    a, l_y = d["adv"][b], tok_mean(b, y)
    j = sum(a[i] * tok_mean(b, i) + imitation * a[y] * l_y + lam * a[i] * (tok_mean(b, i) - l_y)
            for i in kept) / g
    num -= w * j
    for i in kept:
      grad[b, i] = -w * (1 + lam) * a[i] / g * d["mask"][b, i] / max(d["mask"][b, i].sum(), 1)
    d_ly = imitation * a[y] - lam * sum(a[i] for i in kept) / g
    grad[b, y] = -w * d_ly * d["mask"][b, y] / max(d["mask"][b, y].sum(), 1)
    den += w
  return num / den, grad / den


def np_objective(l_o, a_o, valid, l_y, a_y, beta, lam):
  """Eq. 3 for one group, float64, literally: 1/G sum_i [A_i l_i + beta A_y l_y +
  lam A_i (l_i - l_y)], and its derivatives in l_i and l_y."""
  kept = [i for i in range(len(l_o)) if valid[i]]
  g = len(kept)
  j = sum(a_o[i] * l_o[i] + beta * a_y * l_y + lam * a_o[i] * (l_o[i] - l_y) for i in kept) / g
  d_lo = np.array([(1 + lam) * a_o[i] / g if valid[i] else 0.0 for i in range(len(l_o))])
  d_ly = beta * a_y - lam * sum(a_o[i] for i in kept) / g
  return j, d_lo, d_ly


def _grad(fn, lp):
  return jax.value_and_grad(lambda p: fn(Logps(**{**lp.__dict__, "policy_tok": p}))[0])(
      lp.policy_tok)


@pytest.mark.parametrize("imitation, lam", [(0.5, 0.6), (0.0, 0.0), (1.0, 2.5)])
def test_matches_float64_reference_value_and_gradient(imitation, lam):
  d = rollout(0)
  loss, grad = jax.jit(lambda lp: _grad(losses.bind("grao", {"imitation": imitation,
                                                             "lam": lam}), lp))(make_lp(d))
  ref_loss, ref_grad = np_grao(d, imitation, lam)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=2e-5, atol=1e-7)
  assert np.all(np.asarray(grad)[d["mask"] == 0] == 0)  # nothing leaks off the mask
  assert np.all(np.asarray(grad)[-1] == 0)  # the weight-0 group
  assert np.all(np.asarray(grad)[0, 0] == 0)  # the padded sample


def test_float64_gradient_check():
  d = rollout(1, b=2, k=3, t=6)
  fn = losses.bind("grao", {"imitation": 0.5, "lam": 0.6})
  with jax.enable_x64(True):
    lp = make_lp(d, jnp.float64)
    check_grads(lambda p: fn(Logps(**{**lp.__dict__, "policy_tok": p}))[0],
                (lp.policy_tok,), order=1, modes=["rev"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 3])
def test_full_objective_with_reference_answer_matches_eq3(seed):
  rng = np.random.default_rng(seed)
  b, g = 5, 4
  l_o, a_o = -rng.uniform(0.1, 3.0, (b, g)), rng.normal(0, 1, (b, g))
  l_y, a_y = -rng.uniform(0.1, 3.0, b), rng.normal(0, 1, b)
  valid = np.ones((b, g), bool)
  valid[1, 2:] = False
  beta, lam = 0.5, 0.6
  f = lambda lo, ly: grao_objective(lo, jnp.asarray(a_o), jnp.asarray(valid), ly,
                                    jnp.asarray(a_y), beta=beta, lam=lam)[0]
  with jax.enable_x64(True):
    lo, ly = jnp.asarray(l_o), jnp.asarray(l_y)
    j = f(lo, ly)
    d_lo, d_ly = jax.jacrev(lambda x, y: jnp.sum(f(x, y)), argnums=(0, 1))(lo, ly)
  for r in range(b):
    want, want_lo, want_ly = np_objective(l_o[r], a_o[r], valid[r], l_y[r], a_y[r], beta, lam)
    np.testing.assert_allclose(float(j[r]), want, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(d_lo[r]), want_lo, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(float(d_ly[r]), want_ly, rtol=1e-12)


def test_raises_above_average_samples_and_lowers_the_rest():
  # One group: three one-token samples scored 1, 0, 0 and the reference answer scored 1:
  # GRPO advantages over all four (+, -, -, +).
  scores = np.array([[1.0, 0.0, 0.0, 1.0]])
  adv = np.asarray(losses.advantages.compute("grpo", scores, np.ones((1, 4), bool)))
  d = dict(pol=np.full((1, 4, 1), -1.0), mask=np.ones((1, 4, 1)), adv=adv,
           valid=np.ones((1, 4), bool), weight=np.ones(1))
  _, g = _grad(losses.get("grao"), make_lp(d))
  g = np.asarray(g)[0, :, 0]
  # descent raises log pi(o_0) and the winning reference answer, lowers o_1 and o_2
  assert g[0] < 0 < g[1] and g[2] > 0 and g[3] < 0


def test_reference_answer_is_imitated_only_when_it_beats_the_samples():
  """The paper's intuition: GRAO 'only prefers to imitate the standard reasoning output
  when its reasoning results are wrong'. With advantages standardised over (o_1..o_G, y),
  dJ/dl(y) = beta A_y - lam mean_i A_i = (beta + lam / G) A_y: same sign as A_y."""
  beta, lam = 0.5, 0.6
  for scores in ([0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.5]):
    s = np.asarray([scores])  # the last member is y
    a = np.asarray(losses.advantages.compute("grpo", s, np.ones_like(s, bool)))
    a_o, a_y = jnp.asarray(a[:, :-1]), jnp.asarray(a[:, -1])
    l_o, l_y = jnp.full((1, 3), -1.0), jnp.full((1,), -2.0)
    d_ly = jax.grad(lambda y: grao_objective(l_o, a_o, jnp.ones((1, 3), bool), y, a_y,
                                             beta=beta, lam=lam)[0][0])(l_y)
    np.testing.assert_allclose(float(d_ly[0]), (beta + lam / 3) * float(a_y[0]), rtol=1e-5)


def test_without_imitation_and_regulariser_it_is_grpo_on_the_samples():
  d = rollout(4)
  lp = make_lp(d, old=d["pol"])
  _, g = _grad(losses.bind("grao", {"imitation": 0.0, "lam": 0.0}), lp)
  samples = make_lp({k: (v[:, :-1] if k in ("pol", "mask", "adv", "valid") else v)
                     for k, v in d.items()}, old=d["pol"][:, :-1])
  _, g_grpo = _grad(losses.bind("grpo", {"beta": 0.0}), samples)
  np.testing.assert_allclose(np.asarray(g)[:, :-1], np.asarray(g_grpo), rtol=1e-5, atol=1e-8)
  assert np.all(np.asarray(g)[:, -1] == 0)  # y is not trained without beta or lam


def test_registration_metrics_and_bad_inputs():
  assert losses.role("grao") == "online" and losses.needs_tokens("grao")
  assert losses.hparams("grao") == {"imitation": 0.5, "lam": 0.6}
  assert losses.record_fields("grao") == ("chosen",) == losses.member_fields("grao")
  d = rollout(5)
  _, m = losses.get("grao")(make_lp(d))
  for key in ("rewards/accuracy", "loss/policy", "loss/exploration", "loss/imitation",
              "loss/regularizer", "policy/ratio_mean", "entropy/mean", "logps/sample_mean",
              "logps/answer", "advantages/answer"):
    assert np.isfinite(float(m[key])), key
  np.testing.assert_allclose(float(m["policy/ratio_mean"]), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="advantages"):
    losses.get("grao")(make_lp(d, adv=None))
  with pytest.raises(ValueError, match="groups of K samples plus the reference answer"):
    losses.get("grao")(make_lp({k: (v[:, :1] if k in ("pol", "mask", "adv", "valid") else v)
                                for k, v in d.items()}))
  with pytest.raises(ValueError, match="lam"):
    losses.bind("grao", {"lam": -1.0})
