"""The train step's log-prob paths (fused LM head, each kernel) agree on a real model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpref import models
from jaxpref.data import shared_prompt
from jaxpref.models.logps import LogpsOptions, token_logps
from jaxpref.ops import vocab_log_prob_sq
from jaxpref.types import GroupBatch


def _batch(b=2, k=2, t=12, v=97, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, v, (b, k, t)).astype(np.int32)
  loss_mask = np.zeros((b, k, t), np.float32)
  loss_mask[..., 5:10] = 1  # prompt 0..4, response 5..9, padding after
  segment_ids = np.zeros((b, k, t), np.int32)
  segment_ids[..., :10] = 1
  return GroupBatch(tokens=jnp.asarray(tokens), loss_mask=jnp.asarray(loss_mask),
                    segment_ids=jnp.asarray(segment_ids), valid=jnp.ones((b, k), bool),
                    weight=jnp.ones((b,), jnp.float32))


@pytest.mark.parametrize("opts", [
    LogpsOptions(impl="xla", fused_lm_head=False),
    LogpsOptions(impl="pallas", fused_lm_head=False),
    LogpsOptions(fused_lm_head=True),
], ids=["xla", "pallas", "fused"])
@pytest.mark.slow  # over 10 s on 2 cores: kept out of the fast tier
def test_paths_match_naive_values_and_gradients(opts):
  cfg = models.get_config("tiny", vocab_size=97)
  graphdef, params = nnx.split(models.Decoder(cfg, rngs=nnx.Rngs(0)))
  batch = _batch(v=97)
  loss = lambda p, o: jnp.sum(token_logps(graphdef, p, batch, o) * jnp.arange(12.0))
  want, want_g = jax.value_and_grad(loss)(params, LogpsOptions(impl="naive",
                                                               fused_lm_head=False))
  got, got_g = jax.value_and_grad(loss)(params, opts)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # float32 sum order
  tok = token_logps(graphdef, params, batch, opts)
  assert np.all(np.asarray(tok)[np.asarray(batch.loss_mask) == 0] == 0)


def _log_prob_sq(logits):
  """float64 log sum_v softmax(z)_v^2 along the last axis."""
  z = np.asarray(logits, np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.log((p ** 2).sum(-1))


def test_vocab_log_prob_sq_streams_chunks_and_a_tail():
  rng = np.random.default_rng(1)
  h, w = rng.normal(size=(6, 8)), rng.normal(size=(8, 37)) * 3
  want = _log_prob_sq(h @ w)
  for chunk in (8, 37, 4096):  # 4 chunks + a tail of 5; one chunk; the tail alone
    got = vocab_log_prob_sq(jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32), chunk=chunk)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  capped = vocab_log_prob_sq(jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32), softcap=2.0,
                             chunk=8)
  np.testing.assert_allclose(capped, _log_prob_sq(2.0 * np.tanh(h @ w / 2.0)), rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(want) <= 0) and np.all(np.asarray(want) >= -np.log(37) - 1e-9)


@pytest.mark.parametrize("fused", [True, False])
def test_prob_sq_sums_the_masked_tokens_on_every_layout(fused):
  """WPO's alignment term from the step: per response, the sum over its masked tokens of
  log sum_v pi(v|t)^2 at the position that predicts the token; the shared-prompt layout
  gives the same sums."""
  cfg = models.get_config("tiny", vocab_size=97)
  graphdef, params = nnx.split(models.Decoder(cfg, rngs=nnx.Rngs(0)))
  batch = _batch(v=97)
  tokens = np.asarray(batch.tokens).copy()
  tokens[:, 1, :5] = tokens[:, 0, :5]  # the two members share their prompt
  batch = GroupBatch(**{**batch.__dict__, "tokens": jnp.asarray(tokens)})
  opts = LogpsOptions(fused_lm_head=fused)
  logp, sq = token_logps(graphdef, params, batch, opts, prob_sq=True)
  np.testing.assert_allclose(logp, token_logps(graphdef, params, batch, opts), rtol=1e-6)
  logits = nnx.merge(graphdef, params)(jnp.asarray(tokens.reshape(4, 12)))
  per = _log_prob_sq(logits)[:, :-1] * np.asarray(batch.loss_mask).reshape(4, 12)[:, 1:]
  np.testing.assert_allclose(sq, per.sum(-1).reshape(2, 2), rtol=1e-5)
  assert np.all(np.asarray(sq) < 0)
  packed = shared_prompt.pack(jax.tree.map(np.asarray, batch))
  _, packed_sq = token_logps(graphdef, params, packed, opts, prob_sq=True)
  np.testing.assert_allclose(packed_sq, sq, rtol=1e-4)
