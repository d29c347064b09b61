"""`bt_contrastive` (Secrets of RLHF II, SimCSE variant; docs/reward_models.md#bt_contrastive): float64 numpy references
written from the formula, finite-difference gradients and its stated properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxpref import losses
from jaxpref.losses.reward import simcse_infonce
from jaxpref.types import RewardOutputs


def ref_infonce(z1, z2, w, temperature):
  """-log [exp(s_ii) / sum_{j: w_j > 0} exp(s_ij)], s_ij = cos(z1_i, z2_j)/T, weighted mean."""
  b = len(w)
  per = np.zeros(b)
  for i in range(b):
    s = [z1[i] @ z2[j] / np.linalg.norm(z1[i]) / np.linalg.norm(z2[j]) / temperature
         for j in range(b)]
    denom = sum(np.exp(s[j]) for j in range(b) if w[j] > 0)
    per[i] = -(s[i] - np.log(denom)) if w[i] > 0 else 0.0
  return float((per * w).sum() / w.sum())


def ref_bt_contrastive(v, w, contrastive_weight=0.1, temperature=0.05, tau=1.0):
  """With dropout 0 the two views are z itself."""
  r = v[..., 0]
  bt = np.log1p(np.exp(-(r[:, 0] - r[:, 1]) / tau))
  z = v[:, 0, 1:] - v[:, 1, 1:]
  return float((bt * w).sum() / w.sum()) + contrastive_weight * ref_infonce(z, z, w, temperature)


def make_lp(v, w, dtype=jnp.float64):
  b = len(w)
  zeros = jnp.zeros((b, 2), dtype)
  return RewardOutputs(reward=zeros, length=jnp.ones((b, 2), dtype),
                       valid=jnp.ones((b, 2), bool), weight=jnp.asarray(w, dtype),
                       embed=jnp.asarray(v, dtype))


def inputs(seed, b=8, e=6):
  rng = np.random.default_rng(seed)
  v = rng.normal(0, 1.0, (b, 2, e))
  w = rng.uniform(0.5, 2.0, b)
  w[:2] = 0.0  # padded pairs: neither anchors nor negatives
  return v, w


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize("temperature", [0.05, 0.5, 2.0])
def test_infonce_matches_reference(temperature):
  rng = np.random.default_rng(1)
  z1, z2 = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
  w = rng.uniform(0.5, 2.0, 7)
  w[3] = 0.0
  got = simcse_infonce(jnp.asarray(z1), jnp.asarray(z2), jnp.asarray(w), temperature)
  assert float(got) == pytest.approx(ref_infonce(z1, z2, w, temperature), rel=1e-10)


@pytest.mark.parametrize("hp", [{}, {"contrastive_weight": 1.0, "temperature": 0.5, "tau": 2.0}])
def test_bt_contrastive_without_dropout_matches_reference(hp):
  v, w = inputs(0)
  loss, metrics = losses.bind("bt_contrastive", {"dropout": 0.0, **hp})(make_lp(v, w))
  assert float(loss) == pytest.approx(ref_bt_contrastive(v, w, **hp), rel=1e-10)
  r = v[..., 0]
  acc = ((r[:, 0] > r[:, 1]) * w).sum() / w.sum()
  assert float(metrics["rewards/accuracy"]) == pytest.approx(acc)
  assert float(metrics["loss/contrastive"]) > 0


def test_gradients_match_finite_differences():
  v, w = inputs(2)
  fn = losses.bind("bt_contrastive", {"dropout": 0.0, "contrastive_weight": 0.5,
                                      "temperature": 0.5})
  check_grads(lambda e: fn(make_lp(e, w))[0], (jnp.asarray(v),), order=1, modes=["rev"],
              atol=1e-5, rtol=1e-5)
  # With dropout the masks are drawn from the values (fresh per batch), so the loss is
  # piecewise; the InfoNCE of two fixed views is smooth in both.
  z = jnp.asarray(np.random.default_rng(3).normal(size=(5, 4)))
  wz = jnp.asarray([1.0, 0.5, 2.0, 0.0, 1.0])
  check_grads(lambda a, b: simcse_infonce(a, b, wz, 0.3), (z, z + 0.1), order=1,
              modes=["rev"], atol=1e-6, rtol=1e-6)


def test_properties():
  v, w = inputs(4)
  fn = lambda **hp: losses.bind("bt_contrastive", {"dropout": 0.0, **hp})(make_lp(v, w))
  # Weight 0 is plain BT (-logsig(dr/tau)).
  r = v[..., 0]
  bt = float((np.log1p(np.exp(-(r[:, 0] - r[:, 1]))) * w).sum() / w.sum())
  assert float(fn(contrastive_weight=0.0)[0]) == pytest.approx(bt, rel=1e-10)
  # The representation channels do not move the reward metrics; the reward channel does
  # not move the contrastive term.
  v2 = v.copy()
  v2[..., 1:] *= 3.0
  a, b = fn()[1], losses.bind("bt_contrastive", {"dropout": 0.0})(make_lp(v2, w))[1]
  assert float(a["rewards/margin"]) == pytest.approx(float(b["rewards/margin"]))
  assert float(a["loss/contrastive"]) == pytest.approx(float(b["loss/contrastive"]))  # cosine
  # InfoNCE: well-separated pair differences (one-hot directions) at a low temperature
  # give a loss near 0; identical ones give log(number of real pairs).
  zs = np.eye(4)
  assert ref_infonce(zs, zs, np.ones(4), 0.01) < 1e-6
  same = jnp.ones((4, 3))
  assert float(simcse_infonce(same, same, jnp.ones(4), 0.1)) == pytest.approx(np.log(4))
  # Padded pairs count neither as anchors nor negatives.
  got = float(simcse_infonce(same, same, jnp.asarray([1.0, 1.0, 0.0, 0.0]), 0.1))
  assert got == pytest.approx(np.log(2))


def test_dropout_views_differ_and_are_deterministic():
  v, w = inputs(5)
  fn = losses.bind("bt_contrastive", {"dropout": 0.5})
  l1, m1 = fn(make_lp(v, w))
  l2, _ = fn(make_lp(v, w))
  _, m0 = losses.bind("bt_contrastive", {"dropout": 0.0})(make_lp(v, w))
  assert float(l1) == float(l2)  # same batch, same views
  assert float(m1["loss/contrastive"]) != pytest.approx(float(m0["loss/contrastive"]))


def test_errors():
  v, w = inputs(0)
  zeros = jnp.zeros((8, 2))
  lp = RewardOutputs(reward=zeros, length=zeros, valid=jnp.ones((8, 2), bool),
                     weight=jnp.asarray(w))
  with pytest.raises(ValueError, match="--reward_dim=2k"):
    losses.bind("bt_contrastive", {})(lp)
  with pytest.raises(ValueError, match="dropout"):
    losses.bind("bt_contrastive", {"dropout": 1.0})(make_lp(v, w))
