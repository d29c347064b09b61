"""The train step's log-prob paths (fused LM head, each kernel) agree on a real model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpref import models
from jaxpref.train.config import LogpsOptions
from jaxpref.train.policy_step import token_logps
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
