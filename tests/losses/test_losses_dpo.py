"""DPO / cDPO against a float64 numpy reference written from the formula, and its properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref import losses
from jaxpref.types import Logps


def make_lp(policy, ref, weight=None):
  policy = jnp.asarray(policy, jnp.float32)
  b = policy.shape[0]
  return Logps(policy=policy, ref=jnp.asarray(ref, jnp.float32),
               length=jnp.ones_like(policy), valid=jnp.ones(policy.shape, bool),
               weight=jnp.ones(b) if weight is None else jnp.asarray(weight, jnp.float32))


def np_dpo(policy, ref, beta, eps, weight):
  policy, ref, weight = (np.asarray(a, np.float64) for a in (policy, ref, weight))
  h = (policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1])
  logsig = lambda z: -np.log1p(np.exp(-z))
  per = -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h)
  return np.sum(per * weight) / np.sum(weight)


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2), (2.0, 0.1)])
def test_dpo_matches_numpy_reference(beta, eps):
  rng = np.random.default_rng(0)
  policy = rng.normal(-20, 5, (16, 2))
  ref = rng.normal(-20, 5, (16, 2))
  weight = rng.uniform(0, 2, 16)
  loss, metrics = jax.jit(losses.bind("dpo", {"beta": beta, "label_smoothing": eps}))(
      make_lp(policy, ref, weight))
  np.testing.assert_allclose(loss, np_dpo(policy, ref, beta, eps, weight), rtol=1e-5)
  rewards = beta * (policy - ref)
  np.testing.assert_allclose(metrics["rewards/margin"],
                             np.sum((rewards[:, 0] - rewards[:, 1]) * weight) / weight.sum(),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(metrics["logps/chosen"],
                             np.sum(policy[:, 0] * weight) / weight.sum(), rtol=1e-5)


def test_dpo_at_reference_is_log2_and_accuracy_is_chance():
  lp = make_lp(np.full((4, 2), -3.0), np.full((4, 2), -3.0))
  loss, metrics = losses.get("dpo")(lp)
  np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
  assert float(metrics["rewards/accuracy"]) == 0.5


def test_dpo_gradient_signs_and_closed_form():
  # dl/dh = -beta * sig(-beta h): raises the chosen log-prob, lowers the rejected one.
  beta = 0.3
  policy = jnp.array([[-5.0, -4.0]])
  ref = jnp.array([[-6.0, -3.0]])
  grad = jax.grad(lambda p: losses.get("dpo")(make_lp(p, ref), beta=beta)[0])(policy)
  h = (-5.0 + 6.0) - (-4.0 + 3.0)
  expected = -beta / (1 + np.exp(beta * h))
  np.testing.assert_allclose(grad[0, 0], expected, rtol=1e-6)
  np.testing.assert_allclose(grad[0, 1], -expected, rtol=1e-6)
  assert grad[0, 0] < 0 < grad[0, 1]


def test_label_smoothing_has_finite_minimum():
  # cDPO's per-pair loss is minimised at beta*h = log((1-eps)/eps), not at infinity.
  eps, beta = 0.2, 1.0
  hs = jnp.linspace(-10, 10, 2001)
  vals = jax.vmap(lambda h: losses.get("dpo")(
      make_lp(jnp.array([[h, 0.0]]), jnp.zeros((1, 2))), beta=beta, label_smoothing=eps)[0])(hs)
  np.testing.assert_allclose(hs[jnp.argmin(vals)], np.log((1 - eps) / eps), atol=0.02)


def test_zero_weight_groups_are_ignored():
  policy = np.array([[-1.0, -2.0], [-50.0, 10.0]])
  ref = np.zeros((2, 2))
  full, _ = losses.get("dpo")(make_lp(policy[:1], ref[:1]))
  padded, m = losses.get("dpo")(make_lp(policy, ref, weight=[1.0, 0.0]))
  np.testing.assert_allclose(padded, full, rtol=1e-6)
  assert float(m["rewards/accuracy"]) == 1.0


def test_registry_lists_and_rejects():
  assert "dpo" in losses.names()
  assert losses.hparams("dpo") == {"beta": 0.1, "label_smoothing": 0.0, "margin": 0.0,
                                  "score_margin": 0.0}
  with pytest.raises(ValueError, match=r"no hyperparameter 'gamma'.*beta=0.1"):
    losses.bind("dpo", {"gamma": 1.0})
  with pytest.raises(ValueError, match="unknown loss 'dpoo'.*dpo"):
    losses.get("dpoo")


def test_user_registered_loss_is_selectable():
  @losses.register("test_only_margin")
  def margin_loss(lp, *, scale: float = 1.0):
    return -scale * jnp.mean(lp.policy[:, 0] - lp.policy[:, 1]), {}

  loss, _ = losses.bind("test_only_margin", {"scale": 2.0})(make_lp([[1.0, 0.0]], [[0.0, 0.0]]))
  assert float(loss) == -2.0
  with pytest.raises(TypeError, match="keyword-only"):
    losses.register("bad")(lambda lp, beta: 0.0)
