"""One decoder for the Llama, Mistral, Qwen2, Qwen3, Gemma and Gemma 2 families in Flax NNX:
RMSNorm, RoPE, gated MLP, grouped-query attention, and per-family switches in `ModelConfig`
(all off for Llama) rather than a copy of the model per family."""

from __future__ import annotations

import dataclasses

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


# --model.mlp_activation: the gate's nonlinearity. HF's "gelu_pytorch_tanh" is gelu_tanh.
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape of the decoder; field names are the `--model.FIELD` flag names."""
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
  # One block traced once, lax.scan-ed over params stacked on a leading layer axis: compile
  # time stops growing with depth. Off by default: see scan_layers_conflicts.
  scan_layers: bool = False
  init_std: float = 0.02
  # RoPE frequency scaling (HF rope_type "llama3", Llama 3.1's, or "linear", every frequency
  # divided by the factor); factor 1.0 means none.
  rope_scaling_type: str = "llama3"
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  # Family switches; the defaults are Llama. Which family sets which: docs/models.md.
  qkv_bias: bool = False  # Qwen2: biases on the q/k/v projections
  attn_bias: bool = False  # Llama's attention_bias: biases on q/k/v and o
  qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and of k, before RoPE
  embed_scale: bool = False  # Gemma: embeddings times sqrt(d_model), in the compute dtype
  mlp_activation: str = "silu"  # silu (SwiGLU) | gelu_tanh (Gemma's GeGLU)
  norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + scale); Gemma stores scale-1
  post_norms: bool = False  # Gemma 2: RMSNorm on the attention and MLP outputs too
  attn_logit_softcap: float = 0.0  # Gemma 2: scores -> cap * tanh(scores / cap); 0 = off
  final_logit_softcap: float = 0.0  # Gemma 2: the same on the output logits; 0 = off
  sliding_window: int = 0  # local layers see the last this-many positions; 0 = none
  # With sliding_window: layer i is global iff (i + 1) % pattern == 0 (HF's Gemma 2/3 rule;
  # 2 alternates local, global, ...); 0 makes every layer local.
  sliding_window_pattern: int = 2
  query_pre_attn_scalar: float = 0.0  # scores scaled by this ** -0.5 (Gemma 2); 0 = head_dim

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
    if self.rope_scaling_type not in ("llama3", "linear"):
      raise ValueError(f"ModelConfig.rope_scaling_type must be llama3 or linear, got "
                       f"{self.rope_scaling_type!r}")
    if self.rope_scaling_factor != 1.0 and not (self.rope_scaling_factor > 0 and (
        self.rope_scaling_type == "linear" or self.rope_original_max_len >= 1
        and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor)):
      raise ValueError("ModelConfig RoPE scaling needs rope_scaling_factor > 0, and for "
                       "llama3 0 < rope_low_freq_factor < rope_high_freq_factor and "
                       "rope_original_max_len >= 1")
    for name in ("rope_theta", "norm_eps", "init_std"):
      if not getattr(self, name) > 0:
        raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat must be one of {', '.join(REMAT_POLICIES)}, "
                       f"got {self.remat!r}")
    if self.mlp_activation not in ACTIVATIONS:
      raise ValueError(f"ModelConfig.mlp_activation must be one of {', '.join(ACTIVATIONS)}, "
                       f"got {self.mlp_activation!r}")
    for name in ("attn_logit_softcap", "final_logit_softcap", "sliding_window",
                 "sliding_window_pattern", "query_pre_attn_scalar"):
      if getattr(self, name) < 0:
        raise ValueError(f"ModelConfig.{name} must be >= 0, got {getattr(self, name)}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"ModelConfig.dtype must be float32, bfloat16 or float16, "
                       f"got {self.dtype!r}")

  def is_local(self, layer: int) -> bool:
    """Whether block `layer` attends within `sliding_window` (a local layer)."""
    return is_local_layer(layer, self.sliding_window, self.sliding_window_pattern)


def is_local_layer(layer: int, sliding_window: int, pattern: int) -> bool:
  """HF's Gemma 2/3 rule: with a window, every `pattern`-th layer is global (0: none is)."""
  return sliding_window > 0 and (pattern == 0 or (layer + 1) % pattern != 0)


