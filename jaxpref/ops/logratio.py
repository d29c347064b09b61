"""Policy and reference per-token log-probs of a group batch in one call."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxpref.ops.logprobs import next_token_logps


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LogRatio:
  policy_tok: jax.Array  # float32[B, K, T], masked
  ref_tok: jax.Array  # float32[B, K, T], masked, no gradient
  ratio_tok: jax.Array  # policy_tok - ref_tok
  policy: jax.Array  # float32[B, K] masked sums
  ref: jax.Array
  length: jax.Array  # float32[B, K] tokens counted


def token_logratio(policy_logits: jax.Array, ref_logits: jax.Array, tokens: jax.Array,
                   loss_mask: jax.Array, *, impl: str = "auto", **kw) -> LogRatio:
  """Per-token `log pi - log pi_ref` and masked sums for logits [B, K, T, V], tokens [B, K, T].

  `loss_mask[t] = 1` counts log p(token t | < t). The gradient flows into `policy_logits`
  only: the reference's log-probs are under `stop_gradient`.
  """
  b, k, t = tokens.shape
  flat = lambda a: a.reshape(b * k, t, *a.shape[3:])
  mask = flat(loss_mask).astype(jnp.float32)
  tok = lambda logits: next_token_logps(flat(logits), flat(tokens), mask, impl=impl,
                                        **kw).reshape(b, k, t)
  pol = tok(policy_logits)
  ref = jax.lax.stop_gradient(tok(ref_logits))
  return LogRatio(policy_tok=pol, ref_tok=ref, ratio_tok=pol - ref, policy=pol.sum(-1),
                  ref=ref.sum(-1), length=loss_mask.astype(jnp.float32).sum(-1))
