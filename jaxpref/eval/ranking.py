"""Preference metrics as pure functions (docs/losses.md#ranking-metrics): reward accuracy, ranking accuracy
(plain, length-normalised, with ties), idealized ranking accuracy, the DPO flip threshold,
and Kendall's tau for ranked lists.

From "Preference Learning Algorithms Do Not Learn Preference Rankings" (Chen et al. 2024):
ranking accuracy asks whether the *policy* prefers y_w (pi(y_w) >= pi(y_l)), which is not
DPO's reward accuracy (whether the policy moved toward y_w relative to the reference).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reward_accuracy(rho_w: jax.Array, rho_l: jax.Array) -> jax.Array:
  """mean 1[rho(y_w) > rho(y_l)], rho = S_pol - S_ref (DPO's "rewards/accuracy", Remark 2.5)."""
  return jnp.mean((rho_w > rho_l).astype(jnp.float32))


def ranking_accuracy(s_w: jax.Array, s_l: jax.Array, alpha: jax.Array | None = None,
                     tie_eps: float = 0.01) -> jax.Array:
  """Def. 2.3: mean 1[pi(y_w) >= pi(y_l)] from sequence log-probs s (pass A = S/L for R~).

  With rater shares `alpha` = P(y_w preferred) (App. C.1): alpha = 0.5 counts a pair as
  right iff |pi(y_w) - pi(y_l)| < tie_eps (probabilities, not logs); alpha > 0.5 asks
  pi(y_w) > pi(y_l); alpha < 0.5 asks pi(y_w) < pi(y_l).
  """
  if alpha is None:
    return jnp.mean((s_w >= s_l).astype(jnp.float32))
  tie = jnp.abs(jnp.exp(s_w) - jnp.exp(s_l)) < tie_eps
  right = jnp.where(alpha > 0.5, s_w > s_l, jnp.where(alpha < 0.5, s_w < s_l, tie))
  return jnp.mean(right.astype(jnp.float32))


def idealized_ranking_accuracy(ref_w: jax.Array, ref_l: jax.Array, alpha: jax.Array,
                               beta: float, eps: float = 1e-3) -> jax.Array:
  """Thm 3.1 / Cor. 3.3: the ranking accuracy of the exact DPO/RLHF optimum.

  R* = mean 1[(S_ref(y_w) - S_ref(y_l)) + (1/beta) log(alpha / (1 - alpha)) > 0], with
  unanimous shares alpha = 1 replaced by 1 - eps.
  """
  alpha = jnp.clip(alpha, eps, 1.0 - eps)
  logit = (ref_w - ref_l) + jnp.log(alpha / (1.0 - alpha)) / beta
  return jnp.mean((logit > 0).astype(jnp.float32))


def dpo_flip_threshold(ref_w: jax.Array, ref_l: jax.Array, beta: float) -> jax.Array:
  """The DPO loss below which a pair is ranked correctly (Thm 4.1): -logsig(beta c).

  c = S_ref(y_l) - S_ref(y_w). Since h = (S_pol(y_w) - S_pol(y_l)) + c, the policy ranks
  y_w first exactly when h >= c, i.e. when -logsig(beta h) <= -logsig(beta c). A reference
  that strongly prefers y_l (large c) needs a very small loss to flip.
  """
  return -jax.nn.log_sigmoid(beta * (ref_l - ref_w))


def kendall_tau(pred: jax.Array, true: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Kendall's tau-a per list [B] between predicted and true scores [B, K] (ties count 0)."""
  if valid is None:
    valid = jnp.ones(pred.shape, bool)
  sign = lambda x: jnp.sign(x[:, :, None] - x[:, None, :])
  k = pred.shape[1]
  pairs = jnp.triu(jnp.ones((k, k), bool), 1) & valid[:, :, None] & valid[:, None, :]
  agree = jnp.sum(jnp.where(pairs, sign(pred) * sign(true), 0.0), axis=(1, 2))
  return agree / jnp.maximum(jnp.sum(pairs, axis=(1, 2)), 1)
