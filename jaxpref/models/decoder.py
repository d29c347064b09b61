"""Llama-style decoder in Flax NNX: RMSNorm, RoPE, SwiGLU, grouped-query attention."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpref.parallel.sharding import constrain_batch

_MASK = -1e30  # finite: a fully masked (padding) query row stays NaN-free


# --model.remat: what each block keeps for the backward pass. "none" keeps everything;
# "full" keeps only the block's input (least memory, one extra forward); "dots" keeps the
# matmul outputs and recomputes the cheap elementwise work between them.
REMAT_POLICIES = {
    "none": False,
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape of a Llama-style decoder; field names are the `--model.FIELD` flag names."""
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int  # grouped-query attention: n_heads // n_kv_heads query heads per K/V head
  head_dim: int
  d_ff: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  max_len: int = 2048  # context the preset is meant for; informational, as RoPE needs no table
  dtype: str = "float32"  # compute dtype; parameters stay float32
  remat: str = "none"  # per-block rematerialisation policy: see REMAT_POLICIES
  init_std: float = 0.02
  # Llama 3.1 RoPE frequency scaling (HF rope_type "llama3"); factor 1.0 means none.
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                 "d_ff", "max_len"):
      if getattr(self, name) < 1:
        raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"ModelConfig.n_heads ({self.n_heads}) must be a multiple of "
                       f"n_kv_heads ({self.n_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
    if self.rope_scaling_factor != 1.0 and not (
        0 < self.rope_low_freq_factor < self.rope_high_freq_factor
        and self.rope_scaling_factor > 0 and self.rope_original_max_len >= 1):
      raise ValueError("ModelConfig RoPE scaling needs rope_scaling_factor > 0, "
                       "0 < rope_low_freq_factor < rope_high_freq_factor and "
                       "rope_original_max_len >= 1")
    for name in ("rope_theta", "norm_eps", "init_std"):
      if not getattr(self, name) > 0:
        raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat must be one of {', '.join(REMAT_POLICIES)}, "
                       f"got {self.remat!r}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"ModelConfig.dtype must be float32, bfloat16 or float16, "
                       f"got {self.dtype!r}")


def _param(rngs: nnx.Rngs, shape, std: float) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


