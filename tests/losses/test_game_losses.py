"""Nash-MD and XPO (jaxpref/losses/game.py) against float64 numpy references written from
TRL's formulas one response at a time (never calling the losses), with their gradients'
signs: raising the log-prob of a response that wins lowers Nash-MD's loss, and raising the
log-prob of a reference sample raises XPO's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref import losses
from jaxpref.types import Logps


def rollout(seed, b=4, k=3, t=9):
  rng = np.random.default_rng(seed)
  mask = np.zeros((b, k, t))
  for i in range(b):
    for j in range(k):
      start = rng.integers(1, 4)
      mask[i, j, start:start + rng.integers(1, t - 3)] = 1.0
  pol = -rng.uniform(0.05, 3.0, (b, k, t)) * mask
  ref = (pol + rng.normal(0, 0.5, (b, k, t))) * mask
  valid = np.ones((b, k), bool)
  valid[0, k - 1] = False
  weight = rng.uniform(0.5, 2.0, b)
  weight[-1] = 0.0
  return dict(pol=pol, ref=ref, mask=mask, valid=valid, weight=weight,
              scores=rng.uniform(0, 1, (b, k)))


def make_lp(d, pol=None):
  a = lambda x: jnp.asarray(x, jnp.float32)
  pol = (a(d["pol"]) if pol is None else pol) * a(d["mask"])  # as the forward: 0 off the mask
  return Logps(policy=pol.sum(-1), ref=a(d["ref"]).sum(-1), length=a(d["mask"]).sum(-1),
               valid=jnp.asarray(d["valid"]), weight=a(d["weight"]), scores=a(d["scores"]),
               policy_tok=pol, ref_tok=a(d["ref"]), mask=a(d["mask"]))


def np_nash_md(d, beta):
  """(loss, d loss / d lp [B, K, T]) in float64: per valid response,
  beta sum_t (lp_t - ref_t) lp_t - (P - 1/2) sum_t lp_t, weighted mean."""
  b, k, t = d["pol"].shape
  num, den, grad_num = 0.0, 0.0, np.zeros((b, k, t))
  for i in range(b):
    for j in range(k):
      w = d["weight"][i] * float(d["valid"][i, j])
      m = d["mask"][i, j]
      lp, rf, p = d["pol"][i, j] * m, d["ref"][i, j] * m, d["scores"][i, j]
      num += w * (beta * np.sum((lp - rf) * lp) - (p - 0.5) * np.sum(lp))
      grad_num[i, j] = w * (beta * (lp - rf) - (p - 0.5)) * m  # the ratio carries no gradient
      den += w
  return num / den, grad_num / den


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.7])
def test_nash_md_matches_float64_reference(beta):
  d = rollout(0)
  fn = losses.get("nash_md")
  loss, metrics = fn(make_lp(d), beta=beta)
  want, want_grad = np_nash_md(d, beta)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
  grad = jax.grad(lambda p: fn(make_lp(d, p), beta=beta)[0])(jnp.asarray(d["pol"], jnp.float32))
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-6)
  w = d["weight"][:, None] * d["valid"]
  kl = ((d["pol"] - d["ref"]) * d["mask"]).sum(-1)
  np.testing.assert_allclose(float(metrics["kl/mean"]), (kl * w).sum() / w.sum(), rtol=1e-5)


def test_nash_md_gradient_sign_follows_the_preference():
  d = rollout(1)
  d["valid"][:] = True
  d["scores"][:] = 0.5
  d["scores"][1, 0], d["scores"][1, 1] = 0.9, 0.1  # response (1, 0) wins, (1, 1) loses
  fn = losses.get("nash_md")
  grad = np.asarray(jax.grad(lambda p: fn(make_lp(d, p), beta=0.0)[0])(
      jnp.asarray(d["pol"], jnp.float32)))
  m = d["mask"].astype(bool)
  assert np.all(grad[1, 0][m[1, 0]] < 0)  # more log-prob on the winner: lower loss
  assert np.all(grad[1, 1][m[1, 1]] > 0)
  assert np.all(grad[0][m[0]] == 0)  # a tie (P = 1/2) has no policy-gradient signal


def np_xpo(d, beta, alpha, loss_type):
  """TRL's XPO with index 0 chosen, 1 rejected, 2.. reference samples; a tie has no DPO term."""
  b = d["pol"].shape[0]
  pol, ref = (d["pol"] * d["mask"]).sum(-1), (d["ref"] * d["mask"]).sum(-1)
  total, grad = 0.0, np.zeros(pol.shape)
  n = d["weight"].sum()
  for i in range(b):
    w = d["weight"][i]
    if d["valid"][i, 0] and d["valid"][i, 1] and d["scores"][i, 0] > d["scores"][i, 1]:
      h = (pol[i, 0] - ref[i, 0]) - (pol[i, 1] - ref[i, 1])
      if loss_type == "sigmoid":
        total += w * np.log1p(np.exp(-beta * h))
        g = -beta / (1 + np.exp(beta * h))  # d/dh of -log sigmoid(beta h)
      else:
        total += w * (h - 1 / (2 * beta)) ** 2
        g = 2 * (h - 1 / (2 * beta))
      grad[i, 0], grad[i, 1] = w * g, -w * g
    for j in range(2, pol.shape[1]):
      if d["valid"][i, j]:
        total += w * alpha * pol[i, j]
        grad[i, j] = w * alpha
  return total / n, grad / n


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_xpo_matches_float64_reference(loss_type):
  d = rollout(2, k=4)
  d["scores"][2, 1] = d["scores"][2, 0]  # a tie
  beta, alpha = 0.3, 0.05
  fn = losses.get("xpo")
  want, want_grad = np_xpo(d, beta, alpha, loss_type)
  kw = dict(beta=beta, alpha=alpha, loss_type=loss_type)
  loss, metrics = fn(make_lp(d), **kw)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
  # d loss / d lp_t is the sequence gradient on every masked token.
  grad = jax.grad(lambda p: fn(make_lp(d, p), **kw)[0])(jnp.asarray(d["pol"], jnp.float32))
  np.testing.assert_allclose(np.asarray(grad), want_grad[..., None] * d["mask"], rtol=1e-5,
                             atol=1e-7)
  on = (d["mask"] > 0) & d["valid"][..., None] & (d["weight"][:, None, None] > 0)
  assert np.all(np.asarray(grad)[:, 2:][on[:, 2:]] > 0)  # explore: away from ref's samples
  assert float(metrics["loss/xpo"]) == pytest.approx(
      alpha * sum(d["weight"][i] * (d["pol"][i, j] * d["mask"][i, j]).sum()
                  for i in range(4) for j in (2, 3) if d["valid"][i, j]) / d["weight"].sum(),
      rel=1e-5)


def test_xpo_refuses_a_group_without_reference_samples():
  d = rollout(3, k=2)
  with pytest.raises(ValueError, match="K >= 3"):
    losses.get("xpo")(make_lp(d))
