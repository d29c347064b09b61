"""Token-level policy-gradient losses for the online role (responses sampled in the loop).

Notation, per group b, response i and response token t (docs/online.md):
  lp_t = log pi(y_t | ...) under the current policy (`Logps.policy_tok`, 0 off the mask),
  old_t under the sampling policy (`Logps.old_tok`, no gradient; None: on-policy, old = lp),
  ref_t under the reference (`Logps.ref_tok`; only read when beta > 0 or for `kl/mean`),
  r_t = exp(lp_t - old_t) the importance ratio, A_i the response's advantage
  (`Logps.advantages`, from jaxpref/losses/advantages.py).
Every loss adds beta * KL_t (Schulman's k1/k2/k3 estimate of KL(pi || ref)) and subtracts
entropy_coef * H_t per token before its own normalisation; padded responses
(`valid` False) and padded groups (`weight` 0) drop out of every sum.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxpref.losses.registry import register
from jaxpref.types import Logps

sg = jax.lax.stop_gradient
KL_ESTIMATORS = ("k1", "k2", "k3")


def _check(lp: Logps, name: str) -> None:
  for field in ("policy_tok", "mask", "advantages"):
    if getattr(lp, field) is None:
      raise ValueError(f"loss {name!r} reads Logps.{field}, which this Logps lacks (the online "
                       "step fills it)")
  chex.assert_rank([lp.policy_tok, lp.advantages], [3, 2])
  chex.assert_equal_shape([lp.policy_tok, lp.mask])
  chex.assert_equal_shape([lp.advantages, lp.valid])
  if lp.old_tok is not None:
    chex.assert_equal_shape([lp.policy_tok, lp.old_tok])


def _seq_weight(lp: Logps) -> jax.Array:
  """w_bi = weight_b * valid_bi, float32[B, K]: how much each response counts."""
  return lp.weight[:, None] * lp.valid.astype(lp.weight.dtype)


def _log_ratio(lp: Logps) -> jax.Array:
  """lp_t - old_t, 0 off the mask so that exp() of padding never overflows, [B, K, T]."""
  old = lp.policy_tok if lp.old_tok is None else lp.old_tok
  return (lp.policy_tok - sg(old)) * lp.mask


# Reductions of per-token [B, K, T] (or per-response [B, K]) values to the scalar loss.

def _group_mean(x: jax.Array, lp: Logps) -> jax.Array:
  """DeepSeekMath's 1/G sum_i: the mean of x [B, K] over each group's valid responses, then
  the weighted mean over groups (a group with no valid response drops out)."""
  v = lp.valid.astype(x.dtype)
  n = jnp.sum(v, axis=1)
  per_group = jnp.sum(x * v, axis=1) / jnp.maximum(n, 1.0)
  w = lp.weight * (n > 0)
  return jnp.sum(per_group * w) / jnp.maximum(jnp.sum(w), 1e-8)


def _seq_token_mean(x: jax.Array, lp: Logps) -> jax.Array:
  """1/|o_i| sum_t x_t per response, [B, K]."""
  return jnp.sum(x * lp.mask, -1) / jnp.maximum(jnp.sum(lp.mask, -1), 1.0)


def _batch_token_mean(x: jax.Array, lp: Logps) -> jax.Array:
  """DAPO's token-level normalisation, sum over all tokens / number of tokens (weighted)."""
  w = lp.mask * _seq_weight(lp)[..., None]
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1e-8)


def _kl_tok(lp: Logps, estimator: str) -> jax.Array:
  """Schulman (2020), "Approximating KL divergence": with d = ref_t - lp_t (log of
  pi_ref / pi for a token sampled from pi), k1 = -d, k2 = d^2 / 2, k3 = (e^d - 1) - d."""
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
  d = (lp.ref_tok - lp.policy_tok) * lp.mask
  if estimator == "k1":
    return -d
  if estimator == "k2":
    return 0.5 * d * d
  return jnp.expm1(d) - d


