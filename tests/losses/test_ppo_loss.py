"""The registered `ppo` loss (jaxpref/losses/ppo_loss.py) against a float64 numpy reference
written from PPO's formulas: the clipped surrogate on both sides of the clip range, the
clipped value loss, group weights and padded responses, and their gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref import losses
from jaxpref.types import Logps


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _case(seed=0, b=3, k=2, t=10):
  """Per-token inputs [B, K, T] with each kind of token present: ratios inside and
  outside [1 - eps, 1 + eps] under advantages of both signs, values inside and outside
  the value clip; group 2 has weight 0 and response (0, 1) is padding."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((b, k, t))
  mask[:, :, 2:9] = 1.0
  mask[1, 0, 8] = 0.0
  old = rng.normal(-2.0, 0.5, (b, k, t))
  # log-ratios over [-0.8, 0.8]: c from 0.45 to 2.2, on both sides of every clip range here
  lp = old + rng.uniform(-0.8, 0.8, (b, k, t))
  adv = rng.normal(0.0, 1.0, (b, k, t))
  old_v = rng.normal(0.5, 0.5, (b, k, t))
  values = old_v + rng.uniform(-0.5, 0.5, (b, k, t))
  returns = rng.normal(1.0, 1.0, (b, k, t))
  valid = np.array([[True, False], [True, True], [True, True]])
  weight = np.array([1.0, 2.0, 0.0])
  return lp, old, adv, values, old_v, returns, mask * (mask > 0), valid, weight


def ppo_ref(lp, old, adv, values, old_v, returns, mask, valid, weight, eps, vclip, vf):
  """(loss, dloss/dlp, dloss/dvalues) in float64 from the formulas."""
  m = mask * (weight[:, None] * valid)[..., None]
  n = m.sum()
  c = np.exp(lp - old)
  unclipped, clipped = -adv * c, -adv * np.clip(c, 1 - eps, 1 + eps)
  pg = np.maximum(unclipped, clipped)
  v_clip = old_v + np.clip(values - old_v, -vclip, vclip)
  se, se_clip = (values - returns) ** 2, (v_clip - returns) ** 2
  vl = 0.5 * np.maximum(se, se_clip)
  loss = (pg * m).sum() / n + vf * (vl * m).sum() / n
  # The surrogate's gradient flows through the unclipped term when it is the larger one.
  d_lp = np.where(unclipped >= clipped, -adv * c, 0.0) * m / n
  d_v = np.where(se >= se_clip, values - returns,
                 (v_clip - returns) * (np.abs(values - old_v) < vclip)) * vf * m / n
  return loss, d_lp, d_v


def _logps(lp, old, adv, values, old_v, returns, mask, valid, weight):
  j = jnp.asarray
  return Logps(policy=j(lp.sum(-1)), ref=j(np.zeros(lp.shape[:2])), length=j(mask.sum(-1)),
               valid=j(valid), weight=j(weight), policy_tok=j(lp), mask=j(mask),
               old_tok=j(old), values=j(values), old_values=j(old_v), adv_tok=j(adv),
               returns=j(returns))


@pytest.mark.parametrize("eps,vclip,vf", [(0.2, 0.2, 0.1), (0.1, 0.05, 1.0), (0.3, 1.0, 0.5)])
def test_ppo_loss_and_gradients_match_reference(eps, vclip, vf):
  case = _case()
  lp, old, adv, values, old_v, returns, mask, valid, weight = case
  c = np.exp(lp - old)
  on = mask > 0
  for side in ((c > 1 + eps) & (adv > 0), (c > 1 + eps) & (adv < 0),
               (c < 1 - eps) & (adv > 0), (c < 1 - eps) & (adv < 0)):
    assert np.any(side & on)  # every side of the clip is exercised
  assert np.any((np.abs(values - old_v) > vclip) & on) or vclip >= 0.5
  fn = losses.bind("ppo", {"epsilon": eps, "value_clip": vclip, "vf_coef": vf})

  def total(lp_, v_):
    base = _logps(*case)
    import dataclasses
    return fn(dataclasses.replace(base, policy_tok=lp_, values=v_))[0]

  loss, (g_lp, g_v) = jax.value_and_grad(total, argnums=(0, 1))(jnp.asarray(lp),
                                                                jnp.asarray(values))
  want, want_lp, want_v = ppo_ref(*case, eps, vclip, vf)
  assert loss.dtype == jnp.float64
  np.testing.assert_allclose(loss, want, rtol=1e-12)
  np.testing.assert_allclose(g_lp, want_lp, rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(g_v, want_v, rtol=1e-10, atol=1e-14)
  assert np.all(np.asarray(g_lp)[2] == 0) and np.all(np.asarray(g_lp)[0, 1] == 0)


def test_ppo_at_ratio_one_is_minus_the_mean_advantage_plus_the_value_term():
  lp, _, adv, values, old_v, returns, mask, valid, weight = _case(1)
  lp_ = _logps(lp, lp, adv, old_v, old_v, returns, mask, valid, weight)
  loss, metrics = losses.get("ppo")(lp_)
  m = mask * (weight[:, None] * valid)[..., None]
  np.testing.assert_allclose(metrics["loss/policy"], -(adv * m).sum() / m.sum(), rtol=1e-12)
  np.testing.assert_allclose(metrics["loss/value"],
                             (0.5 * (old_v - returns) ** 2 * m).sum() / m.sum(), rtol=1e-12)
  np.testing.assert_allclose(loss, metrics["loss/policy"] + 0.1 * metrics["loss/value"],
                             rtol=1e-12)
  assert float(metrics["clip/fraction"]) == 0.0


def test_ppo_without_its_value_fields_names_them():
  lp, old, adv, values, old_v, returns, mask, valid, weight = _case()
  import dataclasses
  bare = dataclasses.replace(_logps(lp, old, adv, values, old_v, returns, mask, valid, weight),
                             values=None)
  with pytest.raises(ValueError, match="Logps.values"):
    losses.get("ppo")(bare)
