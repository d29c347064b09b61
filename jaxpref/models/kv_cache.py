"""A key/value cache for the Decoder: each layer's keys and values by position, so a decode
step runs the model on one new token per sequence instead of the whole prefix.

Sequence b keeps the key of its position p in slot p, so slot index and RoPE position
agree, ragged (right-padded) rows need no offsets, and a sliding window is a distance
between slot indices. The math is the Decoder's own (`Attention.qkv`/`attend`,
`Block.apply`); only where keys come from differs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpref.models.decoder import Decoder, ModelConfig
from jaxpref.parallel.sharding import constrain_batch


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """k, v: one [B, S, Hkv, Dh] array per layer; lengths int32[B]: slots 0..lengths-1 hold
  the sequence's keys (slots past it are stale or zero and never attended)."""
  k: tuple
  v: tuple
  lengths: jax.Array

  @property
  def max_len(self) -> int:
    return self.k[0].shape[1]


def init(cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
  """An empty cache of `max_len` slots per sequence, in the compute dtype, batch-sharded
  under an ambient training mesh (`sharding.in_mesh`)."""
  shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
  zeros = lambda: tuple(constrain_batch(jnp.zeros(shape, cfg.dtype)) for _ in range(cfg.n_layers))
  return KVCache(k=zeros(), v=zeros(), lengths=constrain_batch(jnp.zeros((batch,), jnp.int32)))


def embed(model: Decoder, tokens: jax.Array) -> jax.Array:
  """Token embeddings in the compute dtype, as `Decoder.hidden` makes them."""
  cfg = model.config
  x = model.embed[...][tokens].astype(cfg.dtype)
  if cfg.embed_scale:  # sqrt(D) rounded to the compute dtype first, as HF Gemma does
    x = x * jnp.asarray(cfg.d_model ** 0.5, cfg.dtype)
  return x


def _write(buf: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
  """buf [B, S, ...] with new [B, T, ...] at slots start[b]..start[b]+T-1 of each row."""
  def row(b, n, s):
    return jax.lax.dynamic_update_slice(b, n.astype(b.dtype), (s,) + (0,) * (b.ndim - 1))
  return jax.vmap(row)(buf, new, start)


def cache_mask(cfg: ModelConfig, positions: jax.Array, max_len: int, local: bool) -> jax.Array:
  """bool[B, 1, T, S]: query at position p sees slots j <= p (and p - j < window on a
  local layer), the full forward's causal and sliding-window masks by slot index."""
  slots = jnp.arange(max_len, dtype=positions.dtype)
  back = positions[:, :, None] - slots[None, None, :]  # [B, T, S]
  mask = back >= 0
  if local:
    mask = mask & (back < cfg.sliding_window)
  return mask[:, None]


def blocks(model: Decoder) -> list:
  """The decoder's blocks one by one; a scanned stack (`scan_layers`) is sliced per layer,
  each slice told whether it is a local layer, so decoding unrolls the depth either way."""
  cfg = model.config
  if not cfg.scan_layers:
    return list(model.layers)
  graphdef, stacked = nnx.split(model.layers)
  out = []
  for i in range(cfg.n_layers):
    block = nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], stacked))
    block.local = block.attn.local = cfg.is_local(i)
    out.append(block)
  return out


def forward(model: Decoder, cache: KVCache, tokens: jax.Array, n_new: jax.Array,
            seq_len=None) -> tuple[jax.Array, KVCache]:
  """Runs tokens int32[B, T] at positions cache.lengths[b] + t, storing their keys and
  values; -> (final-norm hidden float32[B, T, D], cache with lengths += n_new).

  n_new int32[B]: how many of the T tokens are real for each row (a ragged prompt's length,
  or 0 for a finished sequence). The rest are still written, past the new length, where
  no later query reads them before they are overwritten.

  seq_len: dynamic NTK RoPE's sequence length for this call's new keys and queries (keys
  already cached keep the rotation they were given, as in transformers' generate); default
  the longest row after the call, max(cache.lengths + n_new).
  """
  cfg = model.config
  t = tokens.shape[1]
  positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  if seq_len is None and cfg.rope_scaling_type == "dynamic":
    seq_len = jnp.max(cache.lengths + n_new)
  x = embed(model, tokens)
  layers = blocks(model)
  masks = {local: cache_mask(cfg, positions, cache.max_len, local)
           for local in {layer.local for layer in layers}}
  ks, vs = [], []
  for i, layer in enumerate(layers):
    def attention(h, i=i, layer=layer):
      q, k, v = layer.attn.qkv(h, positions, seq_len=seq_len)
      ks.append(constrain_batch(_write(cache.k[i], k, cache.lengths)))
      vs.append(constrain_batch(_write(cache.v[i], v, cache.lengths)))
      return layer.attn.attend(q, ks[-1], vs[-1], masks[layer.local])
    x = layer.apply(x, attention)
  hidden = model.final_norm(x).astype(jnp.float32)
  return hidden, KVCache(k=tuple(ks), v=tuple(vs), lengths=cache.lengths + n_new)