def _llama3_scaled(inv_freq, factor, low, high, original_len):
  """Llama 3.1 long-context rule: wavelengths beyond original_len/low are stretched by
  `factor`, those under original_len/high kept, and the band between interpolated."""
  wavelen = 2 * jnp.pi / inv_freq
  smooth = jnp.clip((original_len / wavelen - low) / (high - low), 0.0, 1.0)
  return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope(x: jax.Array, positions: jax.Array, theta: float, scaling=None) -> jax.Array:
  """Rotary embedding, rotate-half convention (as Hugging Face Llama). x: [N, T, H, Dh].

  scaling: None or (factor, low_freq_factor, high_freq_factor, original_max_len), the
  Llama 3.1 frequency scaling (`ModelConfig.rope_scaling_factor` and the fields after it).
  """
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [Dh/2]
  if scaling is not None and scaling[0] != 1.0:
    inv_freq = _llama3_scaled(inv_freq, *scaling)
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [N, T, Dh/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attention_mask(n: int, t: int, segment_ids=None, shared_prompt: bool = False) -> jax.Array:
  """bool[N, 1, T, T] (query, key): causal, and within one non-padding segment when given.

  A padding query (segment 0) sees no key; its row is all _MASK, so its softmax is uniform
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


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    s = cfg.init_std
    self.cfg = cfg
    self.q = _param(rngs, (cfg.d_model, cfg.n_heads, cfg.head_dim), s)
    self.k = _param(rngs, (cfg.d_model, cfg.n_kv_heads, cfg.head_dim), s)
    self.v = _param(rngs, (cfg.d_model, cfg.n_kv_heads, cfg.head_dim), s)
    self.o = _param(rngs, (cfg.n_heads, cfg.head_dim, cfg.d_model), s)

  def __call__(self, x, positions, mask):
    """x: [N, T, D]; mask: bool[N, 1, T, T] (query, key) -> [N, T, D]."""
    cfg, dt = self.cfg, x.dtype
    scaling = (cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
               cfg.rope_original_max_len)
    q = rope(jnp.einsum("ntd,dhk->nthk", x, self.q[...].astype(dt)), positions, cfg.rope_theta,
             scaling)
    k = rope(jnp.einsum("ntd,dhk->nthk", x, self.k[...].astype(dt)), positions, cfg.rope_theta,
             scaling)
    v = jnp.einsum("ntd,dhk->nthk", x, self.v[...].astype(dt))
    n, t, _, dh = q.shape
    groups = cfg.n_heads // cfg.n_kv_heads
    # GQA: query head h reads key/value head h // groups.
    q = q.reshape(n, t, cfg.n_kv_heads, groups, dh)
    scores = jnp.einsum("nqhgk,nshk->nhgqs", q, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(dh))
    scores = jnp.where(mask[:, :, None], scores, _MASK)  # mask: [N, 1, 1, T, T]
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    out = jnp.einsum("nhgqs,nshk->nqhgk", probs, v).reshape(n, t, cfg.n_heads, dh)
    return jnp.einsum("nthk,hkd->ntd", out, self.o[...].astype(dt))


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate x) * up x)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    s = cfg.init_std
    self.gate = _param(rngs, (cfg.d_model, cfg.d_ff), s)
    self.up = _param(rngs, (cfg.d_model, cfg.d_ff), s)
    self.down = _param(rngs, (cfg.d_ff, cfg.d_model), s)

  def __call__(self, x):
    dt = x.dtype
    h = jax.nn.silu(x @ self.gate[...].astype(dt)) * (x @ self.up[...].astype(dt))
    return h @ self.down[...].astype(dt)


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, mask):
    # Pin the residual stream to the batch axes: otherwise, under FSDP, XLA may follow the
    # sharded weights and gather the batch instead (3.5x the temporaries on `small`).
    x = constrain_batch(x)
    x = x + self.attn(self.attn_norm(x), positions, mask)
    return x + self.mlp(self.mlp_norm(x))


class Decoder(nnx.Module):
  """tokens int32[N, T] -> logits float32[N, T, V]."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = _param(rngs, (config.vocab_size, config.d_model), config.init_std)
    self.layers = nnx.List([Block(config, rngs) for _ in range(config.n_layers)])
    self.final_norm = RMSNorm(config.d_model, config.norm_eps)
    if not config.tie_embeddings:
      self.lm_head = _param(rngs, (config.d_model, config.vocab_size), config.init_std)

  def lm_head_weight(self) -> jax.Array:
    """[D, V]: the output projection (the embedding transposed when tied)."""
    return self.embed[...].T if self.config.tie_embeddings else self.lm_head[...]

  def hidden(self, tokens, segment_ids=None, positions=None, shared_prompt=False) -> jax.Array:
    """Final-norm hidden states float32[N, T, D].

    tokens int32[N, T]; segment_ids int32[N, T] (0 = padding; packed sequences get 1, 2, ...);
    positions int32[N, T] for RoPE, default arange(T) (give them restarting per segment when
    packing); shared_prompt as in `attention_mask`.
    """
    n, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, t))
    mask = attention_mask(n, t, segment_ids, shared_prompt)
    x = self.embed[...][tokens].astype(self.config.dtype)
    policy = REMAT_POLICIES[self.config.remat]
    for layer in self.layers:
      if policy is False:
        x = layer(x, positions, mask)
      else:  # the backward recomputes the block's insides from its input
        gd, state = nnx.split(layer)
        block = lambda st, x, gd=gd: nnx.merge(gd, st)(x, positions, mask)
        x = jax.checkpoint(block, policy=policy)(state, x)
    return self.final_norm(x).astype(jnp.float32)

  def __call__(self, tokens, segment_ids=None, positions=None) -> jax.Array:
    """Logits float32[N, T, V]; arguments as `hidden`."""
    h = self.hidden(tokens, segment_ids, positions)
    return h @ self.lm_head_weight().astype(jnp.float32)


def param_count(config: ModelConfig) -> int:
  """Closed-form parameter count (for presets too large to instantiate)."""
  c = config
  attn = c.d_model * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
  per_layer = attn + 3 * c.d_model * c.d_ff + 2 * c.d_model
  head = 0 if c.tie_embeddings else c.d_model * c.vocab_size
  return c.vocab_size * c.d_model + c.n_layers * per_layer + c.d_model + head


def count_params(model: nnx.Module) -> int:
  """Parameters actually held by `model` (checks `param_count`)."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
