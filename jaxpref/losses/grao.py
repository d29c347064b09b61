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

The online rollouts append each record's `chosen` answer to its group as y (the loss
declares the field in losses/extra_members.py; train/answers.py lays it out), so the
registered `grao` reads groups of G + 1: the samples, then y.
"""

from __future__ import annotations

import dataclasses

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


@register("grao", needs_tokens=True, role="online",
          ranges={"imitation": ">= 0", "lam": ">= 0"})
def grao(lp: Logps, *, imitation: float = 0.5, lam: float = 0.6):
  """GRAO, eq. 3: the group's last member is the record's reference answer y (the rollouts
  append it, train/answers.py), the others the K samples; loss = -J averaged over groups.
  `imitation` is the paper's beta (0.5), `lam` its lambda (0.6)."""
  _check(lp, "grao")
  if lp.policy_tok.shape[1] < 2:
    raise ValueError("loss 'grao' reads groups of K samples plus the reference answer: got "
                     f"groups of {lp.policy_tok.shape[1]}")
  seq = _seq_token_mean(lp.policy_tok, lp)  # l(.) of every member, [B, K + 1]
  valid = lp.valid[:, :-1]
  j, explore, imitate, regular = grao_objective(
      seq[:, :-1], lp.advantages[:, :-1], valid, seq[:, -1], lp.advantages[:, -1],
      beta=imitation, lam=lam)
  w = lp.weight * (jnp.sum(valid, axis=1) > 0)
  gmean = lambda x: jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1e-8)
  # The shared online metrics over the samples, the policy term per token as -A lp_t.
  samples = dataclasses.replace(
      lp, policy_tok=lp.policy_tok[:, :-1], mask=lp.mask[:, :-1], valid=valid,
      advantages=lp.advantages[:, :-1],
      old_tok=None if lp.old_tok is None else lp.old_tok[:, :-1],
      ref_tok=None if lp.ref_tok is None else lp.ref_tok[:, :-1])
  policy_tok = -sg(samples.advantages)[..., None] * samples.policy_tok
  ent = _entropy_tok(samples)
  ratio_mean = _batch_token_mean(sg(jnp.exp(_log_ratio(samples))), samples)  # 1 on policy
  zero = jnp.zeros(())
  metrics = _metrics(samples, lambda x: _group_mean(_seq_token_mean(x, samples), samples),
                     policy_tok, None, ent, ratio_mean, zero, zero,
                     **{"loss/exploration": -gmean(sg(explore)),
                        "loss/imitation": -gmean(sg(imitate)),
                        "loss/regularizer": -gmean(sg(regular)),
                        "logps/sample_mean": _group_mean(sg(seq[:, :-1]), samples),
                        "logps/answer": gmean(sg(seq[:, -1])),
                        "advantages/answer": gmean(sg(lp.advantages[:, -1]))})
  return -gmean(j), metrics
