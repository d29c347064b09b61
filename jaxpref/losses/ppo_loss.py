"""The registered `ppo` loss (role "online"): PPO's clipped policy loss plus `vf_coef` times
its clipped value loss (`losses/ppo.py`), on what the online step computes once per
rollout (docs/online.md#ppo):

  `Logps.adv_tok`   whitened GAE(gamma, lam) advantages of the KL-penalised per-token reward,
  `Logps.returns`   GAE's returns A_t + V_old_t,
  `Logps.old_tok`   the sampling policy's log-probs (None: on-policy, old = lp),
  `Logps.old_values` the value head's V_t at rollout time (the value clip's anchor),
and, with gradient, the current `policy_tok` and `values`. Both terms are token means over
the batch's response tokens, each weighted by its group's `weight` (padded responses,
`valid` False, drop out).
"""

from __future__ import annotations

import chex
import jax

from jaxpref.losses import ppo as ppo_math
from jaxpref.losses.registry import register
from jaxpref.types import Logps

sg = jax.lax.stop_gradient


@register("ppo", needs_tokens=True, needs_values=True, role="online",
          ranges={"epsilon": ">= 0", "value_clip": ">= 0", "vf_coef": ">= 0"})
def ppo(lp: Logps, *, epsilon: float = 0.2, value_clip: float = 0.2, vf_coef: float = 0.1):
  """PPO as in "Unpacking DPO and PPO" (Ivison et al. 2024; its EasyLM code's defaults:
  cliprange 0.2, cliprange_value 0.2, vf_coef 0.1):
    max(-A_t c_t, -A_t clip(c_t, 1 - eps, 1 + eps))
      + vf_coef 0.5 max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -vc, vc) - R_t)^2)."""
  for field in ("policy_tok", "mask", "values", "old_values", "adv_tok", "returns"):
    if getattr(lp, field) is None:
      raise ValueError(f"loss 'ppo' reads Logps.{field}, which this Logps lacks (the online "
                       "step fills it with --online.value=head)")
  chex.assert_equal_shape([lp.policy_tok, lp.mask, lp.values, lp.old_values, lp.adv_tok,
                           lp.returns])
  mask = lp.mask * (lp.weight[:, None] * lp.valid.astype(lp.weight.dtype))[..., None]
  old = sg(lp.policy_tok) if lp.old_tok is None else lp.old_tok
  loss, metrics = ppo_math.ppo_loss(lp.policy_tok, old, lp.adv_tok, lp.values, lp.old_values,
                                    lp.returns, mask, eps=epsilon, value_clip=value_clip,
                                    vf_coef=vf_coef)
  return loss, metrics
