import jax
import jax.numpy as jnp
import numpy as np

from jaxpref import ops


def test_token_logps_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 7, 11))
  tokens = rng.integers(0, 11, (3, 7))
  got = ops.token_logps(jnp.asarray(logits, jnp.float32), jnp.asarray(tokens))
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  want = np.zeros((3, 7))
  for n in range(3):
    for t in range(1, 7):
      want[n, t] = logp[n, t - 1, tokens[n, t]]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  mask = (rng.uniform(size=(3, 7)) > 0.5).astype(np.float32)
  np.testing.assert_allclose(ops.masked_sum(got, mask), (want * mask).sum(-1), rtol=1e-5)


def test_token_logps_gradient_is_onehot_minus_softmax():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(1, 2, 5)), jnp.float32)
  tokens = jnp.array([[0, 3]])
  g = jax.grad(lambda l: ops.token_logps(l, tokens).sum())(logits)
  want = (-jax.nn.softmax(logits[0, 0])).at[3].add(1.0)
  np.testing.assert_allclose(g[0, 0], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g[0, 1], 0.0)
