"""Losses on per-token log-probs, against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import loss_refs as R
from jaxpref import losses
from jaxpref.types import Logps


def token_inputs(seed, b=8, t=12):
  rng = np.random.default_rng(seed)
  mask = np.zeros((b, 2, t))
  for i in range(b):
    for k in range(2):
      start, n = rng.integers(1, 4), rng.integers(1, t - 4)
      mask[i, k, start:start + n] = 1.0
  policy_tok = -rng.uniform(0.1, 5.0, (b, 2, t)) * mask
  ref = -rng.uniform(0.1, 5.0, (b, 2, t)) * mask
  weight = rng.uniform(0.5, 2, b)
  return policy_tok, ref.sum(-1), mask, weight


def make_lp(policy_tok, ref, mask, weight, dtype=jnp.float32):
  policy_tok = jnp.asarray(policy_tok, dtype)
  mask = jnp.asarray(mask, dtype)
  return Logps(policy=policy_tok.sum(-1), ref=jnp.asarray(ref, dtype), length=mask.sum(-1),
               valid=jnp.ones(ref.shape, bool), weight=jnp.asarray(weight, dtype),
               policy_tok=policy_tok, ref_tok=jnp.zeros_like(policy_tok), mask=mask)


@pytest.mark.parametrize("hp", [{}, {"ld_alpha": 0.0, "beta": 0.5}, {"label_smoothing": 0.1}])
def test_ld_dpo_matches_numpy_and_grads(hp):
  policy_tok, ref, mask, weight = token_inputs(0)
  loss, _ = jax.jit(losses.bind("ld_dpo", hp))(make_lp(policy_tok, ref, mask, weight))
  np.testing.assert_allclose(float(loss), R.ld_dpo(policy_tok, ref, mask, weight, **hp), rtol=1e-5)
  with jax.enable_x64(True):
    lp = make_lp(policy_tok, ref, mask, weight, jnp.float64)
    fn = losses.bind("ld_dpo", hp)
    check_grads(lambda p: fn(Logps(**{**lp.__dict__, "policy_tok": p}))[0], (lp.policy_tok,),
                order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_ld_dpo_reduces_to_dpo():
  policy_tok, ref, mask, weight = token_inputs(1)
  lp = make_lp(policy_tok, ref, mask, weight)
  np.testing.assert_allclose(losses.get("ld_dpo")(lp, ld_alpha=1.0)[0], losses.get("dpo")(lp)[0],
                             rtol=1e-6)
  # Equal lengths: no tail to down-weight, whatever ld_alpha.
  same = mask.copy()
  same[:, 1] = same[:, 0]
  lp = make_lp(policy_tok * same, ref, same, weight)
  np.testing.assert_allclose(losses.get("ld_dpo")(lp, ld_alpha=0.2)[0], losses.get("dpo")(lp)[0],
                             rtol=1e-6)


def test_registry_knows_which_losses_need_tokens():
  assert losses.needs_tokens("ld_dpo") and losses.needs_tokens("dpo+ld_dpo")
  assert not losses.needs_tokens("dpo")