def _softcap(x, cap: float):
  """Gemma 2's tanh soft-cap: smooth, odd, and bounded by `cap`."""
  return cap * jnp.tanh(x / cap) if cap else x


def _param(rngs: nnx.Rngs, shape, std: float) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))


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


def _llama3_scaled(inv_freq, factor, low, high, original_len):
  """Llama 3.1 long-context rule: wavelengths beyond original_len/low are stretched by
  `factor`, those under original_len/high kept, and the band between interpolated."""
  wavelen = 2 * jnp.pi / inv_freq
  smooth = jnp.clip((original_len / wavelen - low) / (high - low), 0.0, 1.0)
  return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope(x: jax.Array, positions: jax.Array, theta: float, scaling=None) -> jax.Array:
  """Rotary embedding, rotate-half convention (as Hugging Face Llama). x: [N, T, H, Dh].

  scaling: None or (factor, low_freq_factor, high_freq_factor, original_max_len[, type]),
  the Llama 3.1 frequency scaling (`ModelConfig.rope_scaling_factor` and the fields after
  it), or with type "linear" every frequency divided by the factor.
  """
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [Dh/2]
  if scaling is not None and scaling[0] != 1.0:
    linear = scaling[4:] == ("linear",)
    inv_freq = inv_freq / scaling[0] if linear else _llama3_scaled(inv_freq, *scaling[:4])
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


def sliding_window_mask(mask: jax.Array, positions: jax.Array, window: int) -> jax.Array:
  """`mask` narrowed to keys fewer than `window` positions back (HF: kv > q - window).

  By position rather than by index, so packed and shared-prompt rows measure the distance
  within their own sequence (for an unpacked row the two are the same).
  """
  back = positions[:, :, None] - positions[:, None, :]  # [N, T (query), T (key)]
  return mask & (back < window)[:, None]


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    s = cfg.init_std
    self.cfg = cfg
    self.q = _param(rngs, (cfg.d_model, cfg.n_heads, cfg.head_dim), s)
    self.k = _param(rngs, (cfg.d_model, cfg.n_kv_heads, cfg.head_dim), s)
    self.v = _param(rngs, (cfg.d_model, cfg.n_kv_heads, cfg.head_dim), s)
    self.o = _param(rngs, (cfg.n_heads, cfg.head_dim, cfg.d_model), s)
    if cfg.qkv_bias or cfg.attn_bias:
      self.q_bias = nnx.Param(jnp.zeros((cfg.n_heads, cfg.head_dim), jnp.float32))
      self.k_bias = nnx.Param(jnp.zeros((cfg.n_kv_heads, cfg.head_dim), jnp.float32))
      self.v_bias = nnx.Param(jnp.zeros((cfg.n_kv_heads, cfg.head_dim), jnp.float32))
    if cfg.attn_bias:
      self.o_bias = nnx.Param(jnp.zeros((cfg.d_model,), jnp.float32))
    if cfg.qk_norm:
      self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
      self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

  def _project(self, x, name):
    y = jnp.einsum("ntd,dhk->nthk", x, getattr(self, name)[...].astype(x.dtype))
    if self.cfg.qkv_bias or self.cfg.attn_bias:
      y = y + getattr(self, name + "_bias")[...].astype(x.dtype)
    return y

  def __call__(self, x, positions, mask):
    """x: [N, T, D]; mask: bool[N, 1, T, T] (query, key) -> [N, T, D]."""
    return self.attend(*self.qkv(x, positions), mask)

  def qkv(self, x, positions):
    """q [N, T, H, Dh], k and v [N, T, Hkv, Dh], RoPE applied to q and k. Split from
    `attend` so a KV cache (`jaxpref.models.kv_cache`) can keep k and v between calls."""
    cfg = self.cfg
    scaling = (cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
               cfg.rope_original_max_len, cfg.rope_scaling_type)
    q, k = self._project(x, "q"), self._project(x, "k")
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = (rope(y, positions, cfg.rope_theta, scaling) for y in (q, k))
    return q, k, self._project(x, "v")

  def attend(self, q, k, v, mask):
    """q [N, T, H, Dh] over k, v [N, S, Hkv, Dh]; mask bool[N, 1, T, S] -> [N, T, D]."""
    cfg, dt = self.cfg, q.dtype
    n, t, _, dh = q.shape
    groups = cfg.n_heads // cfg.n_kv_heads
    # GQA: query head h reads key/value head h // groups.
    q = q.reshape(n, t, cfg.n_kv_heads, groups, dh)
    scores = jnp.einsum("nqhgk,nshk->nhgqs", q, k, preferred_element_type=jnp.float32)
    scores = scores * (cfg.query_pre_attn_scalar or dh) ** -0.5
    scores = _softcap(scores, cfg.attn_logit_softcap)  # before the mask, as Gemma 2
    scores = jnp.where(mask[:, :, None], scores, _MASK)  # mask: [N, 1, 1, T, T]
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    out = jnp.einsum("nhgqs,nshk->nqhgk", probs, v).reshape(n, t, cfg.n_heads, dh)
    out = jnp.einsum("nthk,hkd->ntd", out, self.o[...].astype(dt))
    return out + self.o_bias[...].astype(dt) if cfg.attn_bias else out


