"""Pairwise objectives that scale or smooth each pair by a per-pair confidence: WPO's
on-policy weight and MCTS-DPO's visit-count label smoothing.

Notation as in pairwise.py (docs/losses.md#notation): rho = S_pol - S_ref, A = S_pol / L.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpref.losses.common import (avg_logps, check_pairs, logratios, pair_loss,
                                   smoothed_logistic, weighted_mean)
from jaxpref.losses.pairwise import flip_rate
from jaxpref.losses.registry import register
from jaxpref.types import Logps


def wpo_weight(lp: Logps, align: bool = False) -> jax.Array:
  """WPO's pair weight min(1, exp(A(y_w) + A(y_l))), [B], without gradient.

  A is the policy's length-normalised log-prob, so the weight is how likely the policy is
  to have sampled this pair itself. `align` (the paper's weight alignment, always on in
  the official trainer) first divides each token's probability by sum_v pi(v|t)^2, the
  probability that the policy's own sample agrees with another, so a pair the policy
  would sample weighs about 1 however peaked its distributions: A = (S - sum_t log
  sum_v pi(v|t)^2) / L with `Logps.prob_sq` the sum. Formed in log space and clamped
  there (the official code clamps at 1), so it underflows to 0 rather than overflowing.
  """
  if align and lp.prob_sq is None:
    raise ValueError("wpo with align=True reads Logps.prob_sq, which the train step fills "
                     "for losses registered with needs_prob_sq=True")
  a = (lp.policy - lp.prob_sq) / jnp.maximum(lp.length, 1.0) if align else avg_logps(lp)
  return jax.lax.stop_gradient(jnp.exp(jnp.minimum(a[:, 0] + a[:, 1], 0.0)))


def weighted_dpo(lp: Logps, weight: jax.Array, beta: float, label_smoothing: float):
  """cDPO's loss per pair times a given per-pair `weight` [B] (WPO's objective body)."""
  rho = logratios(lp)
  per = weight * smoothed_logistic(beta * (rho[:, 0] - rho[:, 1]), label_smoothing)
  loss, metrics = pair_loss(lp, per, beta * rho)
  metrics["wpo/weight"] = weighted_mean(weight, lp.weight)
  return loss, metrics


@register("wpo", needs_prob_sq=True, ranges={"beta": "> 0", "label_smoothing": "[0, 0.5]"})
def wpo(lp: Logps, *, beta: float = 0.01, label_smoothing: float = 0.0, align: bool = True):
  """WPO: Enhancing RLHF with Weighted Preference Optimization (Zhou et al. 2024).

  l = w * cDPO(beta h), w = min(1, exp(A(y_w) + A(y_l))) held constant in the gradient
  (`wpo_weight`): off-policy pairs the policy would rarely produce count less, simulating
  on-policy data. `align` applies the paper's weight alignment as the official trainer
  does (each token's probability over sum_v pi(v)^2, from the full-vocabulary softmax the
  step streams into `Logps.prob_sq`); `align=False` is the weight without it. Per-pair
  eps from the records' `label_smoothing` field overrides the scalar, as in `dpo`.
  """
  check_pairs(lp)
  return weighted_dpo(lp, wpo_weight(lp, align), beta, flip_rate(lp, label_smoothing))


def visit_count_flip_rate(lp: Logps) -> jax.Array:
  """MCTS-DPO's eps per pair [B] from the sibling nodes' visit counts (N_w, N_l) = scores.

  conf = 1 / (1 + N_l / max(1, N_w)) and eps = min(1 - conf, 1/2), i.e.
  eps = min(N_l / (max(1, N_w) + N_l), 1/2). Counts below 0 read as 0.
  """
  n = jnp.maximum(lp.scores, 0.0)
  return jnp.minimum(n[:, 1] / (jnp.maximum(n[:, 0], 1.0) + n[:, 1]), 0.5)


@register("mcts_dpo", ranges={"beta": "> 0"})
def mcts_dpo(lp: Logps, *, beta: float = 0.1, conservative: bool = True, ipo: bool = False,
             length_normalize: bool = False, length_penalty: float = 1.0):
  """Monte Carlo Tree Search Boosts Reasoning via Iterative Preference Learning
  (MCTS-DPO, Xie et al. 2024), docs/losses.md#mcts_dpo, as the official trainer computes it.

  A pair is two sibling steps of the search tree: the chosen has the highest Q, the
  rejected a lower one; both share the prefix, which the data layer puts in the prompt,
  so the loss mask covers each branch from the first diverging token. The records'
  `chosen_score`/`rejected_score` carry the two nodes' visit counts N_w, N_l.
  h = rho_w / L_w^lp - rho_l / L_l^lp with `length_normalize` (or `ipo`), else h = rho_w - rho_l;
  `ipo`: (h - 1/(2 beta))^2; else `conservative`: cDPO with eps = min(N_l / (max(1, N_w)
  + N_l), 1/2) (`visit_count_flip_rate`): a rejected sibling the search visited about as
  often as the chosen is a less certain preference; otherwise DPO. Without scores eps is
  the records' `label_smoothing` field, or 0 (DPO).
  """
  check_pairs(lp)
  rho = logratios(lp)
  if length_normalize or ipo:  # the official trainer's `norm_prob or ipo`
    rho = rho / jnp.maximum(lp.length, 1.0) ** length_penalty
  h = rho[:, 0] - rho[:, 1]
  metrics = {}
  if ipo:
    per = (h - 1.0 / (2.0 * beta)) ** 2
  elif conservative:
    eps = visit_count_flip_rate(lp) if lp.scores is not None else flip_rate(lp, 0.0)
    per = smoothed_logistic(beta * h, eps)
    metrics["mcts/label_smoothing"] = weighted_mean(jnp.broadcast_to(eps, h.shape), lp.weight)
  else:
    per = smoothed_logistic(beta * h, 0.0)
  loss, pair_metrics = pair_loss(lp, per, beta * rho)
  return loss, {**pair_metrics, **metrics}
