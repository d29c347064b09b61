"""Advantage estimators by name: `(scores [B, K], valid [B, K], **kw) -> advantages [B, K]`.

Pure jnp functions of one rollout batch's scalar rewards (one per response, K per prompt);
the online losses (jaxpref/losses/online.py) read the result as `Logps.advantages`.
Responses with `valid` False (padding) get advantage 0 and never enter a mean or a std;
pass `valid & (weight > 0)[:, None]` so that padded groups stay out of batch statistics.
Also DAPO's dynamic-sampling test (groups whose scores carry no signal).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxpref import named

AdvantageFn = Callable[..., jax.Array]
_TABLE: named.Table[AdvantageFn] = named.Table("advantage estimator")
SCALES = ("group", "batch", "none")


register, get, names = _TABLE.register, _TABLE.get, _TABLE.names


def compute(name: str, scores, valid, **kw) -> jax.Array:
  """`get(name)(scores, valid, **kw)` as float32 [B, K]."""
  scores = jnp.asarray(scores, jnp.float32)
  valid = jnp.asarray(valid, bool)
  if scores.ndim != 2 or scores.shape != valid.shape:
    raise ValueError(f"advantages: scores {scores.shape} and valid {valid.shape} must both be "
                     "[B, K]")
  return get(name)(scores, valid, **kw)


def _group_stats(scores: jax.Array, v: jax.Array):
  """(n [B, 1], mean [B, 1]) over each group's valid responses."""
  n = jnp.sum(v, axis=1, keepdims=True)
  return n, jnp.sum(scores * v, axis=1, keepdims=True) / jnp.maximum(n, 1.0)


def _batch_std(x: jax.Array, v: jax.Array, ddof: int) -> jax.Array:
  """Standard deviation of x over every valid response of the batch (scalar)."""
  n = jnp.sum(v)
  mean = jnp.sum(x * v) / jnp.maximum(n, 1.0)
  return jnp.sqrt(jnp.sum(((x - mean) * v) ** 2) / jnp.maximum(n - ddof, 1.0))


@register("grpo")
def grpo(scores: jax.Array, valid: jax.Array, *, scale: str = "group",
         eps: float = 1e-4) -> jax.Array:
  """GRPO's outcome advantage (DeepSeekMath §4.1.2): A_i = (r_i - mean(r)) / (std + eps).

  The mean is the group's; `scale` picks the std: "group" (the paper's), "batch" (the
  std of every valid score in the batch, the group-mean / batch-std mix of Lite PPO and
  ScaleRL) or "none" (Dr. GRPO: no division, which removes the question-difficulty bias).
  Stds use Bessel's correction and eps = 1e-4 (TRL's; Pref-GRPO's code uses 1e-8), so a
  group of equal scores gets A = 0, not 0/0. A group with one valid response gets 0.
  """
  if scale not in SCALES:
    raise ValueError(f"advantages grpo: scale must be one of {SCALES}, got {scale!r}")
  v = valid.astype(scores.dtype)
  n, mean = _group_stats(scores, v)
  centred = (scores - mean) * v
  if scale == "none":
    return centred
  if scale == "group":
    std = jnp.sqrt(jnp.sum(centred ** 2, axis=1, keepdims=True) / jnp.maximum(n - 1, 1.0))
  else:
    std = _batch_std(scores, v, ddof=1)
  return centred / (std + eps)


@register("rloo")
def rloo(scores: jax.Array, valid: jax.Array) -> jax.Array:
  """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): the baseline of
  response i is the mean of the other valid responses of its group,
  A_i = r_i - (sum_j r_j - r_i) / (n - 1) = n / (n - 1) (r_i - mean(r)); 0 when n < 2."""
  v = valid.astype(scores.dtype)
  n, mean = _group_stats(scores, v)
  return jnp.where(n > 1, n / jnp.maximum(n - 1, 1.0) * (scores - mean), 0.0) * v


@register("reinforce_pp")
def reinforce_pp(scores: jax.Array, valid: jax.Array, *, group_baseline: bool = False,
                 eps: float = 1e-8) -> jax.Array:
  """REINFORCE++ (Hu 2025): the return normalised over the whole batch,
  A = (R - mean_batch(R)) / (std_batch(R) + eps) (population std); `group_baseline` first
  subtracts each group's mean (REINFORCE++-baseline). The paper's reward already carries
  the KL penalty, R = score - beta sum_t KL_t: the caller forms R before calling this."""
  v = valid.astype(scores.dtype)
  x = scores
  if group_baseline:
    x = scores - _group_stats(scores, v)[1]
  mean = jnp.sum(x * v) / jnp.maximum(jnp.sum(v), 1.0)
  return (x - mean) * v / (_batch_std(x, v, ddof=0) + eps)


@register("plain")
def plain(scores: jax.Array, valid: jax.Array) -> jax.Array:
  """The scores as they are (already advantages, e.g. win rates centred by the caller)."""
  return scores * valid.astype(scores.dtype)


def zero_variance_groups(scores, valid, *, atol: float = 0.0) -> jax.Array:
  """bool[B]: groups whose valid scores are all equal (within atol), e.g. all right or all
  wrong under a 0/1 verifier. Their group-relative advantages are 0: no gradient signal.
  A group with fewer than two valid responses counts as zero-variance."""
  scores = jnp.asarray(scores, jnp.float32)
  valid = jnp.asarray(valid, bool)
  hi = jnp.max(jnp.where(valid, scores, -jnp.inf), axis=1)
  lo = jnp.min(jnp.where(valid, scores, jnp.inf), axis=1)
  return (jnp.sum(valid, axis=1) < 2) | (hi - lo <= atol)


def dynamic_sampling(scores, valid, weight=None, *, atol: float = 0.0):
  """DAPO's dynamic sampling (Yu et al. 2025, §3.2): (keep bool[B], zero-variance fraction).

  `keep` marks the groups with some spread in their scores; DAPO over-samples prompts and
  fills the batch with kept groups only. The fraction is over groups with weight > 0
  (all groups when `weight` is None), the share of the rollout that carried no signal.
  """
  zero = zero_variance_groups(scores, valid, atol=atol)
  live = jnp.ones(zero.shape, bool) if weight is None else jnp.asarray(weight) > 0
  frac = jnp.sum(zero & live) / jnp.maximum(jnp.sum(live), 1)
  return ~zero, frac
