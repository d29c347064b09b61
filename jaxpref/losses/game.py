"""Nash-MD and XPO on sampled responses: the online role's two losses whose rollout holds a
second set of samples, from the geometric mixture or from the reference
(jaxpref/train/game_rollouts.py lays them out; docs/game_methods.md#nash-md-and-xpo-online).

Nash-MD (Munos et al. 2024, "Nash Learning from Human Feedback", its Nash-MD-PG update, as
TRL's NashMDTrainer computes it): per policy response y, `Logps.scores` holds
P(y beats y'), y' drawn from pi_mix ~ pi^(1 - m) pi_ref^m; with lp_t, ref_t the policy's
and reference's per-token log-probs on y,
  l(y) = beta sum_t sg(lp_t - ref_t) lp_t - (P - 1/2) sum_t lp_t,
whose gradient is the REINFORCE estimate of -grad [P(pi beats pi_mix) - beta KL(pi || ref)]
with 1/2 as the baseline (the KL as a per-token score-function term, TRL's form).

XPO (Xie et al. 2024, "Exploratory Preference Optimization", as TRL's XPOTrainer computes
it): responses [chosen, rejected, ref_1, ...]; DPO (or IPO) on the first two plus
alpha sum_t lp_t on each reference sample (minimising it pushes the policy off what the
reference already says: the paper's optimism term).

EGPO (Zhou et al. 2025, arXiv 2503.08942, the sampled online IPO its extragradient loop
runs; jaxpref/train/egpo_rollouts.py): per policy response y, `Logps.scores` holds
w_y = mean over opponent samples y'' of P(y beats y''); with rho the sequence log-ratio
policy - reference, the square loss over each group's pairs (y, y'),
  [(rho_y - rho_y') - (w_y - w_y') / beta]^2.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.losses.registry import register
from jaxpref.types import Logps

sg = jax.lax.stop_gradient
XPO_LOSS_TYPES = ("sigmoid", "ipo")


def _need(lp: Logps, name: str, *fields: str) -> None:
  for field in fields:
    if getattr(lp, field) is None:
      raise ValueError(f"loss {name!r} reads Logps.{field}, which this Logps lacks (the online "
                       "step fills it)")


def _wmean(x: jax.Array, w: jax.Array) -> jax.Array:
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1e-8)


@register("nash_md", needs_tokens=True, role="online", ranges={"beta": ">= 0"})
def nash_md(lp: Logps, *, beta: float = 0.1):
  """Nash-MD-PG per response, mean over the valid responses of the weighted groups; the
  preference P(y beats y') [B, K] is `Logps.scores`. beta = 0.1 is TRL's default."""
  _need(lp, "nash_md", "policy_tok", "ref_tok", "mask", "scores")
  chex.assert_equal_shape([lp.policy_tok, lp.ref_tok, lp.mask])
  chex.assert_equal_shape([lp.scores, lp.valid])
  pol = lp.policy_tok * lp.mask
  log_ratio = sg(lp.policy_tok - lp.ref_tok) * lp.mask  # [B, K, T]
  seq = jnp.sum(pol, -1)
  score = (sg(lp.scores) - 0.5) * seq  # REINFORCE with 1/2 as the control variate
  kl_term = jnp.sum(log_ratio * pol, -1)
  w = lp.weight[:, None] * lp.valid.astype(seq.dtype)
  loss = _wmean(beta * kl_term - score, w)
  metrics = {
      "loss/score": _wmean(sg(score), w),
      "kl/mean": _wmean(jnp.sum(log_ratio, -1), w),  # sum_t (lp_t - ref_t): TRL's loss/kl
      "rewards/probability": _wmean(sg(lp.scores), w),
      "rewards/accuracy": _wmean((lp.scores > 0.5).astype(seq.dtype), w),
      "logps/policy": _wmean(sg(seq), w),
  }
  return loss, metrics


@register("xpo", needs_tokens=True, role="online", ranges={"beta": "> 0", "alpha": ">= 0"})
def xpo(lp: Logps, *, beta: float = 0.1, alpha: float = 1e-5, loss_type: str = "sigmoid"):
  """XPO on [chosen, rejected, reference samples...] per group (K >= 3): with
  h = (lp_c - ref_c) - (lp_r - ref_r) (sequence sums), sigmoid: -log sigmoid(beta h),
  ipo: (h - 1 / (2 beta))^2, counted where the chosen outscored the rejected (`scores`);
  plus alpha times the policy's log-prob of each valid reference sample. Both terms are
  means over the weighted groups (TRL's defaults beta = 0.1, alpha = 1e-5)."""
  _need(lp, "xpo", "scores")
  if loss_type not in XPO_LOSS_TYPES:
    raise ValueError(f"xpo: loss_type must be one of {XPO_LOSS_TYPES}, got {loss_type!r}")
  if lp.policy.shape[1] < 3:
    raise ValueError(f"xpo reads [chosen, rejected, reference samples...]: K >= 3, got "
                     f"{lp.policy.shape[1]}")
  ratio = lp.policy - sg(lp.ref)
  h = ratio[:, 0] - ratio[:, 1]
  dpo = -jax.nn.log_sigmoid(beta * h) if loss_type == "sigmoid" else (h - 0.5 / beta) ** 2
  valid = lp.valid.astype(lp.policy.dtype)
  # A tie (or a missing side) has no preference: no DPO term, as the pair rule drops it.
  pref = valid[:, 0] * valid[:, 1] * (lp.scores[:, 0] > lp.scores[:, 1])
  explore = jnp.sum(lp.policy[:, 2:] * valid[:, 2:], -1)
  n = jnp.maximum(jnp.sum(lp.weight), 1e-8)
  dpo_mean = jnp.sum(dpo * pref * lp.weight) / n
  xpo_mean = alpha * jnp.sum(explore * lp.weight) / n
  paired = lp.weight * pref
  metrics = {
      "loss/dpo": sg(dpo_mean),
      "loss/xpo": sg(xpo_mean),
      "rewards/accuracy": _wmean((h > 0).astype(h.dtype), paired),
      "rewards/margin": _wmean(sg(beta * h), paired),
      "pairs/fraction": _wmean(pref, lp.weight),
      "logps/reference_samples": _wmean(sg(explore) / jnp.maximum(jnp.sum(valid[:, 2:], -1), 1),
                                        lp.weight),
  }
  return dpo_mean + xpo_mean, metrics


@register("egpo", role="online", ranges={"beta": "> 0"})  # sequence sums only
def egpo(lp: Logps, *, beta: float = 0.1):
  """Online IPO with win-rate targets on every pair i < j of a group's K responses: the
  weighted mean of [(rho_i - rho_j) - (w_i - w_j) / beta]^2, rho = `policy - ref` (sequence
  sums), w = `scores` (held fixed), a pair's weight its group's weight if both are valid.
  beta = 0.1: the paper's first tabular schedule (docs/game_methods.md#egpo)."""
  _need(lp, "egpo", "scores")
  k = lp.policy.shape[1]
  if k < 2:
    raise ValueError(f"egpo trains on pairs of a group's responses: K >= 2, got {k}")
  rho = lp.policy - sg(lp.ref)
  w = sg(lp.scores)
  i, j = np.triu_indices(k, 1)
  margin = rho[:, i] - rho[:, j]  # [B, K(K-1)/2]
  target = (w[:, i] - w[:, j]) / beta
  valid = lp.valid.astype(rho.dtype)
  pw = lp.weight[:, None] * valid[:, i] * valid[:, j]
  loss = _wmean((margin - target) ** 2, pw)
  sign = jnp.sign(target)  # each pair oriented towards its higher target
  ordered = pw * jnp.abs(sign)
  metrics = {
      "egpo/target_gap": _wmean(jnp.abs(target), pw),
      "egpo/margin": _wmean(sg(sign * margin), pw),
      "rewards/accuracy": _wmean((sign * margin > 0).astype(rho.dtype), ordered),
      "rewards/win_rate": _wmean(w, lp.weight[:, None] * valid),
      "kl/mean": _wmean(sg(rho), lp.weight[:, None] * valid),
  }
  return loss, metrics
