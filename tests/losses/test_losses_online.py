"""Online-role losses (jaxpref/losses/online.py) against float64 numpy references written from
the papers' formulas with explicit loops (never calling the losses), and their properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxpref import losses
from jaxpref.types import Logps

ONLINE = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo", "sapo")


def rollout(seed, b=4, k=3, t=10, spread=0.3):
  rng = np.random.default_rng(seed)
  mask = np.zeros((b, k, t))
  for i in range(b):
    for j in range(k):
      start, n = rng.integers(1, 4), rng.integers(1, t - 3)
      mask[i, j, start:start + n] = 1.0
  pol = -rng.uniform(0.05, 3.0, (b, k, t)) * mask
  old = (pol + rng.normal(0, spread, (b, k, t))) * mask
  ref = (pol + rng.normal(0, 0.5, (b, k, t))) * mask
  adv = rng.normal(0, 1, (b, k))
  valid = np.ones((b, k), bool)
  valid[0, k - 1] = False  # a padded response
  weight = rng.uniform(0.5, 2.0, b)
  weight[-1] = 0.0  # a padded group
  return dict(pol=pol, old=old, ref=ref, mask=mask, adv=adv, valid=valid, weight=weight)


def make_lp(d, dtype=jnp.float32, **over):
  d = {**d, **over}
  a = lambda x: None if x is None else jnp.asarray(x, dtype)
  pol, mask = a(d["pol"]), a(d["mask"])
  return Logps(policy=pol.sum(-1), ref=jnp.zeros(pol.shape[:2], dtype), length=mask.sum(-1),
               valid=jnp.asarray(d["valid"]), weight=a(d["weight"]), policy_tok=pol,
               ref_tok=a(d["ref"]), mask=mask, old_tok=a(d["old"]), advantages=a(d["adv"]))


# ---- float64 reference, one token / one response at a time -------------------------------

def np_kl(p, r, est):
  x = r - p
  return {"k1": -x, "k2": 0.5 * x * x, "k3": np.exp(x) - 1.0 - x}[est]


def np_token_loss(name, p, o, a, hp):
  r = np.exp(p - o)
  if name == "cispo":
    return -min(max(r, 1 - hp["epsilon_low"]), 1 + hp["epsilon_high"]) * a * p
  if name == "sapo":
    tau = hp["tau_pos"] if a > 0 else hp["tau_neg"]
    return -(4.0 / tau) / (1.0 + np.exp(-tau * (r - 1.0))) * a
  unclipped = min(r, hp["delta"]) if hp["delta"] > 0 else r
  clipped = min(max(r, 1 - hp["epsilon_low"]), 1 + hp["epsilon_high"])
  return -min(unclipped * a, clipped * a)


def np_loss(name, d, **hp):
  hp = {**losses.hparams(name), **hp}
  pol, old, ref, mask, adv = d["pol"], d["old"], d["ref"], d["mask"], d["adv"]
  b_n, k_n, t_n = pol.shape
  tok_num = tok_den = 0.0
  groups, gweights = [], []
  for b in range(b_n):
    per_resp = []
    for i in range(k_n):
      if not d["valid"][b, i]:
        continue
      ts = [t for t in range(t_n) if mask[b, i, t]]
      reg = [hp["beta"] * np_kl(pol[b, i, t], ref[b, i, t], hp["kl_estimator"])
             + hp["entropy_coef"] * pol[b, i, t] for t in ts]  # - c * H, H = -log p
      if name == "gspo":
        s = np.exp(np.mean([pol[b, i, t] - old[b, i, t] for t in ts]))
        per_resp.append(np_token_loss("grpo", np.log(s), 0.0, adv[b, i], hp) + np.mean(reg))
        continue
      vals = [np_token_loss(name, pol[b, i, t], old[b, i, t], adv[b, i], hp) + g
              for t, g in zip(ts, reg)]
      if name in ("bnpo", "dapo", "cispo"):
        tok_num += d["weight"][b] * sum(vals)
        tok_den += d["weight"][b] * len(vals)
      elif name == "dr_grpo":
        per_resp.append(sum(vals) / (hp["max_tokens"] or t_n))
      else:
        per_resp.append(np.mean(vals))
    if per_resp:
      groups.append(np.mean(per_resp))
      gweights.append(d["weight"][b])
  if name in ("bnpo", "dapo", "cispo"):
    return tok_num / tok_den
  return np.dot(groups, gweights) / np.sum(gweights)


CASES = [("grpo", {}), ("grpo", {"beta": 0.1, "kl_estimator": "k1", "entropy_coef": 0.01}),
         ("grpo", {"delta": 1.2, "beta": 0.0}), ("bnpo", {"kl_estimator": "k2", "beta": 0.2}),
         ("dr_grpo", {}), ("dr_grpo", {"max_tokens": 32, "entropy_coef": 0.1}),
         ("dapo", {}), ("dapo", {"delta": 1.5, "beta": 0.05}),
         ("gspo", {}), ("gspo", {"epsilon_low": 0.05, "epsilon_high": 0.1, "beta": 0.1}),
         ("cispo", {}), ("cispo", {"epsilon_low": 0.2, "epsilon_high": 0.1, "entropy_coef": 0.1}),
         ("sapo", {}), ("sapo", {"tau_pos": 2.0, "tau_neg": 4.0, "beta": 0.1})]


@pytest.mark.parametrize("name,hp", CASES)
def test_matches_numpy_reference(name, hp):
  d = rollout(0)
  loss, metrics = jax.jit(losses.bind(name, hp))(make_lp(d))
  np.testing.assert_allclose(float(loss), np_loss(name, d, **hp), rtol=2e-5, atol=1e-6)
  assert np.isfinite(float(metrics["loss/policy"]))


@pytest.mark.parametrize("name", ONLINE)
def test_registered_online_with_tokens(name):
  assert losses.role(name) == "online"
  assert losses.needs_tokens(name)


def test_grpo_at_ratio_one_is_minus_mean_advantage():
  d = rollout(1)
  on_policy = {**d, "old": d["pol"]}
  loss, m = losses.get("grpo")(make_lp(on_policy), beta=0.0)
  a = d["adv"]
  groups = [np.mean(a[b][d["valid"][b]]) for b in range(a.shape[0])]
  expected = -np.dot(groups, d["weight"]) / d["weight"].sum()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(m["policy/ratio_mean"]), 1.0, rtol=1e-6)
  assert float(m["clip/low_fraction"]) == float(m["clip/high_fraction"]) == 0.0
  # No old_tok is the same as old == policy (one update per rollout).
  none_old, _ = losses.get("grpo")(make_lp(d, old=None), beta=0.0)
  np.testing.assert_allclose(float(none_old), expected, rtol=1e-5)


def one_token(ratios, advs):
  """K responses of one token each, ratio r_i = exp(lp_i - 0), in one group."""
  k = len(ratios)
  pol = np.log(np.asarray(ratios, np.float64))[None, :, None]
  return dict(pol=pol, old=np.zeros_like(pol), ref=np.zeros_like(pol),
              mask=np.ones_like(pol), adv=np.asarray(advs, np.float64)[None],
              valid=np.ones((1, k), bool), weight=np.ones(1))


def all_grads(name, d, **hp):
  """d loss / d policy_tok, [B, K, T]."""
  lp = make_lp(d)
  fn = losses.bind(name, hp)
  return np.asarray(jax.grad(lambda p: fn(Logps(**{**lp.__dict__, "policy_tok": p}))[0])(
      lp.policy_tok))


def token_grads(name, d, **hp):
  return all_grads(name, d, **hp)[0, :, 0]


def test_clipping_acts_only_outside_the_range_on_the_advantages_side():
  ratios = [1.5, 1.1, 0.5, 0.5, 0.9, 1.5, 1.25]
  advs = [1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 1.0]
  g = token_grads("grpo", one_token(ratios, advs), beta=0.0)
  # A > 0 above 1 + eps and A < 0 below 1 - eps: clipped, no gradient.
  assert g[0] == 0 and g[3] == 0 and g[6] == 0
  # Inside the range, or outside on the side the advantage's sign leaves open: -A r / K.
  for i in (1, 2, 4, 5):
    np.testing.assert_allclose(g[i], -advs[i] * ratios[i] / len(ratios), rtol=1e-5)
  _, m = losses.get("grpo")(make_lp(one_token(ratios, advs)), beta=0.0)
  np.testing.assert_allclose(float(m["clip/high_fraction"]), 2 / 7, rtol=1e-6)
  np.testing.assert_allclose(float(m["clip/low_fraction"]), 1 / 7, rtol=1e-6)
  # DAPO's clip-higher keeps r = 1.25 (< 1.28) for A > 0.
  assert token_grads("dapo", one_token(ratios, advs))[6] != 0
  # Two-sided clipping: delta bounds r for A < 0 as well.
  g = token_grads("grpo", one_token(ratios, advs), beta=0.0, delta=1.3)
  assert g[5] == 0 and g[4] != 0


def test_gspo_ratio_is_per_sequence():
  # One response of 3 tokens with log-ratios (0.3, -0.3, 0.03): token ratios leave the
  # clip range but the sequence ratio exp(0.01) stays inside (eps 0.05).
  lr = np.array([0.3, -0.3, 0.03])
  d = dict(pol=(lr - 1.0)[None, None], old=-np.ones((1, 1, 3)), ref=np.zeros((1, 1, 3)),
           mask=np.ones((1, 1, 3)), adv=np.array([[2.0]]), valid=np.ones((1, 1), bool),
           weight=np.ones(1))
  hp = dict(epsilon_low=0.05, epsilon_high=0.05)
  s = np.exp(lr.mean())
  loss, m = losses.get("gspo")(make_lp(d), **hp)
  np.testing.assert_allclose(float(loss), -2.0 * s, rtol=1e-6)
  np.testing.assert_allclose(float(m["policy/ratio_mean"]), s, rtol=1e-6)
  g = all_grads("gspo", d, **hp)[0, 0]
  np.testing.assert_allclose(g, np.full(3, -2.0 * s / 3), rtol=1e-5)  # same for every token
  # The token-level ratio would clip tokens 0 and 1; GRPO's gradient differs per token.
  assert len(set(np.round(all_grads("grpo", d, beta=0.0, **hp)[0, 0], 6))) > 1
  # Shifting the sequence's mean log-ratio beyond 1 + eps clips the whole response.
  d["pol"] = d["pol"] + 0.2
  assert np.all(all_grads("gspo", d, **hp) == 0)
  # Only the mean log-ratio matters: permuting tokens leaves the loss unchanged.
  perm = {**d, "pol": d["pol"][..., ::-1]}
  np.testing.assert_allclose(float(losses.get("gspo")(make_lp(perm), **hp)[0]),
                             float(losses.get("gspo")(make_lp(d), **hp)[0]), rtol=1e-6)


@pytest.mark.parametrize("pol,ref,k1,k2,k3", [(-1.0, -2.0, 1.0, 0.5, np.exp(-1.0)),
                                             (-2.0, -1.0, -1.0, 0.5, np.e - 2.0),
                                             (-0.5, -0.5, 0.0, 0.0, 0.0)])
def test_kl_estimators_hand_values(pol, ref, k1, k2, k3):
  d = dict(pol=np.array([[[pol]]]), old=np.array([[[pol]]]), ref=np.array([[[ref]]]),
           mask=np.ones((1, 1, 1)), adv=np.zeros((1, 1)), valid=np.ones((1, 1), bool),
           weight=np.ones(1))
  for est, want in (("k1", k1), ("k2", k2), ("k3", k3)):
    loss, m = losses.get("grpo")(make_lp(d), beta=0.5, kl_estimator=est)
    np.testing.assert_allclose(float(m["kl/mean"]), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(loss), 0.5 * want, rtol=1e-6, atol=1e-7)
  # k3's gradient in lp is 1 - pi_ref / pi.
  g = jax.grad(lambda p: losses.get("grpo")(
      make_lp(d, pol=p, old=p), beta=1.0)[0])(jnp.array([[[pol]]]))
  np.testing.assert_allclose(float(g[0, 0, 0]), 1.0 - np.exp(ref - pol), rtol=1e-5)


def test_entropy_bonus_value_and_score_function_gradient():
  d = rollout(2)
  base, m = losses.get("dapo")(make_lp(d))
  c = 0.3
  with_ent, _ = losses.get("dapo")(make_lp(d), entropy_coef=c)
  w = d["mask"] * (d["weight"][:, None] * d["valid"])[..., None]
  ent = np.sum(-d["pol"] * w) / w.sum()
  np.testing.assert_allclose(float(m["entropy/mean"]), ent, rtol=1e-5)
  np.testing.assert_allclose(float(with_ent - base), -c * ent, rtol=1e-4)
  # The bonus's gradient is -c * (-(1 + lp_t)) / N per token: the entropy's score function.
  grad = lambda cc: jax.grad(lambda p: losses.get("dapo")(
      make_lp(d, pol=p), entropy_coef=cc)[0])(jnp.asarray(d["pol"], jnp.float32))
  diff = np.asarray(grad(c) - grad(0.0))
  np.testing.assert_allclose(diff, c * (1 + d["pol"]) * w / w.sum(), rtol=1e-4, atol=1e-7)


def test_cispo_keeps_gradient_of_clipped_tokens():
  ratios, advs = [3.0, 1.0, 0.5], [1.0, 1.0, -1.0]
  g = token_grads("cispo", one_token(ratios, advs), epsilon_low=0.2, epsilon_high=0.5)
  np.testing.assert_allclose(g, -np.array([1.5, 1.0, -0.8]) / 3, rtol=1e-5)


def test_sapo_on_policy_gradient_is_grpo_and_gate_decays():
  d = rollout(3)
  d["old"] = d["pol"]
  lp = make_lp(d)
  grad = lambda name, **hp: jax.grad(lambda p: losses.bind(name, hp)(
      Logps(**{**lp.__dict__, "policy_tok": p}))[0])(lp.policy_tok)
  np.testing.assert_allclose(grad("sapo"), grad("grpo", beta=0.0), rtol=1e-4, atol=1e-7)
  # Off policy: d/dlp of -(4/tau) sig(tau (r-1)) A is -4 p (1 - p) r A, p = sig(tau (r-1)).
  r, tau = np.array([1.0, 4.0, 0.25]), np.array([1.0, 1.0, 1.05])
  far = token_grads("sapo", one_token(r, [1.0, 1.0, -1.0]))
  p = 1 / (1 + np.exp(-tau * (r - 1)))
  np.testing.assert_allclose(far, -4 * p * (1 - p) * r * np.array([1, 1, -1]) / 3, rtol=1e-5)
  assert abs(far[1]) < 4.0 * abs(far[0]) / 2  # soft: well under the unclipped -A r / K


def test_metrics_accuracy_margin():
  d = rollout(4)
  _, m = losses.get("grpo")(make_lp(d))
  w = d["weight"][:, None] * d["valid"]
  np.testing.assert_allclose(float(m["rewards/accuracy"]), np.sum((d["adv"] > 0) * w) / w.sum(),
                             rtol=1e-6)
  spread = [np.ptp(d["adv"][b][d["valid"][b]]) for b in range(4)]
  np.testing.assert_allclose(float(m["rewards/margin"]),
                             np.dot(spread, d["weight"]) / d["weight"].sum(), rtol=1e-6)
  for key in ("loss/policy", "clip/low_fraction", "clip/high_fraction", "kl/mean",
              "policy/ratio_mean", "entropy/mean"):
    assert key in m


@pytest.mark.parametrize("name", ONLINE)
def test_jit_grad_and_float64_gradient_check(name):
  d = rollout(5, b=2, k=2, t=6, spread=0.05)
  fn = losses.bind(name, {"beta": 0.1, "entropy_coef": 0.01})
  lp = make_lp(d)
  eager = fn(lp)[0]
  loss, g = jax.jit(jax.value_and_grad(
      lambda p: fn(Logps(**{**lp.__dict__, "policy_tok": p}))[0]))(lp.policy_tok)
  np.testing.assert_allclose(float(loss), float(eager), rtol=1e-6)
  assert np.all(np.isfinite(g)) and np.any(g != 0)
  assert np.all(np.asarray(g)[d["mask"] == 0] == 0)  # nothing leaks off the mask
  if name == "cispo":
    return  # a surrogate by design: its gradient is not its value's (tested above)
  # The entropy term is a surrogate too (value -lp, gradient -(1 + lp)): check without it.
  fn = losses.bind(name, {"beta": 0.1})
  with jax.enable_x64(True):
    lp64 = make_lp(d, jnp.float64)
    check_grads(lambda p: fn(Logps(**{**lp64.__dict__, "policy_tok": p}))[0],
                (lp64.policy_tok,), order=1, modes=["rev"], atol=1e-5, rtol=1e-4)


def test_bad_inputs_are_named():
  d = rollout(6)
  with pytest.raises(ValueError, match="ref_tok"):
    losses.get("grpo")(make_lp(d, ref=None), beta=0.1)
  assert float(losses.get("grpo")(make_lp(d, ref=None), beta=0.0)[1]["kl/mean"]) == 0.0
  with pytest.raises(ValueError, match="kl_estimator"):
    losses.get("dapo")(make_lp(d), beta=0.1, kl_estimator="k4")
  with pytest.raises(ValueError, match="advantages"):
    losses.get("cispo")(make_lp(d, adv=None))