def _entropy_tok(lp: Logps) -> jax.Array:
  """H_t ~ -lp_t, the sampled token's surprisal (an unbiased one-sample entropy estimate).

  Its plain gradient -grad lp_t has expectation zero under pi, so the value carries a
  score-function term: the gradient is -(1 + lp_t) grad lp_t, whose expectation is the
  entropy's gradient -E[lp grad lp] (on-policy; off-policy tokens are not reweighted).
  """
  x = lp.policy_tok
  return -x - sg(x) * (x - sg(x))


def _regularised(lp: Logps, policy_tok: jax.Array, beta: float, kl_estimator: str,
                 entropy_coef: float):
  """(per-token loss incl. beta KL_t - entropy_coef H_t, KL_t or None, H_t), [B, K, T]."""
  kl = None
  if beta or lp.ref_tok is not None:
    if lp.ref_tok is None:
      raise ValueError(f"beta={beta} needs Logps.ref_tok (the reference's per-token log-probs)")
    kl = _kl_tok(lp, kl_estimator)
  ent = _entropy_tok(lp)
  total = policy_tok - entropy_coef * ent
  if beta:
    total = total + beta * kl
  return total, kl, ent


def _metrics(lp: Logps, reduce, policy_tok, kl, ent, ratio_mean, low, high, **extra) -> dict:
  """The online metrics; `reduce` is the loss's own normalisation (for the `loss/` parts).

  `rewards/accuracy` is the share of valid responses with a positive advantage and
  `rewards/margin` the mean over groups of (max - min) advantage among a group's valid
  responses: 0 for groups whose responses all scored the same (DAPO's zero-variance groups).
  """
  w = _seq_weight(lp)
  adv = sg(lp.advantages)
  wmean = lambda x: jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1e-8)
  big = jnp.finfo(adv.dtype).max
  hi = jnp.max(jnp.where(lp.valid, adv, -big), axis=1)
  lo = jnp.min(jnp.where(lp.valid, adv, big), axis=1)
  spread = jnp.where(jnp.sum(lp.valid, axis=1) > 1, hi - lo, 0.0)
  tok = lambda x: _batch_token_mean(sg(x), lp)
  out = {
      "rewards/accuracy": wmean((adv > 0).astype(adv.dtype)),
      "rewards/margin": jnp.sum(spread * lp.weight) / jnp.maximum(jnp.sum(lp.weight), 1e-8),
      "policy/ratio_mean": ratio_mean,
      "clip/low_fraction": low,
      "clip/high_fraction": high,
      "kl/mean": tok(kl) if kl is not None else jnp.zeros(()),
      "entropy/mean": tok(ent),
      "loss/policy": reduce(sg(policy_tok)),
  }
  out.update(extra)
  return out


def _ppo(lp: Logps, reduce, epsilon_low, epsilon_high, delta, beta, kl_estimator, entropy_coef):
  """PPO's clipped surrogate per token, -min(r' A, clip(r, 1-eps_low, 1+eps_high) A), with
  r' = min(r, delta) when delta > 0 (two-sided clipping: bounds r for A < 0 too)."""
  ratio = jnp.exp(_log_ratio(lp))  # [B, K, T]
  adv = sg(lp.advantages)[..., None]
  capped = jnp.minimum(ratio, delta) if delta > 0 else ratio
  policy_tok = -jnp.minimum(capped * adv, jnp.clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv)
  total, kl, ent = _regularised(lp, policy_tok, beta, kl_estimator, entropy_coef)
  f = lambda c: _batch_token_mean(c.astype(ratio.dtype), lp)
  extra = {"clip/delta_fraction": f((ratio > delta) & (adv < 0))} if delta > 0 else {}
  return reduce(total), _metrics(
      lp, reduce, policy_tok, kl, ent, _batch_token_mean(sg(ratio), lp),
      f((ratio < 1 - epsilon_low) & (adv < 0)), f((ratio > 1 + epsilon_high) & (adv > 0)), **extra)


def _per_sequence(lp: Logps):
  return lambda x: _group_mean(_seq_token_mean(x, lp), lp)


@register("grpo", needs_tokens=True, role="online",
          ranges={"beta": ">= 0", "epsilon_low": ">= 0", "epsilon_high": ">= 0"})
