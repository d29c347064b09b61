"""Pairwise objectives without a reference model: SimPO, ORPO, CPO.

They read the policy's sequence log-probs only (`lp.ref` is ignored), so a run with them
can skip the reference forward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpref.losses.common import (avg_logps, check_pairs, chosen_nll, log1mexp, pair_metrics,
                                   smoothed_logistic, weighted_mean)
from jaxpref.losses.registry import register
from jaxpref.types import Logps

logsig = jax.nn.log_sigmoid


@register("simpo", ranges={"beta": "> 0", "label_smoothing": "[0, 0.5]"})
def simpo(lp: Logps, *, beta: float = 2.0, gamma_beta_ratio: float = 0.25,
          label_smoothing: float = 0.0, hinge: bool = False, sft_weight: float = 0.0,
          length_normalize: bool = True):
  """SimPO: Simple Preference Optimization with a Reference-Free Reward (docs/losses.md#simpo).

  z = beta ((A_w - A_l) - gamma/beta), A the length-averaged log-prob (the official
  trainer's parameterisation); l = -(1-eps) logsig(z) - eps logsig(-z), or relu(1 - z)
  with `hinge`; plus sft_weight * NLL(y_w). `length_normalize=False` uses summed
  log-probs (the ablation of the paper's Table 5).
  """
  check_pairs(lp)
  s = avg_logps(lp) if length_normalize else lp.policy
  z = beta * ((s[:, 0] - s[:, 1]) - gamma_beta_ratio)
  if hinge:
    per = jax.nn.relu(1.0 - z)
  else:
    per = smoothed_logistic(z, label_smoothing)
  nll = chosen_nll(lp)
  metrics = pair_metrics(lp, beta * s)
  metrics["loss/nll"] = nll
  return weighted_mean(per, lp.weight) + sft_weight * nll, metrics


ORPO_NLL = ("response", "sequence")


def chosen_sequence_nll(lp: Logps) -> jax.Array:
  """Token-mean NLL of the chosen sequences' prompt (after BOS) and response tokens over the
  batch: TRL's ORPO term (cross-entropy on every attended token of prompt + chosen)."""
  if lp.prompt_policy is None:
    raise ValueError("orpo nll='sequence' reads the prompt tokens' log-probs, which the step "
                     "computes with --batching=pad or buckets only (not --batching=pack or "
                     "--shared_prompt)")
  w = lp.weight
  logp = lp.policy[:, 0] + lp.prompt_policy[:, 0]
  count = lp.length[:, 0] + lp.prompt_length[:, 0]
  return jnp.sum(-logp * w) / jnp.maximum(jnp.sum(count * w), 1.0)


@register("orpo", needs_prompt=True, ranges={"beta": "> 0"})
def orpo(lp: Logps, *, beta: float = 0.1, nll: str = "response"):
  """ORPO: Monolithic Preference Optimization without Reference Model (docs/losses.md#orpo).

  l = NLL(y_w) - beta logsig(logodds(y_w) - logodds(y_l)), logodds(y) = A - log(1 - e^A),
  A the length-averaged log-prob; `beta` is the paper's lambda (TRL's name). `nll`:
  "response" averages the NLL over the chosen response's tokens; "sequence" over its
  prompt and response tokens, as TRL's ORPOTrainer does (docs/trl.md).
  """
  if nll not in ORPO_NLL:
    raise ValueError(f"orpo: nll must be one of {ORPO_NLL}, got {nll!r}")
  check_pairs(lp)
  a = avg_logps(lp)
  logodds = a - log1mexp(a)
  ratio = logsig(logodds[:, 0] - logodds[:, 1])
  nll = chosen_nll(lp) if nll == "response" else chosen_sequence_nll(lp)
  metrics = pair_metrics(lp, beta * a)
  metrics.update({"loss/nll": nll, "loss/log_odds_ratio": weighted_mean(ratio, lp.weight)})
  return nll - beta * weighted_mean(ratio, lp.weight), metrics


@register("cpo", ranges={"beta": "> 0", "label_smoothing": "[0, 0.5]"})
def cpo(lp: Logps, *, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0):
  """Contrastive Preference Optimization (Xu et al. 2024), TRL's sigmoid form.

  l = -(1-eps) logsig(beta (S_w - S_l)) - eps logsig(-beta (S_w - S_l)) + alpha NLL(y_w),
  on summed policy log-probs.
  """
  check_pairs(lp)
  z = beta * (lp.policy[:, 0] - lp.policy[:, 1])
  per = smoothed_logistic(z, label_smoothing)
  nll = chosen_nll(lp)
  metrics = pair_metrics(lp, beta * lp.policy)
  metrics["loss/nll"] = nll
  return weighted_mean(per, lp.weight) + alpha * nll, metrics
