"""GRAO for the online role: Wang et al. 2025, "Learning to Align, Aligning to Learn: A Unified
Approach for Self-Optimized Alignment" (arXiv 2508.07750v1, AntGroup), eqs. 2-4.

Per prompt q: G samples o_i ~ pi_old and a reference answer y (the dataset's answer), with
  l(s) = 1/|s| sum_t log pi(s_t | q, s_<t)                  (a response's token-mean log-prob)
  J = 1/G sum_i [ A_i l(o_i)                                 (exploration)
                  + beta A_y l(y)                            (imitation)
                  + lam A_i (l(o_i) - l(y)) ]                (alignment regulariser)
the advantages A standardised rewards of the group (o_1..o_G, y); the loss is -J, averaged
over groups. No importance ratio, clip or KL: eq. 3 has none (the paper names gradient
clipping and advantage normalisation as its stabilisers).

The online role's rollouts hold only the G samples today, so the registered `grao` is the
part without y: -(1 + lam) / G sum_i A_i l(o_i). `grao_objective` is the whole of eq. 3,
for the day a rollout carries y (docs/online.md#grao says what that needs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpref.losses.online import (_batch_token_mean, _check, _entropy_tok, _group_mean,
                                   _log_ratio, _metrics, _seq_token_mean)
from jaxpref.losses.registry import register
from jaxpref.types import Logps

sg = jax.lax.stop_gradient


def grao_objective(sample_logp, sample_adv, valid, y_logp=None, y_adv=None, *, beta=0.5,
                   lam=0.6):
  """Eq. 3 per group, (J [B], exploration [B], imitation [B], regulariser [B]).

  sample_logp, sample_adv, valid: [B, G], l(o_i) and A_i (invalid samples drop out of 1/G);
  y_logp, y_adv: [B], l(y) and A_y, or None (no reference answer: its terms are 0).
  """
  v = valid.astype(sample_logp.dtype)
  n = jnp.maximum(jnp.sum(v, axis=1), 1.0)
  mean = lambda x: jnp.sum(x * v, axis=1) / n  # 1/G sum_i
  adv = sg(sample_adv)
  explore = mean(adv * sample_logp)
  if y_logp is None:
    imitate = jnp.zeros_like(explore)
    regular = lam * explore
  else:
    a_y = sg(y_adv)
    imitate = beta * a_y * y_logp  # constant in i, so 1/G sum_i leaves it as is
    regular = lam * mean(adv * (sample_logp - y_logp[:, None]))
  return explore + imitate + regular, explore, imitate, regular


@register("grao", needs_tokens=True, role="online", ranges={"lam": ">= 0"})
def grao(lp: Logps, *, lam: float = 0.6):
  """GRAO's exploration and alignment-regulariser terms over the rollout's samples (no
  reference answer in the group): loss = -(1 + lam) 1/G sum_i A_i l(o_i). lam = 0.6 is the
  paper's; its imitation weight beta = 0.5 needs the reference answer (module docstring)."""
  _check(lp, "grao")
  seq = _seq_token_mean(lp.policy_tok, lp)  # l(o_i), [B, K]
  j, explore, _, regular = grao_objective(seq, lp.advantages, lp.valid, lam=lam)
  w = lp.weight * (jnp.sum(lp.valid, axis=1) > 0)
  gmean = lambda x: jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1e-8)
  # The shared online metrics, with the policy term per token as -(1 + lam) A_i lp_t.
  policy_tok = -(1.0 + lam) * sg(lp.advantages)[..., None] * lp.policy_tok
  ent = _entropy_tok(lp)
  ratio_mean = _batch_token_mean(sg(jnp.exp(_log_ratio(lp))), lp)  # eq. 3 has no ratio: 1 on policy
  zero = jnp.zeros(())
  metrics = _metrics(lp, lambda x: _group_mean(_seq_token_mean(x, lp), lp), policy_tok, None,
                     ent, ratio_mean, zero, zero,
                     **{"loss/exploration": -gmean(sg(explore)),
                        "loss/regularizer": -gmean(sg(regular)),
                        "logps/sample_mean": _group_mean(sg(seq), lp)})
  return -gmean(j), metrics
