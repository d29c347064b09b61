"""Per-token log-probabilities of realised tokens and their masked sums (plain XLA).

These are the XLA reference path; the Pallas kernels of the ops issue plug in beside them
under the same signatures.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logps(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """log p(tokens[t] | tokens[<t]) for t >= 1, and 0 at t = 0.

  logits: float[N, T, V], the prediction at position t is for token t+1.
  tokens: int32[N, T].  Returns float32[N, T], aligned with `tokens`.
  """
  logits = logits[:, :-1].astype(jnp.float32)  # [N, T-1, V]
  lse = jax.nn.logsumexp(logits, axis=-1)  # [N, T-1]
  picked = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(picked - lse, ((0, 0), (1, 0)))


def masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Sum over the last axis of `x * mask` (mask is 0/1, same shape)."""
  return jnp.sum(x * mask, axis=-1)
