"""Listwise and ranked objectives: K >= 2 responses per group, ordered best first.

`lp.valid[b, k]` marks real group members (padding comes last); `lp.scores`, when given,
are the responses' rewards (higher is better). With K = 2 each loss here reduces to its
pairwise counterpart (tested; `lipo` up to its constant lambda weight).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxpref.losses.common import avg_logps, half_wins, logratios, weighted_mean
from jaxpref.losses.registry import register
from jaxpref.types import Logps

_NEG = -1e30  # finite: masked members stay out of sums without NaN gradients


def _check_list(lp: Logps) -> None:
  chex.assert_rank(lp.policy, 2)
  chex.assert_equal_shape([lp.policy, lp.ref, lp.length, lp.valid])


def list_metrics(lp: Logps, rewards: jax.Array) -> dict[str, jax.Array]:
  """Standard metrics for ranked groups: `chosen` is the best response, `rejected` the mean of
  the others; `rewards/accuracy` is the share of ordered pairs (i better than j) whose
  rewards agree (ties half), so for K = 2 all keys equal the pairwise ones."""
  rewards = jax.lax.stop_gradient(rewards)
  valid = lp.valid.astype(jnp.float32)
  others = valid.at[:, 0].set(0.0)
  n_others = jnp.maximum(others.sum(-1), 1.0)
  rejected = (rewards * others).sum(-1) / n_others
  diff = rewards[:, :, None] - rewards[:, None, :]  # [B, K, K], i better than j for i < j
  k = lp.policy.shape[1]
  pairs = jnp.triu(jnp.ones((k, k)), 1) * valid[:, :, None] * valid[:, None, :]
  win, tie = half_wins(diff)
  n_pairs = jnp.maximum(pairs.sum((1, 2)), 1.0)
  acc, ties = (win * pairs).sum((1, 2)) / n_pairs, (tie * pairs).sum((1, 2)) / n_pairs
  logps = jax.lax.stop_gradient(lp.policy)
  m = lambda x: weighted_mean(x, lp.weight)
  return {
      "rewards/chosen": m(rewards[:, 0]),
      "rewards/rejected": m(rejected),
      "rewards/margin": m(rewards[:, 0] - rejected),
      "rewards/accuracy": m(acc),
      "rewards/ties": m(ties),
      "logps/chosen": m(logps[:, 0]),
      "logps/rejected": m((logps * others).sum(-1) / n_others),
  }


def _plackett_luce(s: jax.Array, valid: jax.Array) -> jax.Array:
  """-log P(order) under Plackett-Luce: sum_i (LSE_{j >= i} s_j - s_i) over valid i. [B]."""
  s = jnp.where(valid, s, _NEG)
  tail_lse = jax.lax.cumlogsumexp(s, axis=1, reverse=True)
  return jnp.sum(jnp.where(valid, tail_lse - s, 0.0), axis=1)


@register("listmle", ranges={"beta": "> 0"})
def listmle(lp: Logps, *, beta: float = 0.1):
  """Listwise Approach to Learning to Rank (ListMLE) on DPO's implicit rewards.

  The Plackett-Luce generalisation of DPO (Rafailov et al. 2023, App. A.3):
  l = sum_i (LSE_{j >= i} s_j - s_i), s = beta rho. K = 2 is DPO.
  """
  _check_list(lp)
  s = beta * logratios(lp)
  return weighted_mean(_plackett_luce(s, lp.valid), lp.weight), list_metrics(lp, s)


@register("ranknet", ranges={"beta": "> 0"})
def ranknet(lp: Logps, *, beta: float = 0.1):
  """Learning to Rank using Gradient Descent (RankNet), all pairs, on DPO's implicit rewards.

  l = mean_{i < j} -logsig(s_i - s_j), s = beta rho (docs/losses.md#ranknet). K = 2 is DPO.
  """
  _check_list(lp)
  s = beta * logratios(lp)
  k = s.shape[1]
  valid = lp.valid.astype(jnp.float32)
  pairs = jnp.triu(jnp.ones((k, k)), 1) * valid[:, :, None] * valid[:, None, :]
  terms = -jax.nn.log_sigmoid(s[:, :, None] - s[:, None, :])
  per = (terms * pairs).sum((1, 2)) / jnp.maximum(pairs.sum((1, 2)), 1.0)
  return weighted_mean(per, lp.weight), list_metrics(lp, s)


@register("pro")
def pro(lp: Logps, *, sft_weight: float = 0.05):
  """Preference Ranking Optimization for Human Alignment (PRO), docs/losses.md#pro.

  Scores s_k = A_pol(y_k) (length-averaged). Stage k (k = 1..n-1): the k-th best must beat
  all worse ones, l_k = LSE(T_kk s_k, {T_kj s_j}_{j>k}) - T_kk s_k, with reward-gap
  temperatures T_kj = r_k - r_j and T_kk = max_{j>k} T_kj (all 1 without `lp.scores`: plain
  Plackett-Luce). Total: sum_k l_k + sft_weight (n-1)^2 (-S_pol(y_1)), averaged over groups.
  """
  _check_list(lp)
  s = avg_logps(lp)
  b, k = s.shape
  valid = lp.valid
  later = jnp.triu(jnp.ones((k, k), bool), 1)[None] & valid[:, None, :] & valid[:, :, None]
  if lp.scores is None:
    temp = jnp.ones((b, k, k))
  else:
    gaps = lp.scores[:, :, None] - lp.scores[:, None, :]  # T_kj = r_k - r_j
    t_kk = jnp.max(jnp.where(later, gaps, -jnp.inf), axis=2)  # [B, K]
    t_kk = jnp.where(later.any(2), t_kk, 1.0)
    eye = jnp.eye(k, dtype=bool)[None]
    temp = jnp.where(eye, t_kk[:, :, None], gaps)
  temp = jax.lax.stop_gradient(temp)
  logits = temp * s[:, None, :]  # [B, stage k, member j]
  in_stage = later | (jnp.eye(k, dtype=bool)[None] & valid[:, :, None])
  lse = jax.nn.logsumexp(jnp.where(in_stage, logits, _NEG), axis=2)
  own = jnp.diagonal(logits, axis1=1, axis2=2)
  has_stage = later.any(2)  # stage k exists iff something valid is worse than k
  rank = jnp.sum(jnp.where(has_stage, lse - own, 0.0), axis=1)
  n = valid.sum(-1)
  sft = (n - 1.0) ** 2 * -lp.policy[:, 0]
  metrics = list_metrics(lp, s)
  metrics.update({"loss/rank": weighted_mean(rank, lp.weight), "loss/sft": weighted_mean(sft, lp.weight)})
  return weighted_mean(rank + sft_weight * sft, lp.weight), metrics


@register("ranklist", ranges={"beta": "> 0"})
def ranklist(lp: Logps, *, beta: float = 0.1, skip: int = 0):
  """RankList: listwise ranking with log-sum-exp and skip-wise comparisons (docs/losses.md#ranklist).

  A reading (UNVERIFIED): with s = beta rho over the ordered list, skip = 0 makes each
  member beat the smooth maximum of everything below it, l = sum_i -logsig(s_i - LSE_{j>i}
  s_j); skip = k >= 1 compares only members exactly k apart, sum_i -logsig(s_i - s_{i+k})
  (the skip-wise curriculum raises k). K = 2 is DPO either way.
  """
  _check_list(lp)
  s = beta * logratios(lp)
  valid = lp.valid
  k = s.shape[1]
  if skip == 0:
    masked = jnp.where(valid, s, _NEG)
    below = jax.lax.cumlogsumexp(masked, axis=1, reverse=True)
    below = jnp.concatenate([below[:, 1:], jnp.full((s.shape[0], 1), _NEG)], axis=1)  # LSE_{j>i}
    has_below = jnp.concatenate([valid[:, 1:], jnp.zeros((s.shape[0], 1), bool)], axis=1)
    terms = jnp.where(valid & has_below, -jax.nn.log_sigmoid(s - below), 0.0)
  else:
    if not 0 < skip < k:
      raise ValueError(f"ranklist: skip must be 0 or in [1, K-1] = [1, {k - 1}], got {skip}")
    pairs = valid[:, :-skip] & valid[:, skip:]
    terms = jnp.where(pairs, -jax.nn.log_sigmoid(s[:, :-skip] - s[:, skip:]), 0.0)
  return weighted_mean(jnp.sum(terms, axis=1), lp.weight), list_metrics(lp, s)


@register("hierarchical_pairwise", ranges={"beta": "> 0", "tau": "> 0"})
def hierarchical_pairwise(lp: Logps, *, beta: float = 0.1, tau: float = 1.0, margin: float = 0.0):
  """VideoComp's hierarchical pairwise preference loss, logistic reading (docs/losses.md#hierarchical_pairwise).

  Group members are ordered by disruption level (0 = the positive, then increasingly
  disrupted negatives); every pair a < b pays -logsig((s_a - s_b)/tau - margin (b - a)),
  s = beta rho, averaged over pairs: more distant levels must be separated by a larger
  margin. margin = 0, tau = 1 is `ranknet`. UNVERIFIED against the paper's equation.
  """
  _check_list(lp)
  s = beta * logratios(lp)
  k = s.shape[1]
  valid = lp.valid.astype(jnp.float32)
  pairs = jnp.triu(jnp.ones((k, k)), 1) * valid[:, :, None] * valid[:, None, :]
  gap = jnp.arange(k)[None, :] - jnp.arange(k)[:, None]  # b - a
  terms = -jax.nn.log_sigmoid((s[:, :, None] - s[:, None, :]) / tau - margin * gap)
  per = (terms * pairs).sum((1, 2)) / jnp.maximum(pairs.sum((1, 2)), 1.0)
  return weighted_mean(per, lp.weight), list_metrics(lp, s)


def _graded_labels(lp: Logps) -> jax.Array:
  """LiPO's labels psi [B, K]: the records' scores, or without them n-1, n-2, ..., 0 down the
  list of n valid members (the list is ordered best first)."""
  if lp.scores is not None:
    return lp.scores
  n = lp.valid.sum(-1, keepdims=True)
  return (n - 1 - jnp.arange(lp.policy.shape[1])[None, :]).astype(lp.policy.dtype)


def _model_ranks(s: jax.Array, valid: jax.Array) -> jax.Array:
  """1-based rank of each member under the scores s (descending; ties by list position)
  among the valid members, [B, K]. Padded members rank after every valid one."""
  k = s.shape[1]
  ahead = (s[:, None, :] > s[:, :, None]) | ((s[:, None, :] == s[:, :, None])
                                             & (jnp.arange(k)[None, :] < jnp.arange(k)[:, None]))
  return 1 + jnp.sum(ahead & valid[:, None, :], axis=2)  # [b, i]: valid j ranked before i


def lambda_weights(psi: jax.Array, s: jax.Array, valid: jax.Array) -> jax.Array:
  """LambdaLoss's Delta_ij = |G_i - G_j| |1/D(tau_i) - 1/D(tau_j)| for the pairs psi_i >
  psi_j of valid members (0 elsewhere), [B, K, K]: gain G = 2^psi - 1, discount
  D(tau) = log2(1 + tau), tau the rank under the model's current scores. Constant in s
  between rank swaps, so it carries no gradient."""
  s, psi = jax.lax.stop_gradient(s), jax.lax.stop_gradient(psi)
  gain = jnp.exp2(psi) - 1.0
  inv_discount = 1.0 / jnp.log2(1.0 + _model_ranks(s, valid).astype(s.dtype))
  delta = (jnp.abs(gain[:, :, None] - gain[:, None, :])
           * jnp.abs(inv_discount[:, :, None] - inv_discount[:, None, :]))
  pairs = (psi[:, :, None] > psi[:, None, :]) & valid[:, :, None] & valid[:, None, :]
  return jnp.where(pairs, delta, 0.0)


@register("lipo", ranges={"beta": "> 0"})
def lipo(lp: Logps, *, beta: float = 0.1):
  """LiPO-lambda (Liu et al. 2024, "LiPO: Listwise Preference Optimization through
  Learning-to-Rank"): RankNet's pairwise logistic on s = beta rho, each pair weighted by
  LambdaLoss's Delta_ij (`lambda_weights`), l = mean_{psi_i > psi_j} Delta_ij
  -logsig(s_i - s_j) over the list's ordered pairs. Labels psi are the records' scores
  (`Logps.scores`); without scores they are graded from the list order, best first: n-1
  for the best of n valid members down to 0 for the worst. The paper writes a sum over
  pairs; dividing by the list's number of weighted pairs (TF-Ranking's normalisation by
  nonzero pair weights, and `ranknet`'s mean here) keeps the scale of `ranknet`. K = 2 is
  DPO times Delta = 1 - 1/log2(3) without scores (tested).
  """
  _check_list(lp)
  s = beta * logratios(lp)
  delta = lambda_weights(_graded_labels(lp), s, lp.valid)
  terms = -jax.nn.log_sigmoid(s[:, :, None] - s[:, None, :])
  n_pairs = jnp.sum(delta > 0, axis=(1, 2))
  per = jnp.sum(delta * terms, axis=(1, 2)) / jnp.maximum(n_pairs, 1)
  return weighted_mean(per, lp.weight), list_metrics(lp, s)
