"""Shared pieces of the losses: reductions, log-ratios, NLL, and the standard metrics."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxpref.types import Logps


def weighted_mean(x: jax.Array, weight: jax.Array) -> jax.Array:
  """Mean of `x` [B] over groups, weighted; weight-0 groups (batch padding) drop out."""
  return jnp.sum(x * weight) / jnp.maximum(jnp.sum(weight), 1e-8)


def check_pairs(lp: Logps) -> None:
  chex.assert_rank(lp.policy, 2)
  chex.assert_axis_dimension(lp.policy, 1, 2)
  chex.assert_equal_shape([lp.policy, lp.ref, lp.length])


def logratios(lp: Logps) -> jax.Array:
  """rho = S_pol - S_ref, float32[B, K]."""
  return lp.policy - lp.ref


def avg_logps(lp: Logps) -> jax.Array:
  """A = S_pol / L, the length-averaged policy log-prob, float32[B, K]."""
  return lp.policy / jnp.maximum(lp.length, 1.0)


def chosen_nll(lp: Logps) -> jax.Array:
  """Token-mean NLL of the chosen responses over the batch (TRL's RPO/CPO/ORPO SFT term)."""
  w = lp.weight
  return jnp.sum(-lp.policy[:, 0] * w) / jnp.maximum(jnp.sum(lp.length[:, 0] * w), 1.0)


def log1mexp(x: jax.Array) -> jax.Array:
  """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler 2012)."""
  x = jnp.minimum(x, -1e-7)
  return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def half_wins(diff: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(win, tie) of reward differences `diff` (> 0: the preferred side ahead): win is 1, 0.5
  for an exact tie, 0 otherwise; tie is 1 on exact ties. Every `rewards/accuracy*` counts
  ties half and reports the tie share as `rewards/ties*`, so `--tie_accuracy=loss`
  (TRL's rule, ties lost) is the accuracy minus half the ties (`train/metrics.py`)."""
  tie = (diff == 0).astype(jnp.float32)
  return jnp.where(diff > 0, 1.0, 0.5 * tie), tie


def pair_metrics(lp: Logps, rewards: jax.Array) -> dict[str, jax.Array]:
  """TRL-compatible metrics for K=2 groups (index 0 chosen, 1 rejected).

  `rewards` [B, 2] are the loss's implicit rewards (beta * rho for DPO-style losses).
  `rewards/accuracy` counts an exact tie as half a win: at step 0 the policy equals the
  reference, every margin is exactly 0, and the metric then reads 0.5 (chance), not 0.
  """
  rewards = jax.lax.stop_gradient(rewards)
  margin = rewards[:, 0] - rewards[:, 1]
  win, tie = half_wins(margin)
  m = lambda x: weighted_mean(x, lp.weight)
  return {
      "rewards/chosen": m(rewards[:, 0]),
      "rewards/rejected": m(rewards[:, 1]),
      "rewards/margin": m(margin),
      "rewards/accuracy": m(win),
      "rewards/ties": m(tie),
      "logps/chosen": m(jax.lax.stop_gradient(lp.policy[:, 0])),
      "logps/rejected": m(jax.lax.stop_gradient(lp.policy[:, 1])),
  }


def smoothed_logistic(z: jax.Array, eps) -> jax.Array:
  """-(1-eps) logsig(z) - eps logsig(-z): cDPO's expected loss under flip rate eps
  (a float, or per pair [B])."""
  return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def pair_loss(lp: Logps, per_pair: jax.Array, rewards: jax.Array, **terms):
  """(weighted mean of `per_pair`, standard metrics from `rewards` + `loss/<term>` entries)."""
  metrics = pair_metrics(lp, rewards)
  metrics.update({f"loss/{k}": v for k, v in terms.items()})
  return weighted_mean(per_pair, lp.weight), metrics
