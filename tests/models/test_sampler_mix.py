"""Geometric-mixture sampling (Nash-MD): beta 0 samples the policy's tokens, beta 1 the
reference's, and in between each step's logits are the float64 mixture of the two models'
logits (each from a full forward pass over the sampled tokens)."""

import jax
import numpy as np
import pytest

from jaxpref.models import sampler
from tests.models.test_sampler import full_logits, make, prompts

LENS = np.array([6, 2, 4])


def _run(policy, ref, beta, *, num_samples=1, return_logits=False, seed=3):
  mix = None if ref is None else (ref, beta)
  return sampler.generate(policy, prompts(), LENS, max_new_tokens=8, temperature=1.0,
                          rng=jax.random.key(seed), mix=mix, num_samples=num_samples,
                          return_logits=return_logits)


def test_mixture_endpoints_are_the_two_models():
  policy, ref = make(seed=0), make(seed=5)
  k = 2  # each prompt's cache copied for its samples: both caches are
  alone = np.asarray(_run(policy, None, 0.0, num_samples=k).tokens)
  ref_alone = np.asarray(_run(ref, None, 0.0, num_samples=k).tokens)
  assert not np.array_equal(alone, ref_alone)  # the test can tell the two apart
  np.testing.assert_array_equal(np.asarray(_run(policy, ref, 0.0, num_samples=k).tokens), alone)
  np.testing.assert_array_equal(np.asarray(_run(policy, ref, 1.0, num_samples=k).tokens),
                                ref_alone)


def test_mixture_logits_are_the_weighted_sum_of_both_models():
  policy, ref = make(seed=0), make(seed=5)
  beta = 0.3
  out = _run(policy, ref, beta, return_logits=True)
  tokens = np.asarray(out.tokens)
  lp = full_logits(policy, tokens).astype(np.float64)
  lr = full_logits(ref, tokens).astype(np.float64)
  want = (1 - beta) * lp + beta * lr
  got = np.asarray(out.logits, np.float64)
  for b in range(3):
    n = int(out.lengths[b]) - LENS[b]  # steps the row was live
    rows = want[b, LENS[b] - 1:LENS[b] - 1 + n]
    np.testing.assert_allclose(got[b, :n], rows, atol=2e-4, rtol=0)
    # Neither model alone: the mixture is a third distribution.
    assert np.abs(got[b, :n] - lp[b, LENS[b] - 1:LENS[b] - 1 + n]).max() > 1e-2


def test_mixture_beta_outside_unit_interval_is_refused():
  policy = make(seed=0)
  with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
    _run(policy, policy, 1.5)