class MLP(nnx.Module):
  """Gated: down(act(gate x) * up x); SwiGLU with silu, GeGLU with gelu_tanh."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    s = cfg.init_std
    self.activation = cfg.mlp_activation
    self.gate = _param(rngs, (cfg.d_model, cfg.d_ff), s)
    self.up = _param(rngs, (cfg.d_model, cfg.d_ff), s)
    self.down = _param(rngs, (cfg.d_ff, cfg.d_model), s)

  def __call__(self, x):
    dt = x.dtype
    h = ACTIVATIONS[self.activation](x @ self.gate[...].astype(dt)) * (x @ self.up[...].astype(dt))
    return h @ self.down[...].astype(dt)


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, local: bool = False):
    norm = lambda: RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_offset)
    self.local = local  # attends within cfg.sliding_window (reads the local mask)
    self.attn_norm = norm()
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = norm()
    self.mlp = MLP(cfg, rngs)
    if cfg.post_norms:  # Gemma 2 normalises each branch's output before the residual add
      self.post_attn_norm = norm()
      self.post_mlp_norm = norm()

  def __call__(self, x, positions, mask):
    return self.apply(x, lambda h: self.attn(h, positions, mask))

  def apply(self, x, attention):
    """The block with `attention(normed x) -> [N, T, D]` in place of self-attention over x
    alone: the sampler's cached attention goes through the same residual path."""
    # Pin the residual stream to the batch axes: otherwise, under FSDP, XLA may follow the
    # sharded weights and gather the batch instead (3.5x the temporaries on `small`).
    x = constrain_batch(x)
    post = hasattr(self, "post_attn_norm")
    h = attention(self.attn_norm(x))
    x = x + (self.post_attn_norm(h) if post else h)
    h = self.mlp(self.mlp_norm(x))
    return x + (self.post_mlp_norm(h) if post else h)


