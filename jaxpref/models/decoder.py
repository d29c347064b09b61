"""One decoder for the Llama, Mistral, Mixtral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 and
Phi-3 families in Flax NNX: blocks of grouped-query attention (`jaxpref.models.attention`)
and a gated MLP (`jaxpref.models.layers`; Mixtral's experts: `jaxpref.models.moe`) between
RMSNorms, with per-family switches in `ModelConfig` (all off for Llama) rather than a copy of
the model per family."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpref.models import attention_kernels
from jaxpref.models.attention import (MASK, Attention, attention_mask,  # noqa: F401
                                      masks, sliding_window_mask)
from jaxpref.models.layers import (ACTIVATIONS, MLP, RMSNorm, param, rope,  # noqa: F401
                                   softcap)
from jaxpref.models.moe import MoE
from jaxpref.parallel.sharding import constrain_batch

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
  # RoPE frequency scaling (HF rope_type "llama3", Llama 3.1's, "linear", every frequency
  # divided by the factor, or "dynamic", dynamic NTK: a larger base once the batch's max
  # position + 1 passes rope_original_max_len); factor 1.0 means none.
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
  # Gemma 3: local (sliding-window) layers' RoPE theta, unscaled; 0 = the global layers' RoPE.
  rope_local_theta: float = 0.0
  # Phi-3: HF stores q/k/v as one qkv_proj and gate/up as one gate_up_proj. Ours stay apart
  # and the compute is Llama's, so this only says which layout and family a save writes.
  fused_projections: bool = False
  # Mixtral: each block's MLP is n_experts gated MLPs of width d_ff, experts_per_token of
  # them weighted per token by a router (jaxpref.models.moe); 0 = the dense MLP.
  n_experts: int = 0
  experts_per_token: int = 2
  # --attention: auto | xla (the einsum) | splash (TPU) | cudnn (GPU); attention_kernels.py.
  attention: str = "xla"

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                 "d_ff", "max_len"):
      if getattr(self, name) < 1:
        raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"ModelConfig.n_heads ({self.n_heads}) must be a multiple of "
                       f"n_kv_heads ({self.n_kv_heads})")
    if self.n_experts and not 1 <= self.experts_per_token <= self.n_experts:
      raise ValueError(f"ModelConfig.experts_per_token must be in 1..n_experts "
                       f"({self.n_experts}), got {self.experts_per_token}")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
    if self.rope_scaling_type not in ("llama3", "linear", "dynamic"):
      raise ValueError(f"ModelConfig.rope_scaling_type must be llama3, linear or dynamic, "
                       f"got {self.rope_scaling_type!r}")
    kind = self.rope_scaling_type
    if self.rope_scaling_factor != 1.0 and not (self.rope_scaling_factor > 0 and (
        kind == "linear" or self.rope_original_max_len >= 1 and (
            kind == "dynamic" and self.head_dim > 2
            or kind == "llama3" and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor))):
      raise ValueError("ModelConfig RoPE scaling needs rope_scaling_factor > 0, for "
                       "llama3 0 < rope_low_freq_factor < rope_high_freq_factor and "
                       "rope_original_max_len >= 1, for dynamic head_dim > 2 and "
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
                 "sliding_window_pattern", "query_pre_attn_scalar", "rope_local_theta",
                 "n_experts"):
      if getattr(self, name) < 0:
        raise ValueError(f"ModelConfig.{name} must be >= 0, got {getattr(self, name)}")
    for error in attention_kernels.config_errors(self):
      raise ValueError(error)
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"ModelConfig.dtype must be float32, bfloat16 or float16, "
                       f"got {self.dtype!r}")

  def is_local(self, layer: int) -> bool:
    """Whether block `layer` attends within `sliding_window` (a local layer)."""
    return is_local_layer(layer, self.sliding_window, self.sliding_window_pattern)


def is_local_layer(layer: int, sliding_window: int, pattern: int) -> bool:
  """HF's Gemma 2/3 rule: with a window, every `pattern`-th layer is global (0: none is)."""
  return sliding_window > 0 and (pattern == 0 or (layer + 1) % pattern != 0)


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, local: bool = False):
    norm = lambda: RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_offset)
    self.local = local  # attends within cfg.sliding_window (reads the local mask)
    self.attn_norm = norm()
    self.attn = Attention(cfg, rngs, local)
    self.mlp_norm = norm()
    self.mlp = MoE(cfg, rngs) if cfg.n_experts else MLP(cfg, rngs)
    if cfg.post_norms:  # Gemma 2 normalises each branch's output before the residual add
      self.post_attn_norm = norm()
      self.post_mlp_norm = norm()

  def __call__(self, x, positions, mask, local=None):
    """`local`: given (maybe traced) where one scanned body serves every layer."""
    return self.apply(x, lambda h: self.attn(h, positions, mask, local))

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
    self.embed = param(rngs, (config.vocab_size, config.d_model), config.init_std)
    blocks = [Block(config, rngs, config.is_local(i)) for i in range(config.n_layers)]
    # Built one by one either way, so a seed gives the same weights scanned or unrolled.
    self.layers = stack_blocks(blocks) if config.scan_layers else nnx.List(blocks)
    self.final_norm = RMSNorm(config.d_model, config.norm_eps, config.norm_offset)
    if not config.tie_embeddings:
      self.lm_head = param(rngs, (config.d_model, config.vocab_size), config.init_std)

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
    packed = positions is not None
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, t))
    cfg = self.config
    full, local = masks(cfg, n, t, segment_ids, positions if packed else None, shared_prompt)
    x = self.embed[...][tokens].astype(cfg.dtype)
    if cfg.embed_scale:  # sqrt(D) rounded to the compute dtype first, as HF Gemma does
      x = x * jnp.asarray(cfg.d_model ** 0.5, cfg.dtype)
    policy = REMAT_POLICIES[cfg.remat]
    if cfg.scan_layers:  # one traced body for every layer, so which ones are local is data
      gd, stacked = nnx.split(self.layers)
      def body(x, xs):
        mask = attention_kernels.select(xs[1], local, full) if cfg.sliding_window else full
        y = nnx.merge(gd, xs[0])(x, positions, mask, xs[1])
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
    return softcap(h @ self.lm_head_weight().astype(h.dtype), self.config.final_logit_softcap)

  def __call__(self, tokens, segment_ids=None, positions=None) -> jax.Array:
    """Logits float32[N, T, V]; arguments as `hidden`."""
    return self.logits(self.hidden(tokens, segment_ids, positions))


def stack_blocks(blocks) -> Block:
  """One Block whose every param has a leading layer axis (the scanned layout)."""
  for b in blocks:
    # Data in the scanned model (Decoder._scan): one graph serves every layer.
    b.local = b.attn.local = False
  return nnx.merge(nnx.graphdef(blocks[0]),
                   jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in blocks]))


def scan_layers_conflicts(config: ModelConfig, *, lora_rank=0, init_from="", export_hf=""):
  """Start-up errors for `scan_layers` with options that read per-layer param paths (the
  KV-cache sampler slices the stack per layer; `jaxpref.parallel.sharding` gives the stack's
  leading axis the `layers` logical axis)."""
  why = {"--lora_rank": (lora_rank, "adapters are keyed by per-layer paths (layers/0/attn/q)"),
         "--init_from": (init_from, "checkpoints and HF weights are stored per layer"),
         "--export_hf": (export_hf, "HF tensors are written per layer")}
  return [f"--model.scan_layers does not work with {k}: {msg}; drop one of the two"
          for k, (on, msg) in why.items() if on and config.scan_layers]
