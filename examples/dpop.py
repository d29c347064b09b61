"""A user's own loss, in the user's own file: DPO-Positive (DPOP).

Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive (Pal et al. 2024).
DPO can lower the chosen response's likelihood as long as the rejected one falls faster;
DPOP adds a penalty whenever the chosen log-ratio drops below zero:

  l = -logsig(beta * (h - lambda * max(0, -rho(y_w))))

Train it on the quickstart data:

  jaxpref-train --flagfile=examples/dpop.flags --workdir=runs/dpop
"""

import jax
import jax.numpy as jnp

from jaxpref import losses
from jaxpref.losses.common import check_pairs, logratios, pair_metrics, weighted_mean


@losses.register("dpop")
def dpop(lp, *, beta: float = 0.1, dpop_lambda: float = 50.0):
  """DPO-Positive: DPO with a penalty on the chosen log-ratio falling below the reference."""
  check_pairs(lp)
  rho = logratios(lp)  # [B, 2]: chosen, rejected
  penalty = jnp.maximum(0.0, -rho[:, 0])  # [B]
  per_pair = -jax.nn.log_sigmoid(beta * (rho[:, 0] - rho[:, 1] - dpop_lambda * penalty))
  metrics = pair_metrics(lp, beta * rho)
  metrics["loss/penalty"] = weighted_mean(penalty, lp.weight)
  return weighted_mean(per_pair, lp.weight), metrics
