"""The decoder's attention: masks (causal, packed segments, shared prompts, sliding
windows) and grouped-query self-attention with the family switches that act inside it
(biases, q/k norms, per-layer RoPE, soft-capped scores)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpref.models import attention_kernels
from jaxpref.models.layers import RMSNorm, apply_rope, param, rope_frequencies, softcap

MASK = -1e30  # finite: a fully masked (padding) query row stays NaN-free


def attention_mask(n: int, t: int, segment_ids=None, shared_prompt: bool = False) -> jax.Array:
  """bool[N, 1, T, T] (query, key): causal, and within one non-padding segment when given.

  A padding query (segment 0) sees no key; its row is all MASK, so its softmax is uniform
  and finite rather than NaN, and the residual stream carries it harmlessly.
  `shared_prompt`: segment 1 is a prompt that every non-padding segment of the row also
  sees (the K responses of a group packed after one copy of their prompt).
  """
  causal = jnp.tril(jnp.ones((t, t), bool))
  if segment_ids is None:
    return jnp.broadcast_to(causal, (n, 1, t, t))
  q_seg, k_seg = segment_ids[:, :, None], segment_ids[:, None, :]
  visible = q_seg == k_seg
  if shared_prompt:
    visible = visible | ((k_seg == 1) & (q_seg > 0))
  return (causal & visible & (k_seg > 0))[:, None]


def sliding_window_mask(mask: jax.Array, positions: jax.Array, window: int) -> jax.Array:
  """`mask` narrowed to keys fewer than `window` positions back (HF: kv > q - window).

  By position rather than by index, so packed and shared-prompt rows measure the distance
  within their own sequence (for an unpacked row the two are the same).
  """
  back = positions[:, :, None] - positions[:, None, :]  # [N, T (query), T (key)]
  return mask & (back < window)[:, None]


def masks(cfg, n: int, t: int, segment_ids=None, positions=None, shared_prompt: bool = False):
  """(full, local): what global and sliding-window layers attend with (local is full without
  a sliding window). Dense bool[N, 1, T, T] masks for the einsum, or
  `attention_kernels.KernelMask`s when `cfg.attention` picks a kernel. positions int32[N, T]
  are given for packed and shared-prompt rows only (restarting per segment); rows without
  them are right-padded: segment ids 1 on tokens, then 0."""
  kernel = attention_kernels.resolve(cfg, shared_prompt)
  # cuDNN takes one segment per row (sequence lengths); packed rows get the exact mask.
  dense = kernel == "cudnn" and segment_ids is not None and (
      shared_prompt or positions is not None)
  kmask = lambda mask, local: attention_kernels.KernelMask(segment_ids, mask, local, kernel)
  if kernel != "xla" and not dense:
    return kmask(None, False), kmask(None, bool(cfg.sliding_window))
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, t))
  full = attention_mask(n, t, segment_ids, shared_prompt)
  local = sliding_window_mask(full, positions, cfg.sliding_window) if cfg.sliding_window else full
  if kernel == "xla":
    return full, local
  return kmask(full, False), kmask(local, bool(cfg.sliding_window))


class Attention(nnx.Module):
  """`local`: a sliding-window layer, which takes `rope_local_theta` where that is set
  (Gemma 3). The mask itself comes from the caller."""

  def __init__(self, cfg, rngs: nnx.Rngs, local: bool = False):
    s = cfg.init_std
    self.cfg = cfg
    self.local = local
    self.q = param(rngs, (cfg.d_model, cfg.n_heads, cfg.head_dim), s)
    self.k = param(rngs, (cfg.d_model, cfg.n_kv_heads, cfg.head_dim), s)
    self.v = param(rngs, (cfg.d_model, cfg.n_kv_heads, cfg.head_dim), s)
    self.o = param(rngs, (cfg.n_heads, cfg.head_dim, cfg.d_model), s)
    if cfg.qkv_bias or cfg.attn_bias:
      self.q_bias = nnx.Param(jnp.zeros((cfg.n_heads, cfg.head_dim), jnp.float32))
      self.k_bias = nnx.Param(jnp.zeros((cfg.n_kv_heads, cfg.head_dim), jnp.float32))
      self.v_bias = nnx.Param(jnp.zeros((cfg.n_kv_heads, cfg.head_dim), jnp.float32))
    if cfg.attn_bias:
      self.o_bias = nnx.Param(jnp.zeros((cfg.d_model,), jnp.float32))
    if cfg.qk_norm:  # Gemma 3's are (1 + w) norms like its others, Qwen3's plain
      self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_offset)
      self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_offset)

  def _project(self, x, name):
    y = jnp.einsum("ntd,dhk->nthk", x, getattr(self, name)[...].astype(x.dtype))
    if self.cfg.qkv_bias or self.cfg.attn_bias:
      y = y + getattr(self, name + "_bias")[...].astype(x.dtype)
    return y

  def __call__(self, x, positions, mask, local=None):
    """x: [N, T, D]; mask: bool[N, 1, T, T] (query, key) -> [N, T, D]."""
    return self.attend(*self.qkv(x, positions, local), mask)

  def frequencies(self, local=None, seq_len=None) -> jax.Array:
    """RoPE inverse frequencies [Dh/2] of this layer. `local` (default: self.local) may be a
    traced bool, as in the scanned decoder, where one traced body serves every layer.
    seq_len: dynamic NTK's sequence length (maybe traced); unused by the other RoPE types."""
    cfg = self.cfg
    scaling = (cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
               cfg.rope_original_max_len, cfg.rope_scaling_type)
    inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, scaling, seq_len)
    if cfg.rope_local_theta:  # Gemma 3: local layers' own theta, never scaled
      local = self.local if local is None else local
      inv_freq = jnp.where(local, rope_frequencies(cfg.head_dim, cfg.rope_local_theta), inv_freq)
    return inv_freq

  def qkv(self, x, positions, local=None, seq_len=None):
    """q [N, T, H, Dh], k and v [N, T, Hkv, Dh], RoPE applied to q and k. Split from
    `attend` so a KV cache (`jaxpref.models.kv_cache`) can keep k and v between calls.
    seq_len: dynamic NTK's sequence length, default the max of `positions` + 1 over the
    whole batch (transformers' rule); the KV cache gives that call's own."""
    q, k = self._project(x, "q"), self._project(x, "k")
    if self.cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    if seq_len is None and self.cfg.rope_scaling_type == "dynamic":
      seq_len = jnp.max(positions) + 1
    inv_freq = self.frequencies(local, seq_len)
    q, k = (apply_rope(y, positions, inv_freq) for y in (q, k))
    return q, k, self._project(x, "v")

  def attend(self, q, k, v, mask):
    """q [N, T, H, Dh] over k, v [N, S, Hkv, Dh]; mask bool[N, 1, T, S] -> [N, T, D], or
    a `KernelMask` from `masks` (self-attention, S = T) for a fused kernel."""
    cfg, dt = self.cfg, q.dtype
    n, t, _, dh = q.shape
    if isinstance(mask, attention_kernels.KernelMask):
      return self._out(attention_kernels.attend(cfg, q, k, v, mask).astype(dt))
    groups = cfg.n_heads // cfg.n_kv_heads
    # GQA: query head h reads key/value head h // groups.
    q = q.reshape(n, t, cfg.n_kv_heads, groups, dh)
    scores = jnp.einsum("nqhgk,nshk->nhgqs", q, k, preferred_element_type=jnp.float32)
    scores = scores * (cfg.query_pre_attn_scalar or dh) ** -0.5
    scores = softcap(scores, cfg.attn_logit_softcap)  # before the mask, as Gemma 2
    scores = jnp.where(mask[:, :, None], scores, MASK)  # mask: [N, 1, 1, T, T]
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    return self._out(jnp.einsum("nhgqs,nshk->nqhgk", probs, v).reshape(n, t, cfg.n_heads, dh))

  def _out(self, out):
    """The output projection of per-head values [N, T, H, Dh] -> [N, T, D]."""
    dt = out.dtype
    out = jnp.einsum("nthk,hkd->ntd", out, self.o[...].astype(dt))
    return out + self.o_bias[...].astype(dt) if self.cfg.attn_bias else out
