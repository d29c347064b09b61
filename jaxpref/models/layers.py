"""The decoder's building blocks that hold no attention: parameters, RMSNorm, the gated MLP,
soft-capping, and RoPE (frequencies and rotation). `jaxpref.models.attention` and
`jaxpref.models.decoder` assemble them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# --model.mlp_activation: the gate's nonlinearity. HF's "gelu_pytorch_tanh" is gelu_tanh.
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def param(rngs: nnx.Rngs, shape, std: float) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))


def softcap(x, cap: float):
  """Gemma 2's tanh soft-cap: smooth, odd, and bounded by `cap`."""
  return cap * jnp.tanh(x / cap) if cap else x


class RMSNorm(nnx.Module):
  """y * (offset + scale): offset 1 stores the scale as Gemma checkpoints do, as scale - 1,
  so a load is a copy (1 + (w - 1) does not round-trip in float32)."""

  def __init__(self, dim: int, eps: float, offset: float = 0.0):
    self.scale = nnx.Param(jnp.full((dim,), 1.0 - offset, jnp.float32))
    self.eps = eps
    self.offset = offset

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...] + self.offset if self.offset else self.scale[...]
    return (y * scale).astype(x.dtype)


class MLP(nnx.Module):
  """Gated: down(act(gate x) * up x); SwiGLU with silu, GeGLU with gelu_tanh."""

  def __init__(self, cfg, rngs: nnx.Rngs):
    s = cfg.init_std
    self.activation = cfg.mlp_activation
    self.gate = param(rngs, (cfg.d_model, cfg.d_ff), s)
    self.up = param(rngs, (cfg.d_model, cfg.d_ff), s)
    self.down = param(rngs, (cfg.d_ff, cfg.d_model), s)

  def __call__(self, x):
    dt = x.dtype
    h = ACTIVATIONS[self.activation](x @ self.gate[...].astype(dt)) * (x @ self.up[...].astype(dt))
    return h @ self.down[...].astype(dt)


def _llama3_scaled(inv_freq, factor, low, high, original_len):
  """Llama 3.1 long-context rule: wavelengths beyond original_len/low are stretched by
  `factor`, those under original_len/high kept, and the band between interpolated."""
  wavelen = 2 * jnp.pi / inv_freq
  smooth = jnp.clip((original_len / wavelen - low) / (high - low), 0.0, 1.0)
  return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def _dynamic_ntk(inv_freq, head_dim, theta, factor, original_len, seq_len):
  """HF rope_type "dynamic" (dynamic NTK): past original_len, every frequency comes from the
  base theta * (factor * seq_len / original_len - (factor - 1)) ** (Dh / (Dh - 2)); at or
  under it, the plain ones. seq_len may be traced (the batch's max position + 1)."""
  seq = jnp.asarray(seq_len, jnp.float32)
  base = theta * (factor * seq / original_len - (factor - 1)) ** (head_dim / (head_dim - 2))
  half = head_dim // 2
  scaled = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  return jnp.where(seq > original_len, scaled, inv_freq)


def rope_frequencies(head_dim: int, theta: float, scaling=None, seq_len=None) -> jax.Array:
  """float32[Dh/2] inverse frequencies. scaling: None or (factor, low_freq_factor,
  high_freq_factor, original_max_len[, type]), the Llama 3.1 frequency scaling
  (`ModelConfig.rope_scaling_factor` and the fields after it), with type "linear" every
  frequency divided by the factor, or with type "dynamic" dynamic NTK (`_dynamic_ntk`) at
  `seq_len` (None: the plain frequencies, as transformers' before any long input)."""
  half = head_dim // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  if scaling is not None and scaling[0] != 1.0:
    kind = scaling[4] if len(scaling) > 4 else "llama3"
    if kind == "linear":
      inv_freq = inv_freq / scaling[0]
    elif kind == "dynamic":
      if seq_len is not None:
        inv_freq = _dynamic_ntk(inv_freq, head_dim, theta, scaling[0], scaling[3], seq_len)
    else:
      inv_freq = _llama3_scaled(inv_freq, *scaling[:4])
  return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding, rotate-half convention (as Hugging Face Llama). x: [N, T, H, Dh]."""
  half = x.shape[-1] // 2
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [N, T, Dh/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float, scaling=None) -> jax.Array:
  """`apply_rope` at the frequencies of `rope_frequencies(Dh, theta, scaling)` (dynamic NTK's
  sequence length: the max position + 1)."""
  return apply_rope(x, positions,
                    rope_frequencies(x.shape[-1], theta, scaling, jnp.max(positions) + 1))
