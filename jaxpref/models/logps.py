"""Per-token log-probs of realised tokens from a decoder's forward pass: every group member
of a `GroupBatch`, or the response tokens of packed rows (`SharedPromptBatch`,
`PackedBatch`), and the token-level extras some losses read (the full-vocabulary KL, the
token-mask inputs, WPO's expected self-probability).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpref import ops
from jaxpref.data.packing import PackedBatch
from jaxpref.data.shared_prompt import SharedPromptBatch
from jaxpref.models import token_mask
from jaxpref.types import GroupBatch


@dataclasses.dataclass(frozen=True)
class LogpsOptions:
  """How per-token log-probs are computed (`--logps_impl`, `--fused_lm_head`)."""
  impl: str = "auto"  # ops.IMPLS, used when the logits are materialised
  fused_lm_head: bool = True  # LM head fused into the log-softmax: no [N, T, V] logits


def _packed_token_logps(model, batch: SharedPromptBatch | PackedBatch,
                        opts: LogpsOptions, prob_sq: bool = False):
  """float32[B, K, R] log-probs of each response's tokens, read from packed rows: one
  shared-prompt row per group, or a `PackedBatch` block's K rows per m groups (and, with
  `prob_sq`, the [B, K] sums of `vocab_log_prob_sq` over those tokens)."""
  p = batch.tokens.shape[0]
  flat = lambda x: x.reshape(-1, x.shape[-1])  # [P, K, L] blocks -> [P*K, L] rows
  h = model.hidden(flat(batch.tokens), segment_ids=flat(batch.segment_ids),
                   positions=flat(batch.positions),
                   shared_prompt=isinstance(batch, SharedPromptBatch))
  h = h.reshape(p, -1, h.shape[-1])  # [P, rows*L, D]: pred_index counts within a block
  rows = jnp.take_along_axis(h, batch.pred_index.reshape(p, -1, 1), axis=1)
  rows = rows.reshape(*batch.pred_index.shape, -1)
  w = model.lm_head_weight().astype(h.dtype)
  if opts.fused_lm_head:
    logp, _ = ops.fused_linear_logps(rows, w, batch.targets, batch.loss_mask,
                                     softcap=model.config.final_logit_softcap)
  else:
    logp, _ = ops.token_logps(model.logits(rows), batch.targets, batch.loss_mask, impl=opts.impl)
  logp = logp.reshape(-1, *logp.shape[-2:])  # a PackedBatch's [P, m, K, R] -> [P*m, K, R]
  if not prob_sq:
    return logp
  sq = ops.vocab_log_prob_sq(rows.reshape(-1, rows.shape[-1]), model.lm_head_weight(),
                         model.config.final_logit_softcap).reshape(batch.loss_mask.shape)
  return logp, (sq * batch.loss_mask).sum(-1).reshape(logp.shape[:2])


def token_logps(graphdef: nnx.GraphDef, params: Any,
                batch: GroupBatch | SharedPromptBatch | PackedBatch,
                opts: LogpsOptions = LogpsOptions(), prob_sq: bool = False):
  """Masked per-token log-probs float32[B, K, T] of every group member's realised tokens
  ([B, K, R], response tokens only, for a `SharedPromptBatch` or `PackedBatch`)."""
  model = nnx.merge(graphdef, params)
  if isinstance(batch, (SharedPromptBatch, PackedBatch)):
    return _packed_token_logps(model, batch, opts, prob_sq)
  b, k, t = batch.tokens.shape
  tokens, mask, segment_ids = (x.reshape(b * k, t) for x in
                               (batch.tokens, batch.loss_mask, batch.segment_ids))
  h = model.hidden(tokens, segment_ids=segment_ids)
  logp = _head_logps(model, h, tokens, mask, opts).reshape(b, k, t)
  return (logp, _prob_sq(model, h, mask).reshape(b, k)) if prob_sq else logp


def _prob_sq(model, h: jax.Array, mask: jax.Array) -> jax.Array:
  """[N] masked sums of log sum_v pi(v|t)^2 over each row's tokens; position t-1 predicts
  token t, as for its log-prob."""
  d = h.shape[-1]
  sq = ops.vocab_log_prob_sq(h[:, :-1].reshape(-1, d), model.lm_head_weight(),
                         model.config.final_logit_softcap).reshape(h.shape[0], -1)
  return (sq * mask[:, 1:]).sum(-1)


def _head_logps(model, h: jax.Array, tokens: jax.Array, mask: jax.Array,
                opts: LogpsOptions) -> jax.Array:
  """float32[N, T] masked log-probs of `tokens` from hidden states `h` [N, T, D]."""
  if opts.fused_lm_head:
    # Position t predicts token t+1, whose loss-mask entry decides whether it counts.
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    row_mask = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
    logp, _ = ops.fused_linear_logps(h, model.lm_head_weight().astype(h.dtype), targets,
                                     row_mask, softcap=model.config.final_logit_softcap)
    return jnp.pad(logp[:, :-1], ((0, 0), (1, 0)))
  return ops.next_token_logps(model.logits(h), tokens, mask, impl=opts.impl)


def token_level_logps(graphdef: nnx.GraphDef, params: Any, ref_params: Any, batch: GroupBatch,
                      needs: Any, opts: LogpsOptions = LogpsOptions()):
  """(policy_tok, ref_tok, extras) [B, K, T] for losses that ask for `Logps.kl_tok` or
  `token_mask` (`needs`, a losses.TokenNeeds): one forward pass of each model serves the
  log-probs, the full-vocabulary k_t and the reference's per-layer states.

  Token t's k_t and mask come from position t-1, the state that predicts token t, as its
  log-prob does; all are 0 off the loss mask.
  """
  if isinstance(batch, (SharedPromptBatch, PackedBatch)):
    raise ValueError("losses that read Logps.kl_tok or token_mask (sparse_po, mapo) are not "
                     "supported with --shared_prompt or --batching=pack; use --batching=pad or "
                     "buckets")
  model, ref = nnx.merge(graphdef, params), nnx.merge(graphdef, ref_params)
  b, k, t = batch.tokens.shape
  tokens, mask, segment_ids = (x.reshape(b * k, t) for x in
                               (batch.tokens, batch.loss_mask, batch.segment_ids))
  h = model.hidden(tokens, segment_ids=segment_ids)
  h_ref = ref.hidden(tokens, segment_ids=segment_ids, all_layers=bool(needs.token_mask))
  h_ref, states = (h_ref if needs.token_mask else (h_ref, None))
  h_ref, states = jax.lax.stop_gradient((h_ref, states))
  policy_tok = _head_logps(model, h, tokens, mask, opts).reshape(b, k, t)
  ref_tok = _head_logps(ref, h_ref, tokens, mask, opts).reshape(b, k, t)
  shift = lambda x: jnp.pad(x, ((0, 0), (1, 0)) + ((0, 0),) * (x.ndim - 2))  # t-1 -> t
  extras = {}
  if needs.vocab_kl:
    d = h.shape[-1]
    kl = ops.vocab_kl(h[:, :-1].reshape(-1, d), model.lm_head_weight(),
                  h_ref[:, :-1].reshape(-1, d), jax.lax.stop_gradient(ref.lm_head_weight()),
                  model.config.final_logit_softcap)
    extras["kl_tok"] = (shift(kl.reshape(b * k, t - 1)) * mask).reshape(b, k, t)
  if needs.token_mask == "learned":
    net = getattr(model, token_mask.ATTR, None)
    if net is None:
      raise ValueError("this loss trains a token-mask network, but the policy has none: build "
                       "the policy with jaxpref.models.token_mask.attach(model, needs)")
    masks = net(states[:, :, :-1])  # [N, T-1, M]
  elif needs.token_mask == "activations":
    masks = jnp.moveaxis(states[:, :, :-1].mean(-1), 0, -1)  # [N, T-1, L] feature means
  if needs.token_mask:
    extras["token_mask"] = (shift(masks) * mask[..., None]).reshape(b, k, t, -1)
  if needs.prob_sq:
    extras["prob_sq"] = _prob_sq(model, h, mask).reshape(b, k)
  return policy_tok, ref_tok, extras
