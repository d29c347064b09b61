"""The `egpo` loss (jaxpref/losses/game.py) against a float64 numpy reference written from
the formula one pair at a time (never calling the loss), its gradient, and its sign:
raising the log-ratio of the response with the larger target lowers the loss while the
margin is below the target gap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref import losses
from test_game_losses import make_lp, rollout


def np_egpo(d, beta):
  """(loss, d loss / d rho [B, K]) in float64: over pairs i < j of each group with both
  valid, weight w_b, [(rho_i - rho_j) - (s_i - s_j) / beta]^2, weighted mean."""
  b, k, _ = d["pol"].shape
  rho = ((d["pol"] - d["ref"]) * d["mask"]).sum(-1)
  num, den, grad = 0.0, 0.0, np.zeros((b, k))
  for g in range(b):
    for i in range(k):
      for j in range(i + 1, k):
        w = d["weight"][g] * float(d["valid"][g, i] and d["valid"][g, j])
        e = (rho[g, i] - rho[g, j]) - (d["scores"][g, i] - d["scores"][g, j]) / beta
        num += w * e * e
        den += w
        grad[g, i] += 2 * w * e
        grad[g, j] -= 2 * w * e
  return num / den, grad / den


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_egpo_matches_float64_reference(beta):
  d = rollout(4, k=4)
  fn = losses.get("egpo")
  loss, metrics = fn(make_lp(d), beta=beta)
  want, want_grad = np_egpo(d, beta)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  grad = jax.grad(lambda p: fn(make_lp(d, p), beta=beta)[0])(jnp.asarray(d["pol"], jnp.float32))
  # d loss / d lp_t is the response's sequence gradient on each of its masked tokens
  np.testing.assert_allclose(np.asarray(grad), want_grad[..., None] * d["mask"], rtol=1e-4,
                             atol=1e-6)
  # the target gap: mean |s_i - s_j| / beta over the weighted valid pairs
  i, j = np.triu_indices(4, 1)
  pw = d["weight"][:, None] * d["valid"][:, i] * d["valid"][:, j]
  gap = np.abs(d["scores"][:, i] - d["scores"][:, j]) / beta
  np.testing.assert_allclose(float(metrics["egpo/target_gap"]), (gap * pw).sum() / pw.sum(),
                             rtol=1e-5)


def test_egpo_gradient_raises_the_response_with_the_larger_target():
  d = rollout(5, k=2)
  d["valid"][:] = True
  d["ref"] = d["pol"].copy()  # rho = 0: margin 0, below any positive target gap
  d["scores"][:, 0], d["scores"][:, 1] = 0.8, 0.3
  fn = losses.get("egpo")
  grad = np.asarray(jax.grad(lambda p: fn(make_lp(d, p), beta=0.1)[0])(
      jnp.asarray(d["pol"], jnp.float32)))
  m = d["mask"].astype(bool)
  on = d["weight"][:, None] > 0
  assert np.all(grad[:, 0][m[:, 0] & on] < 0)  # more log-ratio on the winner: lower loss
  assert np.all(grad[:, 1][m[:, 1] & on] > 0)
  _, metrics = fn(make_lp(d), beta=0.1)
  assert float(metrics["egpo/target_gap"]) == pytest.approx(5.0, rel=1e-5)
  assert float(metrics["egpo/margin"]) == pytest.approx(0.0, abs=1e-6)


def test_egpo_refuses_a_group_of_one():
  with pytest.raises(ValueError, match="K >= 2"):
    losses.get("egpo")(make_lp(rollout(6, k=1)))
