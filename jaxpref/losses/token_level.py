"""Objectives that read per-token log-probs (`Logps.policy_tok`, `ref_tok`, `mask` [B,K,T]).

Registered with `needs_tokens=True`, so the train step hands them the token arrays that
other losses never hold; SparsePO and MaPO also ask for the full-vocabulary `kl_tok` and
a `token_mask` (registry's `needs_vocab_kl`, `token_mask`).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxpref.losses.common import check_pairs, pair_loss, smoothed_logistic, weighted_mean
from jaxpref.losses.registry import register
from jaxpref.types import Logps


@register("ld_dpo", needs_tokens=True, ranges={"beta": "> 0", "label_smoothing": "[0, 0.5]"})
def ld_dpo(lp: Logps, *, beta: float = 0.1, ld_alpha: float = 0.5, label_smoothing: float = 0.0,
           ref_weighted: bool = False):
  """LD-DPO: Length Desensitization in Direct Preference Optimization (Liu et al. 2024).

  The policy's sequence log-prob keeps the first l_p = min(L_w, L_l) response tokens
  whole and scales the longer response's tail by ld_alpha:
  S'(y) = sum_{t <= l_p} lp_t + ld_alpha sum_{t > l_p} lp_t; the reference keeps its full
  sum (the paper's form), or with `ref_weighted` is weighted alike (TRL's `ld_alpha` since
  its DPO refactor, docs/trl.md; needs the per-token reference log-probs, so not with
  precomputed ones). Then cDPO's loss on beta (rho'_w - rho'_l). ld_alpha = 1 is DPO.
  """
  check_pairs(lp)
  chex.assert_rank(lp.policy_tok, 3)
  position = jnp.cumsum(lp.mask, axis=-1)  # 1-based index among the response tokens
  public = jnp.min(lp.length, axis=1)[:, None, None]  # [B, 1, 1]
  front = lp.mask * (position <= public)
  tail = lp.mask - front
  weighted = lambda tok: jnp.sum(tok * front, -1) + ld_alpha * jnp.sum(tok * tail, -1)
  ref = lp.ref
  if ref_weighted:
    if lp.ref_tok is None:
      raise ValueError("ld_dpo: ref_weighted=True weights the reference's tail tokens, but "
                       "this run has only sequence-level reference log-probs (precomputed)")
    ref = weighted(lp.ref_tok)
  rho = weighted(lp.policy_tok) - ref  # [B, 2]
  return pair_loss(lp, smoothed_logistic(beta * (rho[:, 0] - rho[:, 1]), label_smoothing), beta * rho)


def _masked_sum(x: jax.Array, m: jax.Array) -> jax.Array:
  return jnp.sum(x * m, axis=-1)


def _check_token_inputs(lp: Logps, name: str) -> None:
  check_pairs(lp)
  for field in ("policy_tok", "ref_tok", "mask", "kl_tok", "token_mask"):
    if getattr(lp, field) is None:
      raise ValueError(f"loss {name!r} reads Logps.{field}, which this Logps lacks (the train "
                       "step fills it for losses registered with needs_vocab_kl / token_mask)")
  chex.assert_rank(lp.token_mask, 4)


def _token_pair_loss(lp: Logps, beta: float, m_u: jax.Array, m_d: jax.Array, penalty,
                     extra: dict):
  """-logsig(beta (u - d)) + penalty, with u = sum m^u Delta |_w - |_l and d = sum m^d k |_w - |_l,
  and the standard metrics; rewards beta (sum m^u Delta - sum m^d k) per response, so that
  their margin is the loss's argument (HEBO logs beta (sum m^u Delta + sum m^d k))."""
  delta = (lp.policy_tok - lp.ref_tok) * lp.mask
  reward_part = _masked_sum(delta, m_u)  # [B, 2]
  kl_part = _masked_sum(lp.kl_tok * lp.mask, m_d)
  u = reward_part[:, 0] - reward_part[:, 1]
  d = kl_part[:, 0] - kl_part[:, 1]
  per_pair = -jax.nn.log_sigmoid(beta * (u - d)) + penalty
  n_tok = jnp.maximum(jnp.sum(lp.mask, axis=(1, 2)), 1.0)
  mean_over_tokens = lambda m: weighted_mean(jnp.sum(m * lp.mask, axis=(1, 2)) / n_tok, lp.weight)
  sg = jax.lax.stop_gradient
  metrics_extra = {
      "mask/reward_mean": mean_over_tokens(sg(m_u)),
      "mask/reward_density": mean_over_tokens((sg(m_u) > 0).astype(jnp.float32)),
      "mask/kl_mean": mean_over_tokens(sg(m_d)),
      "mask/kl_density": mean_over_tokens((sg(m_d) > 0).astype(jnp.float32)),
      "token/u": weighted_mean(sg(u), lp.weight),
      "token/d": weighted_mean(sg(d), lp.weight),
      "token/kl_mean": mean_over_tokens(sg(lp.kl_tok)),
  }
  loss, metrics = pair_loss(lp, per_pair, beta * (reward_part - kl_part), **extra)
  metrics.update(metrics_extra)
  return loss, metrics


