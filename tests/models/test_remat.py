"""--model.remat: same gradients, less memory kept for the backward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpref import models


def _loss_and_grad(remat):
  cfg = models.get_config("tiny", remat=remat, n_layers=4)
  graphdef, params = nnx.split(models.Decoder(cfg, rngs=nnx.Rngs(0)))
  tokens = jnp.asarray(np.random.default_rng(0).integers(4, 512, (4, 64)), jnp.int32)

  def loss(p):
    return jnp.sum(nnx.merge(graphdef, p).hidden(tokens) ** 2)

  fn = jax.jit(jax.value_and_grad(loss))
  temp = fn.lower(params).compile().memory_analysis().temp_size_in_bytes
  return fn(params), temp


def test_remat_policies_keep_gradients_and_save_memory():
  (l0, g0), t_none = _loss_and_grad("none")
  for policy in ("full", "dots"):
    (l1, g1), t = _loss_and_grad(policy)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if policy == "full":
      assert t < t_none


def test_unknown_policy():
  with pytest.raises(ValueError, match="remat must be one of"):
    models.get_config("tiny", remat="some")
