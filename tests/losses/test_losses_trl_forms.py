"""TRL's current forms as named options of our losses (docs/trl.md), against float64 numpy
written from TRL's formulas: bco_pair without delta, f_dpo with TRL's alpha coefficient,
ld_dpo weighting the reference's tail tokens too."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref import losses
from jaxpref.types import Logps

logsig = lambda z: -np.logaddexp(0.0, -z)


def pair_lp(seed=0, b=16):
  rng = np.random.default_rng(seed)
  policy, ref = rng.normal(-20, 4, (b, 2)), rng.normal(-20, 4, (b, 2))
  weight = rng.uniform(0, 2, b)
  lp = Logps(policy=jnp.asarray(policy, jnp.float32), ref=jnp.asarray(ref, jnp.float32),
             length=jnp.ones((b, 2)), valid=jnp.ones((b, 2), bool),
             weight=jnp.asarray(weight, jnp.float32))
  return lp, policy, ref, weight


def mean(per, w):
  return np.sum(per * w) / np.sum(w)


def test_bco_pair_without_delta_is_trls():
  lp, policy, ref, w = pair_lp()
  beta = 0.3
  r = beta * (policy - ref)
  want = mean(-logsig(r[:, 0]) - logsig(-r[:, 1]), w)
  loss, metrics = losses.bind("bco_pair", {"beta": beta, "delta": "none"})(lp)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert float(metrics["loss/delta"]) == 0.0
  batch, _ = losses.bind("bco_pair", {"beta": beta})(lp)  # the default keeps its batch delta
  assert abs(float(batch) - want) > 1e-3
  with pytest.raises(ValueError, match="delta must be"):
    losses.bind("bco_pair", {"delta": "running"})(lp)


@pytest.mark.parametrize("coef", [0.3, 0.5, 0.9, 1.0, 1.5])
def test_f_dpo_trl_convention_is_trls_alpha_divergence(coef):
  lp, _, _, w = pair_lp(1)
  # Log-ratios of a few nats, so exp((a - 1) rho) stays in range for every a.
  lp = dataclasses.replace(lp, policy=lp.policy / 8, ref=lp.ref / 8)
  beta = 0.2
  rho = np.asarray(lp.policy, np.float64) - np.asarray(lp.ref, np.float64)
  if coef == 1.0:  # TRL's limit case: reverse KL
    score = rho
  else:
    score = np.exp((coef - 1.0) * rho) / (coef - 1.0)
  want = mean(-logsig(beta * (score[:, 0] - score[:, 1])), w)
  hp = {"beta": beta, "divergence": "alpha_divergence", "alpha": coef, "convention": "trl"}
  loss, _ = jax.jit(losses.bind("f_dpo", hp))(lp)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  if coef < 1.0:  # ours at alpha = 1 - coef is the same loss
    ours, _ = losses.bind("f_dpo", {**hp, "convention": "jaxpref", "alpha": 1.0 - coef})(lp)
    np.testing.assert_allclose(ours, loss, rtol=1e-5)


def test_f_dpo_trl_convention_names():
  lp, *_ = pair_lp(2)
  fwd, _ = losses.bind("f_dpo", {"divergence": "forward_kl"})(lp)
  one, _ = losses.bind("f_dpo", {"divergence": "alpha_divergence", "alpha": 1.0})(lp)
  trl0, _ = losses.bind("f_dpo", {"divergence": "alpha_divergence", "alpha": 0.0,
                                  "convention": "trl"})(lp)
  np.testing.assert_allclose(fwd, one, rtol=1e-6)
  np.testing.assert_allclose(trl0, one, rtol=1e-6)  # TRL's a = 0 is forward KL
  with pytest.raises(ValueError, match="no label_smoothing"):
    losses.bind("f_dpo", {"convention": "trl", "label_smoothing": 0.1})(lp)


def token_lp(seed=3, b=8, t=12):
  rng = np.random.default_rng(seed)
  n = rng.integers(2, t + 1, (b, 2))
  mask = (np.arange(t)[None, None] < n[..., None]).astype(np.float64)
  pol, ref = rng.normal(-2, 1, (b, 2, t)) * mask, rng.normal(-2, 1, (b, 2, t)) * mask
  w = rng.uniform(0.5, 1.5, b)
  f = lambda x: jnp.asarray(x, jnp.float32)
  lp = Logps(policy=f(pol.sum(-1)), ref=f(ref.sum(-1)), length=f(n), valid=jnp.ones((b, 2), bool),
             weight=f(w), policy_tok=f(pol), ref_tok=f(ref), mask=f(mask))
  return lp, pol, ref, mask, n, w


@pytest.mark.parametrize("ref_weighted", [False, True])
def test_ld_dpo_weighting_the_reference_is_trls(ref_weighted):
  lp, pol, ref, mask, n, w = token_lp()
  beta, a = 0.5, 0.3
  shared = n.min(axis=1)[:, None, None]
  pos = np.cumsum(mask, -1)
  front, tail = mask * (pos <= shared), mask * (pos > shared)
  weigh = lambda x: (x * front).sum(-1) + a * (x * tail).sum(-1)
  ref_s = weigh(ref) if ref_weighted else ref.sum(-1)
  rho = weigh(pol) - ref_s
  want = mean(-logsig(beta * (rho[:, 0] - rho[:, 1])), w)
  hp = {"beta": beta, "ld_alpha": a, "ref_weighted": ref_weighted}
  loss, _ = jax.jit(losses.bind("ld_dpo", hp))(lp)
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_ld_dpo_ref_weighted_needs_token_reference():
  lp, *_ = token_lp()
  lp = dataclasses.replace(lp, ref_tok=None)
  with pytest.raises(ValueError, match="only sequence-level reference log-probs"):
    losses.bind("ld_dpo", {"ref_weighted": True})(lp)


def orpo_lp(seed=3, b=12):
  """Pairs with response and prompt log-prob sums and lengths (prompt_* as the step fills them)."""
  rng = np.random.default_rng(seed)
  length = rng.integers(2, 20, (b, 2)).astype(np.float64)
  policy = -rng.uniform(0.2, 2.0, (b, 2)) * length
  prompt_length = rng.integers(3, 30, (b, 2)).astype(np.float64)
  prompt = -rng.uniform(0.5, 4.0, (b, 2)) * prompt_length
  weight = np.ones(b)
  f = lambda x: jnp.asarray(x, jnp.float32)
  lp = Logps(policy=f(policy), ref=f(np.zeros((b, 2))), length=f(length),
             valid=jnp.ones((b, 2), bool), weight=f(weight), prompt_policy=f(prompt),
             prompt_length=f(prompt_length))
  return lp, policy, length, prompt, prompt_length


def test_orpo_sequence_nll_is_trls():
  """TRL's ORPOTrainer: NLL is the cross-entropy over every attended token of prompt +
  chosen, token mean over the batch; the odds ratio reads response-averaged log-probs."""
  lp, policy, length, prompt, prompt_length = orpo_lp()
  beta = 0.25
  a = policy / length
  log_odds = (a[:, 0] - a[:, 1]) - (np.log1p(-np.exp(a[:, 0])) - np.log1p(-np.exp(a[:, 1])))
  ratio = np.mean(logsig(log_odds))
  nll_seq = -np.sum(policy[:, 0] + prompt[:, 0]) / np.sum(length[:, 0] + prompt_length[:, 0])
  loss, metrics = losses.bind("orpo", {"beta": beta, "nll": "sequence"})(lp)
  np.testing.assert_allclose(loss, nll_seq - beta * ratio, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss/nll"], nll_seq, rtol=1e-5)
  paper, _ = losses.bind("orpo", {"beta": beta})(lp)  # the default: the response's tokens only
  nll_resp = -np.sum(policy[:, 0]) / np.sum(length[:, 0])
  np.testing.assert_allclose(paper, nll_resp - beta * ratio, rtol=1e-5)


def test_orpo_sequence_nll_needs_the_prompt_log_probs():
  lp = orpo_lp()[0]
  with pytest.raises(ValueError, match="--batching=pad or buckets"):
    losses.bind("orpo", {"nll": "sequence"})(dataclasses.replace(lp, prompt_policy=None))
  with pytest.raises(ValueError, match="nll must be one of"):
    losses.bind("orpo", {"nll": "prompt"})(lp)
