"""Full-vocabulary reductions streamed over vocabulary chunks, so no [N, V] array exists:
the expected probability of the policy's own sample (WPO) and the per-token KL between two
models' next-token distributions (SparsePO, MaPO).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


_NEG = -1e30  # finite: exp(_NEG - m) is 0 and its gradient too, where -inf would give NaN


def _kl_update(carry, a, b):
  """Online-softmax step over one vocabulary chunk of policy (a) and reference (b) logits:
  running max and sum of exp for both, and e = sum_v exp(b_v - m_b) (a_v - b_v)."""
  m_a, s_a, m_b, s_b, e = carry
  new_a = jnp.maximum(m_a, a.max(-1))
  new_b = jnp.maximum(m_b, b.max(-1))
  p_b = jnp.exp(b - new_b[:, None])
  scale_b = jnp.exp(m_b - new_b)
  return (new_a, s_a * jnp.exp(m_a - new_a) + jnp.exp(a - new_a[:, None]).sum(-1),
          new_b, s_b * scale_b + p_b.sum(-1), e * scale_b + (p_b * (a - b)).sum(-1))


def _chunk_logits(x, wt, start, width, softcap):
  y = jnp.dot(x, jax.lax.dynamic_slice_in_dim(wt, start, width, axis=1).astype(x.dtype),
              preferred_element_type=jnp.float32)
  return softcap * jnp.tanh(y / softcap) if softcap else y


def vocab_log_prob_sq(h: jax.Array, w: jax.Array, softcap: float = 0.0,
                      chunk: int = 4096) -> jax.Array:
  """log sum_v p(v)^2 per row of p = softmax(h @ w), float32[N], without gradient.

  WPO's weight alignment divides each token's probability by this expected probability
  of the policy's own sample. Streamed over vocabulary chunks with running (max, sum of
  e^(z-m), sum of e^(2(z-m))), so no [N, V] array exists: log s2 - 2 log s1.
  """
  h, w = jax.lax.stop_gradient((h, w))
  v = w.shape[1]
  chunk = min(chunk, v)
  n_full, tail = divmod(v, chunk)

  def update(carry, start, width):
    m, s1, s2 = carry
    z = _chunk_logits(h, w, start, width, softcap)
    new = jnp.maximum(m, z.max(-1))
    e, c = jnp.exp(z - new[:, None]), jnp.exp(m - new)
    return new, s1 * c + e.sum(-1), s2 * c * c + (e * e).sum(-1)

  n = h.shape[0]
  carry = (jnp.full((n,), _NEG), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
  carry, _ = jax.lax.scan(lambda c, start: (update(c, start, chunk), None), carry,
                          jnp.arange(n_full, dtype=jnp.int32) * chunk)
  if tail:
    carry = update(carry, n_full * chunk, tail)
  _, s1, s2 = carry
  return jnp.log(s2) - 2.0 * jnp.log(s1)


def vocab_kl(h: jax.Array, w: jax.Array, h_ref: jax.Array, w_ref: jax.Array,
             softcap: float = 0.0, chunk: int = 4096) -> jax.Array:
  """k = sum_v p_ref(v) (log p_pol(v) - log p_ref(v)) <= 0 per row, float32[N].

  h, h_ref [N, D] hidden states and w, w_ref [D, V] LM heads of policy and reference (the
  reference side should come stop-gradient). The vocabulary is walked in chunks with an
  online softmax, each chunk rematerialised in the backward, so no [N, V] array is held:
  k = E_ref[a - b] - LSE(a) + LSE(b) for logits a (policy) and b (reference).
  """
  v = w.shape[1]
  chunk = min(chunk, v)
  n_full, tail = divmod(v, chunk)

  def update(carry, start, width):
    return _kl_update(carry, _chunk_logits(h, w, start, width, softcap),
                      _chunk_logits(h_ref, w_ref, start, width, softcap))

  n = h.shape[0]
  zeros = jnp.zeros((n,), jnp.float32)
  carry = (jnp.full((n,), _NEG), zeros, jnp.full((n,), _NEG), zeros, zeros)
  body = jax.checkpoint(lambda c, start: (update(c, start, chunk), None))
  carry, _ = jax.lax.scan(body, carry, jnp.arange(n_full, dtype=jnp.int32) * chunk)
  if tail:
    carry = update(carry, n_full * chunk, tail)
  m_a, s_a, m_b, s_b, e = carry
  k = e / s_b - (m_a + jnp.log(s_a)) + (m_b + jnp.log(s_b))
  # Minus a KL, so <= 0; float32 round-off may leave +1e-7 where the models agree (where
  # the gradient is 0 anyway).
  return jnp.minimum(k, 0.0)