def grpo(lp: Logps, *, epsilon_low: float = 0.2, epsilon_high: float = 0.2, delta: float = 0.0,
         beta: float = 0.04, kl_estimator: str = "k3", entropy_coef: float = 0.0):
  """GRPO (DeepSeekMath, Shao et al. 2024, eq. 3): the clipped surrogate averaged over each
  response's tokens (1/|o_i|), then over the group's G responses (1/G), then over groups.
  beta = 0.04 with k3 is the paper's KL term."""
  _check(lp, "grpo")
  return _ppo(lp, _per_sequence(lp), epsilon_low, epsilon_high, delta, beta, kl_estimator,
              entropy_coef)


@register("bnpo", needs_tokens=True, role="online",
          ranges={"beta": ">= 0", "epsilon_low": ">= 0", "epsilon_high": ">= 0"})
def bnpo(lp: Logps, *, epsilon_low: float = 0.2, epsilon_high: float = 0.2, delta: float = 0.0,
         beta: float = 0.0, kl_estimator: str = "k3", entropy_coef: float = 0.0):
  """TRL's `bnpo`: the clipped surrogate as a token mean over the batch (what `dapo` does,
  with GRPO's symmetric clip range)."""
  _check(lp, "bnpo")
  return _ppo(lp, lambda x: _batch_token_mean(x, lp), epsilon_low, epsilon_high, delta, beta,
              kl_estimator, entropy_coef)


@register("dr_grpo", needs_tokens=True, role="online",
          ranges={"beta": ">= 0", "epsilon_low": ">= 0", "epsilon_high": ">= 0"})
def dr_grpo(lp: Logps, *, epsilon_low: float = 0.2, epsilon_high: float = 0.2, delta: float = 0.0,
            beta: float = 0.0, kl_estimator: str = "k3", entropy_coef: float = 0.0,
            max_tokens: int = 0):
  """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): the token sum of each
  response divided by a constant, `max_tokens` (0: the row length T), not by |o_i|, so
  long wrong answers are not favoured; pair it with advantages `grpo` at scale="none"."""
  _check(lp, "dr_grpo")
  denom = float(max_tokens) if max_tokens > 0 else float(lp.mask.shape[-1])
  reduce = lambda x: _group_mean(jnp.sum(x * lp.mask, -1) / denom, lp)
  return _ppo(lp, reduce, epsilon_low, epsilon_high, delta, beta, kl_estimator, entropy_coef)


@register("dapo", needs_tokens=True, role="online",
          ranges={"beta": ">= 0", "epsilon_low": ">= 0", "epsilon_high": ">= 0"})
def dapo(lp: Logps, *, epsilon_low: float = 0.2, epsilon_high: float = 0.28, delta: float = 0.0,
         beta: float = 0.0, kl_estimator: str = "k3", entropy_coef: float = 0.0):
  """DAPO (Yu et al. 2025): clip-higher (eps_high = 0.28 > eps_low = 0.2) and the
  token-level normalisation 1 / sum_i |o_i| over the whole batch; no KL term by default."""
  _check(lp, "dapo")
  return _ppo(lp, lambda x: _batch_token_mean(x, lp), epsilon_low, epsilon_high, delta, beta,
              kl_estimator, entropy_coef)


@register("gspo", needs_tokens=True, role="online",
          ranges={"beta": ">= 0", "epsilon_low": ">= 0", "epsilon_high": ">= 0"})
def gspo(lp: Logps, *, epsilon_low: float = 3e-4, epsilon_high: float = 4e-4, delta: float = 0.0,
         beta: float = 0.0, kl_estimator: str = "k3", entropy_coef: float = 0.0):
  """GSPO (Zheng et al. 2025, arXiv 2507.18071): one importance ratio per response,
  s_i = exp(1/|o_i| sum_t (lp_t - old_t)), clipped per response:
  -min(s_i' A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i), averaged over the group; the
  paper's clip range (3e-4, 4e-4). KL / entropy terms are per-response token means."""
  _check(lp, "gspo")
  s = jnp.exp(_seq_token_mean(_log_ratio(lp), lp))  # [B, K]
  adv = sg(lp.advantages)
  capped = jnp.minimum(s, delta) if delta > 0 else s
  policy_seq = -jnp.minimum(capped * adv, jnp.clip(s, 1 - epsilon_low, 1 + epsilon_high) * adv)
  reg, kl, ent = _regularised(lp, jnp.zeros_like(lp.policy_tok), beta, kl_estimator, entropy_coef)
  reduce = _per_sequence(lp)
  w = _seq_weight(lp)
  f = lambda c: jnp.sum(c * w) / jnp.maximum(jnp.sum(w), 1e-8)
  metrics = _metrics(lp, reduce, jnp.zeros_like(lp.policy_tok), kl, ent, f(sg(s)),
                     f((s < 1 - epsilon_low) & (adv < 0)), f((s > 1 + epsilon_high) & (adv > 0)))
  metrics["loss/policy"] = _group_mean(sg(policy_seq), lp)
  return _group_mean(policy_seq, lp) + reduce(reg), metrics