class Decoder(nnx.Module):
  """tokens int32[N, T] -> logits float32[N, T, V]."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = _param(rngs, (config.vocab_size, config.d_model), config.init_std)
    blocks = [Block(config, rngs, config.is_local(i)) for i in range(config.n_layers)]
    # Built one by one either way, so a seed gives the same weights scanned or unrolled.
    self.layers = stack_blocks(blocks) if config.scan_layers else nnx.List(blocks)
    self.final_norm = RMSNorm(config.d_model, config.norm_eps, config.norm_offset)
    if not config.tie_embeddings:
      self.lm_head = _param(rngs, (config.d_model, config.vocab_size), config.init_std)

  def lm_head_weight(self) -> jax.Array:
    """[D, V]: the output projection (the embedding transposed when tied)."""
    return self.embed[...].T if self.config.tie_embeddings else self.lm_head[...]

  def hidden(self, tokens, segment_ids=None, positions=None, shared_prompt=False,
             all_layers=False):
    """Final-norm hidden states float32[N, T, D].

    tokens int32[N, T]; segment_ids int32[N, T] (0 = padding; packed sequences get 1, 2, ...);
    positions int32[N, T] for RoPE, default arange(T) (give them restarting per segment when
    packing); shared_prompt as in `attention_mask`. `all_layers`: also every block's output
    residual stream (before the final norm), returning (hidden, float32[L, N, T, D]).
    """
    n, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, t))
    cfg = self.config
    full = attention_mask(n, t, segment_ids, shared_prompt)
    local = (sliding_window_mask(full, positions, cfg.sliding_window) if cfg.sliding_window
             else full)
    x = self.embed[...][tokens].astype(cfg.dtype)
    if cfg.embed_scale:  # sqrt(D) rounded to the compute dtype first, as HF Gemma does
      x = x * jnp.asarray(cfg.d_model ** 0.5, cfg.dtype)
    policy = REMAT_POLICIES[cfg.remat]
    if cfg.scan_layers:  # one traced body for every layer, so which ones are local is data
      gd, stacked = nnx.split(self.layers)
      def body(x, xs):
        mask = jnp.where(xs[1], local, full) if cfg.sliding_window else full
        y = nnx.merge(gd, xs[0])(x, positions, mask)
        return y, (y.astype(jnp.float32) if all_layers else None)
      is_local = jnp.asarray([cfg.is_local(i) for i in range(cfg.n_layers)])
      step = body if policy is False else jax.checkpoint(body, policy=policy)  # keeps the carry
      x, states = jax.lax.scan(step, x, (stacked, is_local))
    else:
      states = []
      for layer in self.layers:
        mask = local if layer.local else full
        if policy is False:
          x = layer(x, positions, mask)
        else:  # the backward recomputes the block's insides from its input
          gd, state = nnx.split(layer)
          block = lambda st, x, gd=gd, mask=mask: nnx.merge(gd, st)(x, positions, mask)
          x = jax.checkpoint(block, policy=policy)(state, x)
        if all_layers:
          states.append(x.astype(jnp.float32))
      states = jnp.stack(states) if all_layers else None
    h = self.final_norm(x).astype(jnp.float32)
    return (h, states) if all_layers else h

  def logits(self, h: jax.Array) -> jax.Array:
    """float32[..., V] from `hidden` states [..., D]: the LM head, then the final soft-cap."""
    return _softcap(h @ self.lm_head_weight().astype(h.dtype), self.config.final_logit_softcap)

  def __call__(self, tokens, segment_ids=None, positions=None) -> jax.Array:
    """Logits float32[N, T, V]; arguments as `hidden`."""
    return self.logits(self.hidden(tokens, segment_ids, positions))


def stack_blocks(blocks) -> Block:
  """One Block whose every param has a leading layer axis (the scanned layout)."""
  for b in blocks:
    b.local = False  # data in the scanned model (Decoder._scan): one graph serves every layer
  return nnx.merge(nnx.graphdef(blocks[0]),
                   jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in blocks]))


def scan_layers_conflicts(config: ModelConfig, *, lora_rank=0, init_from="", export_hf=""):
  """Start-up errors for `scan_layers` with options that read per-layer param paths (the
  KV-cache sampler does too, and `jaxpref.parallel.sharding` shards [L, ...] params only
  once it knows the layer axis)."""
  why = {"--lora_rank": (lora_rank, "adapters are keyed by per-layer paths (layers/0/attn/q)"),
         "--init_from": (init_from, "checkpoints and HF weights are stored per layer"),
         "--export_hf": (export_hf, "HF tensors are written per layer")}
  return [f"--model.scan_layers does not work with {k}: {msg}; drop one of the two"
          for k, (on, msg) in why.items() if on and config.scan_layers]
