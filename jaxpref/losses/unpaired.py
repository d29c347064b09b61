"""Unpaired objectives: one labelled completion per prompt (KTO-style data).

Groups are K=2 as built by `jaxpref.data.UnpairedDataset`: member 0 is the labelled
completion (`label` 1 desirable, 0 undesirable), member 1 a mismatched completion
(`label` -1) used only for the KL reference point z0 = mean(rho) over those mismatched
completions. Under `jit` on a sharded batch that mean is over the global batch, so the
reference point is averaged across devices as KTO prescribes.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxpref.losses.common import logratios, weighted_mean
from jaxpref.losses.registry import register
from jaxpref.types import Logps


def _check_unpaired(lp: Logps) -> None:
  chex.assert_rank(lp.policy, 2)
  chex.assert_axis_dimension(lp.policy, 1, 2)
  if lp.label is None:
    raise ValueError("unpaired losses need labelled data: --data_format=unpaired "
                     "(prompt/completion/label records) or --data_format=pairs_as_unpaired")


def _kl_point(lp: Logps, rho: jax.Array) -> jax.Array:
  """stop-gradient mean log-ratio of the mismatched completions (weight-0 groups excluded)."""
  return jax.lax.stop_gradient(weighted_mean(rho[:, 1], lp.weight))


def _unpaired_metrics(lp: Logps, rewards: jax.Array, z: jax.Array) -> dict[str, jax.Array]:
  """`chosen` = desirable completions, `rejected` = undesirable ones; accuracy: the share of
  completions on the side of the reference point their label says (ties half)."""
  desirable = lp.label[:, 0] == 1
  w = lp.weight
  wd, wu = w * desirable, w * ~desirable
  r = jax.lax.stop_gradient(rewards)
  lp0 = jax.lax.stop_gradient(lp.policy[:, 0])
  side = jnp.sign(r - z) * jnp.where(desirable, 1.0, -1.0)
  chosen, rejected = weighted_mean(r, wd), weighted_mean(r, wu)
  return {
      "rewards/chosen": chosen,
      "rewards/rejected": rejected,
      "rewards/margin": chosen - rejected,
      "rewards/accuracy": weighted_mean(0.5 * (side + 1.0), w),
      "rewards/ties": weighted_mean((side == 0).astype(jnp.float32), w),
      "logps/chosen": weighted_mean(lp0, wd),
      "logps/rejected": weighted_mean(lp0, wu),
      "kl": z,
  }


def _kto_form(lp: Logps, beta: float, desirable_weight: float, undesirable_weight: float,
              z: jax.Array):
  rho = logratios(lp)[:, 0]
  desirable = lp.label[:, 0] == 1
  per = jnp.where(desirable,
                  desirable_weight * (1.0 - jax.nn.sigmoid(beta * (rho - z))),
                  undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z - rho))))
  return weighted_mean(per, lp.weight), _unpaired_metrics(lp, beta * rho, beta * z)


@register("kto", ranges={"beta": "> 0"})
def kto(lp: Logps, *, beta: float = 0.1, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0):
  """KTO: Model Alignment as Prospect Theoretic Optimization (docs/losses.md#kto), as TRL computes it.

  z0 = max(0, stopgrad(mean rho(y'))) over mismatched completions y'; desirable:
  lambda_D (1 - sig(beta (rho - z0))), undesirable: lambda_U (1 - sig(beta (z0 - rho))).
  """
  _check_unpaired(lp)
  z = jnp.maximum(_kl_point(lp, logratios(lp)), 0.0)
  return _kto_form(lp, beta, desirable_weight, undesirable_weight, z)


@register("apo", ranges={"beta": "> 0"})
def apo(lp: Logps, *, beta: float = 0.1, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0, kl_min: float = -5.0, kl_max: float = 5.0):
  """Action Preference Optimization for VLA policies (docs/losses.md#apo), KTO form.

  As KTO with the reference point clip(stopgrad(mean rho(y')), kl_min, kl_max). APO's
  adaptive per-sample weights (from continuous action errors) come in as the records'
  `weight` field; the paper sums the weighted losses where this takes their weighted mean.
  """
  _check_unpaired(lp)
  z = jnp.clip(_kl_point(lp, logratios(lp)), kl_min, kl_max)
  return _kto_form(lp, beta, desirable_weight, undesirable_weight, z)


@register("apo_zero_unpaired", ranges={"beta": "> 0"})
def apo_zero_unpaired(lp: Logps, *, beta: float = 0.1):
  """Anchored Preference Optimization, unpaired APO-zero (TRL): KTO's form without z0.

  desirable: 1 - sig(beta rho); undesirable: sig(beta rho).
  """
  _check_unpaired(lp)
  rho = logratios(lp)[:, 0]
  desirable = lp.label[:, 0] == 1
  per = jnp.where(desirable, 1.0 - jax.nn.sigmoid(beta * rho), jax.nn.sigmoid(beta * rho))
  return weighted_mean(per, lp.weight), _unpaired_metrics(lp, beta * rho, jnp.zeros(()))


@register("bco", ranges={"beta": "> 0"})
def bco(lp: Logps, *, beta: float = 0.1):
  """Binary Classifier Optimization for LLM Alignment (Jung et al. 2024), unpaired.

  A logistic classifier on the implicit reward r = beta rho, shifted by delta:
  desirable -logsig(r - delta), undesirable -logsig(-(r - delta)). TRL's delta is a running
  mean of rewards across steps (and BCO adds density-ratio importance weights from an
  embedding classifier, not built); here delta is the batch's mean reward (stop-gradient).
  """
  _check_unpaired(lp)
  r = beta * logratios(lp)[:, 0]
  delta = jax.lax.stop_gradient(weighted_mean(r, lp.weight))
  desirable = lp.label[:, 0] == 1
  per = -jax.nn.log_sigmoid(jnp.where(desirable, r - delta, delta - r))
  metrics = _unpaired_metrics(lp, r, delta)
  metrics["delta"] = delta
  return weighted_mean(per, lp.weight), metrics
