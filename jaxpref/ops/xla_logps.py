"""Plain-XLA per-token log-probs streamed over vocabulary blocks (the Pallas kernels' twin).

The forward walks the vocabulary in blocks of `block_v` columns with an online
max / log-sum-exp, so no float32 `[N, V]` array is ever held: the temporaries are
`[N, block_v]`. The backward is one elementwise expression of (logits, lse, target), which
XLA fuses into the loop that writes the `[N, V]` gradient, so nothing `[N, V]` is saved
between the passes either: the residuals are the logits themselves and `[N]` vectors.

Measured caveat (XLA:CPU, jax 0.10): for bfloat16 logits the CPU compiler hoists the
float32 convert of the whole array out of the block loop, so the program holds one float32
`[N, V]` copy (naive holds two). float32 logits stream as intended.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


def online_update(carry, x, cols, targets):
  """One vocabulary block into the running (max, sum of exp, picked logit); x float32[N, b]."""
  m, s, picked = carry
  m_new = jnp.maximum(m, jnp.max(x, axis=-1))
  # A row whose entries so far are all -inf keeps m = -inf; exp(-inf - -inf) would be nan.
  scale = jnp.where(m == NEG_INF, 0.0, jnp.exp(m - m_new))
  s = s * scale + jnp.sum(jnp.exp(x - m_new[:, None]), axis=-1)
  picked = picked + jnp.sum(jnp.where(cols == targets[:, None], x, 0.0), axis=-1)
  return m_new, s, picked


def _forward_stats(logits: jax.Array, targets: jax.Array, block_v: int):
  """(picked logit, lse) float32[N] of logits [N, V] by vocabulary blocks."""
  n, v = logits.shape
  bv = min(block_v, v)
  n_full = v // bv
  init = (jnp.full((n,), NEG_INF, jnp.float32), jnp.zeros((n,), jnp.float32),
          jnp.zeros((n,), jnp.float32))

  def block(carry, start, width):
    x = jax.lax.dynamic_slice_in_dim(logits, start, width, axis=1).astype(jnp.float32)
    cols = start + jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
    return online_update(carry, x, cols, targets)

  carry = jax.lax.fori_loop(0, n_full, lambda j, c: block(c, j * bv, bv), init)
  if v % bv:  # the ragged last block, at a static offset
    carry = block(carry, n_full * bv, v % bv)
  m, s, picked = carry
  return picked, m + jnp.log(s)


def logits_grad(logits, targets, lse, g_logp, g_lse):
  """d/dlogits of sum(g_logp * (x[target] - lse) + g_lse * lse), in the logits' dtype.

  = g_logp * onehot + (g_lse - g_logp) * softmax: one fused elementwise pass.
  """
  p = jnp.exp(logits.astype(jnp.float32) - lse[:, None])
  onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == targets[:, None]
  grad = jnp.where(onehot, g_logp[:, None], 0.0) + (g_lse - g_logp)[:, None] * p
  return grad.astype(logits.dtype)


def with_vjp(forward_stats, backward):
  """A `(logits [N,V], targets [N], mask [N]) -> (logp, lse)` with a recomputing backward.

  `forward_stats(logits, targets) -> (picked, lse)`; `backward(logits, targets, lse, g_logp,
  g_lse) -> dlogits`. Only `lse` ([N]) is saved beside the inputs.
  """

  @jax.custom_vjp
  def fn(logits, targets, mask):
    picked, lse = forward_stats(logits, targets)
    return (picked - lse) * mask, lse

  def fwd(logits, targets, mask):
    out = fn(logits, targets, mask)
    return out, (logits, targets, mask, out[1])

  def bwd(res, cts):
    logits, targets, mask, lse = res
    g_logp, g_lse = cts
    dlogits = backward(logits, targets, lse, (g_logp * mask).astype(jnp.float32),
                       g_lse.astype(jnp.float32))
    return dlogits, None, jnp.zeros_like(mask)

  fn.defvjp(fwd, bwd)
  return fn


@functools.lru_cache(maxsize=None)
def streamed(block_v: int):
  """The XLA twin for one block width (cached so jit sees one function per width)."""
  return with_vjp(functools.partial(_forward_stats, block_v=block_v), logits_grad)
