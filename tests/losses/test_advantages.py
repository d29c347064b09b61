"""Advantage estimators (jaxpref/losses/advantages.py) against hand computations."""

import jax
import numpy as np
import pytest

import jaxpref.losses  # noqa: F401  (registers the estimators through the package)
from jaxpref.losses import advantages as adv

SCORES = np.array([[1.0, 0.0, 0.0, 1.0],
                   [2.0, 4.0, 6.0, 100.0],  # last response padded
                   [3.0, 3.0, 3.0, 3.0]])
VALID = np.array([[True, True, True, True],
                  [True, True, True, False],
                  [True, True, True, True]])


def test_registry():
  assert adv.names() == ["grpo", "plain", "reinforce_pp", "rloo"]
  with pytest.raises(ValueError, match="unknown advantage estimator 'gae'.*rloo"):
    adv.get("gae")
  with pytest.raises(ValueError, match=r"\[B, K\]"):
    adv.compute("plain", np.zeros(3), np.ones(3, bool))


def test_grpo_group_scale_by_hand():
  a = np.asarray(adv.compute("grpo", SCORES, VALID))
  # Group 0: mean 0.5, Bessel std sqrt(4 * 0.25 / 3) = 0.57735.
  s0 = np.sqrt(1.0 / 3.0)
  np.testing.assert_allclose(a[0], np.array([0.5, -0.5, -0.5, 0.5]) / (s0 + 1e-4), rtol=1e-6)
  # Group 1: valid (2, 4, 6), mean 4, std 2; the padded 100 is ignored and gets 0.
  np.testing.assert_allclose(a[1], [-2 / 2.0001, 0.0, 2 / 2.0001, 0.0], rtol=1e-6)
  # Equal scores: 0, not 0 / 0.
  np.testing.assert_array_equal(a[2], np.zeros(4))


def test_grpo_batch_and_none_scales():
  a = np.asarray(adv.compute("grpo", SCORES, VALID, scale="none"))
  np.testing.assert_allclose(a[1], [-2.0, 0.0, 2.0, 0.0])
  np.testing.assert_allclose(a[0], [0.5, -0.5, -0.5, 0.5])
  b = np.asarray(adv.compute("grpo", SCORES, VALID, scale="batch", eps=0.0))
  pooled = SCORES[VALID]  # 11 valid scores
  std = np.std(pooled, ddof=1)
  np.testing.assert_allclose(b, a / std, rtol=1e-5)
  with pytest.raises(ValueError, match="scale"):
    adv.compute("grpo", SCORES, VALID, scale="global")


def test_rloo_leave_one_out():
  a = np.asarray(adv.compute("rloo", SCORES, VALID))
  # Response 0 of group 1: 2 - mean(4, 6) = -3; response 2: 6 - mean(2, 4) = 3.
  np.testing.assert_allclose(a[1], [-3.0, 0.0, 3.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(a[0], [1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3], rtol=1e-6)
  single = np.asarray(adv.compute("rloo", [[5.0, 1.0]], [[True, False]]))
  np.testing.assert_array_equal(single, [[0.0, 0.0]])  # no other response, no baseline


def test_reinforce_pp_batch_normalised():
  a = np.asarray(adv.compute("reinforce_pp", SCORES, VALID))
  pooled = SCORES[VALID]
  want = (SCORES - pooled.mean()) / (pooled.std() + 1e-8) * VALID
  np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-6)
  assert abs(a[VALID].mean()) < 1e-6 and abs(a[VALID].std() - 1.0) < 1e-5
  g = np.asarray(adv.compute("reinforce_pp", SCORES, VALID, group_baseline=True))
  centred = np.where(VALID, SCORES - np.array([0.5, 4.0, 3.0])[:, None], 0.0)
  c = centred[VALID]
  np.testing.assert_allclose(g[VALID], (c - c.mean()) / (c.std() + 1e-8), rtol=1e-5, atol=1e-6)


def test_plain_and_jit():
  np.testing.assert_array_equal(adv.compute("plain", SCORES, VALID), SCORES * VALID)
  jitted = jax.jit(lambda s, v: adv.get("grpo")(s, v, scale="group"))
  np.testing.assert_allclose(jitted(SCORES.astype(np.float32), VALID),
                             adv.compute("grpo", SCORES, VALID), rtol=1e-6)


def test_dynamic_sampling_zero_variance_groups():
  scores = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 7.0], [2.0, 5.0, 9.0]])
  valid = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0]], bool)
  zero = np.asarray(adv.zero_variance_groups(scores, valid))
  # All equal; spread; equal once the padded 7 is ignored; a single valid response.
  np.testing.assert_array_equal(zero, [True, False, True, True])
  keep, frac = adv.dynamic_sampling(scores, valid)
  np.testing.assert_array_equal(keep, ~zero)
  assert float(frac) == 0.75
  _, frac = adv.dynamic_sampling(scores, valid, weight=np.array([1.0, 1.0, 0.0, 0.0]))
  assert float(frac) == 0.5  # padded groups do not count
  assert bool(adv.zero_variance_groups([[1.0, 1.0001]], [[True, True]], atol=1e-3)[0])
  assert not bool(adv.zero_variance_groups([[1.0, 1.0001]], [[True, True]])[0])
