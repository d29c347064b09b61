"""PAL: Pluralistic Alignment via ideal points (docs/reward_models.md#pal, PAL-B).

A PAL reward model (`--role=reward --reward_head=pal`, `jaxpref/models/heads.py`) puts in
the RewardOutputs, per pair: the item points f(y) of both responses in `embed` [B, 2, E], the
prompt's K' prototype points g_k(x) in `prototypes` [B, K', E], and the record's user's
mixture weights w_u = softmax(W_u) in `mixture` [B, K']. The learned parameters (f, the
g_k maps, the W_u rows) live in the head, so the loss stays a pure function of the RewardOutputs.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp

from jaxpref.losses.common import weighted_mean
from jaxpref.losses.registry import register
from jaxpref.losses.reward import reward_metrics
from jaxpref.types import RewardOutputs

NORM_EPS = 1e-12  # inside the square root: the distance has a gradient at 0
MAX_SCALE = 100.0  # PAL-B clamps the angle scorer's scale exp(l) here
SCORERS = ("dist", "angle")


def norm(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(x * x, axis=-1) + NORM_EPS)


def ideal_point(lp: RewardOutputs) -> jax.Array:
  """a_u(x) = sum_k w_uk g_k(x): float32[B, E]."""
  return jnp.einsum("bk,bke->be", lp.mixture, lp.prototypes)


def pal_rewards(lp: RewardOutputs, scorer: str = "dist", logit_scale: float = math.log(1 / 0.07)):
  """r(y) [B, 2]: -||f(y) - a_u(x)|| ("dist": closer to the user's ideal point wins) or
  min(exp(l), 100) cos(f(y), a_u(x)) ("angle")."""
  a = ideal_point(lp)[:, None]  # [B, 1, E]
  f = lp.embed
  if scorer == "dist":
    return -norm(f - a)
  if scorer == "angle":
    cos = jnp.sum(f * a, -1) / (jnp.maximum(norm(f), 1e-8) * jnp.maximum(norm(a), 1e-8))
    return min(math.exp(logit_scale), MAX_SCALE) * cos
  raise ValueError(f"pal: scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")


def user_weights(lp: RewardOutputs) -> jax.Array:
  """Per-pair weights [B] that give every user in the batch the same total: weight / n_u,
  n_u the user's weight in the batch (PAL-B's `*_w` losses)."""
  if lp.user is None:  # one user: every pair counts alike
    return lp.weight
  same = (lp.user[:, None] == lp.user[None, :]).astype(jnp.float32)
  return lp.weight / jnp.maximum(same @ lp.weight, 1e-8)


def _check(lp: RewardOutputs) -> None:
  if lp.prototypes is None or lp.mixture is None or lp.embed is None:
    raise ValueError("pal reads a PAL head's item points, prototypes and user mixtures: run "
                     "--role=reward --reward_head=pal (docs/reward_models.md)")
  chex.assert_rank([lp.embed, lp.prototypes, lp.mixture], [3, 3, 2])
  if lp.embed.shape[1] != 2:
    raise ValueError(f"pal needs pairs (K=2, chosen first), got groups of {lp.embed.shape[1]}")


@register("pal", role="reward", ranges={"tau": "> 0"})
def pal(lp: RewardOutputs, *, scorer: str = "dist", tau: float = 1.0,
        logit_scale: float = math.log(1 / 0.07), proto_bound: float = 4.0,
        proto_penalty: float = 1.0, per_user_weighting: bool = False):
  """PAL: Sample-Efficient Personalized Reward Modeling for Pluralistic Alignment
  (RamyaLab's PAL-B, docs/reward_models.md#pal).

  l = -logsig((r(y_w) - r(y_l)) / tau) + lambda sum_k max(0, ||g_k(x)|| - B),
  r from `pal_rewards` with the ideal point a_u(x) = sum_k softmax(W_u)_k g_k(x); the
  two-way softmax cross-entropy of PAL-B is this logistic loss. `per_user_weighting`
  weighs pairs by 1/n_u so each user in the batch counts once. With one user and one
  prototype (w_u = 1) this is `bt` (tau) on the rewards -||f(y) - g(x)|| plus the penalty.
  """
  _check(lp)
  r = pal_rewards(lp, scorer, logit_scale)
  d = r[:, 0] - r[:, 1]
  per = -jax.nn.log_sigmoid(d / tau)
  w = user_weights(lp) if per_user_weighting else lp.weight
  penalty = jnp.sum(jax.nn.relu(norm(lp.prototypes) - proto_bound), axis=-1)  # [B]
  penalty = weighted_mean(penalty, lp.weight)
  metrics = reward_metrics(lp, d, jax.nn.sigmoid(d / tau), r)
  mix = jax.lax.stop_gradient(lp.mixture)
  metrics.update({
      "loss/proto_penalty": penalty,
      "pal/mixture_entropy": weighted_mean(-jnp.sum(mix * jnp.log(mix + 1e-12), -1), lp.weight),
      "pal/ideal_norm": weighted_mean(norm(jax.lax.stop_gradient(ideal_point(lp))), lp.weight)})
  return weighted_mean(per, w) + proto_penalty * penalty, metrics
