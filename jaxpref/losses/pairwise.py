"""Pairwise (K=2, chosen first) objectives on sequence log-ratios.

Notation (LOSSES.md §0): rho(y) = S_pol(y) - S_ref(y), h = rho(y_w) - rho(y_l).
"""

from __future__ import annotations

import chex
import jax

from jaxpref.losses.common import pair_metrics, weighted_mean
from jaxpref.losses.registry import register
from jaxpref.types import Logps


def _check_pairs(lp: Logps) -> None:
  chex.assert_rank(lp.policy, 2)
  chex.assert_axis_dimension(lp.policy, 1, 2)
  chex.assert_equal_shape([lp.policy, lp.ref])


@register("dpo")
def dpo(lp: Logps, *, beta: float = 0.1, label_smoothing: float = 0.0):
  """Direct Preference Optimization: Your Language Model is Secretly a Reward Model.

  l = -(1-eps) logsig(beta h) - eps logsig(-beta h) (LOSSES.md §1.1, §1.3): eps = 0 is
  DPO; eps > 0 is conservative DPO (cDPO), eps being the assumed label-flip rate.
  """
  _check_pairs(lp)
  rho = lp.policy - lp.ref  # [B, 2]
  h = rho[:, 0] - rho[:, 1]  # [B]
  per_pair = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
              - label_smoothing * jax.nn.log_sigmoid(-beta * h))
  return weighted_mean(per_pair, lp.weight), pair_metrics(lp, beta)