@register("sparse_po", needs_tokens=True, needs_vocab_kl=True, token_mask="learned",
          ranges={"beta": "> 0"})
def sparse_po(lp: Logps, *, beta: float = 0.1, lambda_u: float = 0.001,
              lambda_d: float = 0.001, independent: bool = True):
  """SparsePO (docs/losses.md#sparse_po, huawei-noah/HEBO SparsePO): DPO's log-ratio and a per-token
  KL term, each weighted by learned token masks m >= 0 (the policy's mask network on the
  reference's per-layer states, models/token_mask.py) with an L1 penalty on the masks.

  l = -logsig(beta (u - d)) + lambda_u (|m^u_w|_1 + |m^u_l|_1) + lambda_d (|m^d_w|_1 + |m^d_l|_1)
  `independent` False: one shared mask (sparse-common) for both terms, both lambdas halved.
  """
  _check_token_inputs(lp, "sparse_po")
  masks = lp.token_mask * lp.mask[..., None]
  if independent and masks.shape[-1] < 2:
    raise ValueError(f"sparse_po(independent=True) needs 2 masks in Logps.token_mask, got "
                     f"{masks.shape[-1]}")
  m_u = masks[..., 0]
  m_d = masks[..., 1] if independent else m_u
  scale = 1.0 if independent else 0.5
  l1_u = jnp.sum(m_u, axis=(1, 2))  # |m_w|_1 + |m_l|_1 over response tokens, [B]
  l1_d = jnp.sum(m_d, axis=(1, 2))
  penalty = scale * (lambda_u * l1_u + lambda_d * l1_d)
  return _token_pair_loss(lp, beta, m_u, m_d, penalty,
                          {"mask_l1": weighted_mean(jax.lax.stop_gradient(penalty), lp.weight)})


MAPO_LAYERS = ("all", "last", "first_half", "last_half")


def zn_rescale(x: jax.Array, mask: jax.Array) -> jax.Array:
  """MaPO's `zn_rescale` over the last axis: z-normalise over the masked tokens (std with
  n - 1, as torch), then min-max rescale them to [0, 1]; 0 off the mask. A sequence whose
  masked values are all equal (or a single token) gets 1, the unmasked objective."""
  n = jnp.sum(mask, -1, keepdims=True)
  mean = jnp.sum(x * mask, -1, keepdims=True) / jnp.maximum(n, 1.0)
  var = jnp.sum(jnp.square(x - mean) * mask, -1, keepdims=True) / jnp.maximum(n - 1.0, 1.0)
  z = (x - mean) / (jnp.sqrt(var) + 1e-12)
  on = mask > 0
  lo = jnp.min(jnp.where(on, z, jnp.inf), -1, keepdims=True)
  hi = jnp.max(jnp.where(on, z, -jnp.inf), -1, keepdims=True)
  span = hi - lo
  flat = span <= 1e-6
  out = jnp.where(flat, 1.0, (z - lo) / jnp.where(flat, 1.0, span))
  return jnp.where(on, jnp.clip(out, 0.0, 1.0), 0.0)


@register("mapo", needs_tokens=True, needs_vocab_kl=True, token_mask="activations",
          ranges={"beta": "> 0"})
def mapo(lp: Logps, *, beta: float = 0.1, layers: str = "all"):
  """MaPO (docs/losses.md#mapo, huawei-noah/HEBO SparsePO repo): SparsePO's u - d with a fixed mask
  a_t from the reference's residual stream: per layer, the feature mean z-normalised and
  min-max rescaled over the response (`zn_rescale`), then averaged over `layers` (one of
  MAPO_LAYERS). l = -logsig(beta [(sum a Delta)_w - (sum a Delta)_l - ((sum a k)_w - (sum a k)_l)]).
  """
  _check_token_inputs(lp, "mapo")
  n = lp.token_mask.shape[-1]
  pick = {"all": slice(None), "last": slice(n - 1, n), "first_half": slice(0, max(1, n // 2)),
          "last_half": slice(n - max(1, n // 2), n)}
  if layers not in pick:
    raise ValueError(f"mapo: layers must be one of {', '.join(MAPO_LAYERS)}, got {layers!r}")
  acts = jnp.moveaxis(jax.lax.stop_gradient(lp.token_mask[..., pick[layers]]), -1, 0)
  a = jnp.mean(zn_rescale(acts, lp.mask), axis=0)  # [B, 2, T]
  return _token_pair_loss(lp, beta, a, a, 0.0, {})