@register("cispo", needs_tokens=True, role="online",
          ranges={"beta": ">= 0", "epsilon_low": ">= 0", "epsilon_high": ">= 0"})
def cispo(lp: Logps, *, epsilon_low: float = 1.0, epsilon_high: float = 4.0, beta: float = 0.0,
          kl_estimator: str = "k3", entropy_coef: float = 0.0):
  """CISPO (MiniMax-M1 report, arXiv 2506.13585): REINFORCE with the clipped importance
  weight as a stop-gradient coefficient, -sg(clip(r_t, 1-eps_low, 1+eps_high)) A_i lp_t,
  token mean over the batch. Every token keeps a gradient; eps_low = 1 leaves the weight unbounded
  below (the paper's choice), eps_high = 4 caps it at 5 (ScaleRL's recipe)."""
  _check(lp, "cispo")
  ratio = jnp.exp(_log_ratio(lp))
  coef = sg(jnp.clip(ratio, 1 - epsilon_low, 1 + epsilon_high))
  policy_tok = -coef * sg(lp.advantages)[..., None] * lp.policy_tok
  total, kl, ent = _regularised(lp, policy_tok, beta, kl_estimator, entropy_coef)
  reduce = lambda x: _batch_token_mean(x, lp)
  f = lambda c: _batch_token_mean(c.astype(ratio.dtype), lp)
  return reduce(total), _metrics(lp, reduce, policy_tok, kl, ent, _batch_token_mean(sg(ratio), lp),
                                 f(ratio < 1 - epsilon_low), f(ratio > 1 + epsilon_high))


@register("sapo", needs_tokens=True, role="online", ranges={"beta": ">= 0"})
def sapo(lp: Logps, *, tau_pos: float = 1.0, tau_neg: float = 1.05, beta: float = 0.0,
         kl_estimator: str = "k3", entropy_coef: float = 0.0):
  """SAPO ("Soft Adaptive Policy Optimization", Qwen, arXiv 2511.20347): a soft gate in place of
  the clip, l_t = -f(r_t) A_i with f(r) = (4 / tau) sigmoid(tau (r - 1)), tau = tau_pos when
  A_i > 0 else tau_neg; per-response token mean, then group mean (GRPO's). f'(1) = 1, so on
  policy the gradient is GRPO's; off policy it decays as sech^2(tau (r - 1) / 2)."""
  _check(lp, "sapo")
  ratio = jnp.exp(_log_ratio(lp))
  adv = sg(lp.advantages)[..., None]
  tau = jnp.where(adv > 0, tau_pos, tau_neg)
  policy_tok = -(4.0 / tau) * jax.nn.sigmoid(tau * (ratio - 1.0)) * adv
  total, kl, ent = _regularised(lp, policy_tok, beta, kl_estimator, entropy_coef)
  reduce = _per_sequence(lp)
  # "Clipped" here: tokens whose gate passes under half of the unclipped gradient.
  p = jax.nn.sigmoid(tau * (ratio - 1.0))
  damped = 4.0 * p * (1.0 - p) < 0.5
  f = lambda c: _batch_token_mean(c.astype(ratio.dtype), lp)
  return reduce(total), _metrics(lp, reduce, policy_tok, kl, ent, _batch_token_mean(sg(ratio), lp),
                                 f(damped & (ratio < 1)), f(damped & (ratio > 1)))
