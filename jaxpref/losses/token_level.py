"""Objectives that read per-token log-probs (`Logps.policy_tok`, `ref_tok`, `mask` [B,K,T]).

Registered with `needs_tokens=True`, so the train step hands them the token arrays that
other losses never hold.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp

from jaxpref.losses.common import check_pairs, pair_loss, smoothed_logistic
from jaxpref.losses.registry import register
from jaxpref.types import Logps


@register("ld_dpo", needs_tokens=True)
def ld_dpo(lp: Logps, *, beta: float = 0.1, ld_alpha: float = 0.5, label_smoothing: float = 0.0):
  """LD-DPO: Length Desensitization in Direct Preference Optimization (Liu et al. 2024).

  The policy's sequence log-prob keeps the first l_p = min(L_w, L_l) response tokens
  whole and scales the longer response's tail by ld_alpha:
  S'(y) = sum_{t <= l_p} lp_t + ld_alpha sum_{t > l_p} lp_t; the reference keeps its full
  sum (TRL's `ld_alpha`). Then cDPO's loss on beta (rho'_w - rho'_l). ld_alpha = 1 is DPO.
  """
  check_pairs(lp)
  chex.assert_rank(lp.policy_tok, 3)
  position = jnp.cumsum(lp.mask, axis=-1)  # 1-based index among the response tokens
  public = jnp.min(lp.length, axis=1)[:, None, None]  # [B, 1, 1]
  front = lp.mask * (position <= public)
  tail = lp.mask - front
  policy = jnp.sum(lp.policy_tok * front, -1) + ld_alpha * jnp.sum(lp.policy_tok * tail, -1)
  rho = policy - lp.ref  # [B, 2]
  return pair_loss(lp, smoothed_logistic(beta * (rho[:, 0] - rho[:, 1]), label_smoothing), beta * rho)
