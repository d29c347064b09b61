"""Reductions and the standard metrics every pairwise loss reports."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpref.types import Logps


def weighted_mean(x: jax.Array, weight: jax.Array) -> jax.Array:
  """Mean of `x` [B] over groups, weighted; weight-0 groups (batch padding) drop out."""
  return jnp.sum(x * weight) / jnp.maximum(jnp.sum(weight), 1e-8)


def pair_metrics(lp: Logps, beta: float) -> dict[str, jax.Array]:
  """TRL-compatible DPO metrics for K=2 groups (index 0 chosen, 1 rejected).

  `rewards/accuracy` counts an exact tie as half a win: at step 0 the policy equals the
  reference, every margin is exactly 0, and the metric then reads 0.5 (chance), not 0.
  """
  rewards = jax.lax.stop_gradient(beta * (lp.policy - lp.ref))  # [B, 2]
  margin = rewards[:, 0] - rewards[:, 1]
  win = jnp.where(margin > 0, 1.0, jnp.where(margin == 0, 0.5, 0.0))
  m = lambda x: weighted_mean(x, lp.weight)
  return {
      "rewards/chosen": m(rewards[:, 0]),
      "rewards/rejected": m(rewards[:, 1]),
      "rewards/margin": m(margin),
      "rewards/accuracy": m(win),
      "logps/chosen": m(jax.lax.stop_gradient(lp.policy[:, 0])),
      "logps/rejected": m(jax.lax.stop_gradient(lp.policy[:, 1])),
  }
