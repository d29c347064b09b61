"""Named model sizes (`get_config(name, **overrides)`) and parameter counts."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from jaxpref.models.decoder import ModelConfig

# Family switches shared by a family's presets (docs/models.md).
_QWEN2 = dict(qkv_bias=True, rope_theta=1000000.0, norm_eps=1e-6)
_GEMMA = dict(vocab_size=256000, head_dim=256, rope_theta=10000.0, norm_eps=1e-6,
              tie_embeddings=True, max_len=8192, embed_scale=True, mlp_activation="gelu_tanh",
              norm_offset=1.0)
_GEMMA2 = dict(_GEMMA, post_norms=True, attn_logit_softcap=50.0, final_logit_softcap=30.0,
               sliding_window=4096, sliding_window_pattern=2)

PRESETS: dict[str, dict] = {
    # CPU tests and the quickstart: ~0.1M parameters.
    "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                 d_ff=192, max_len=256, tie_embeddings=True),
    "small": dict(vocab_size=32000, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4,
                  head_dim=32, d_ff=768, max_len=2048),
    # Published shapes (Hugging Face config.json of the released checkpoints).
    "llama2_7b": dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                      head_dim=128, d_ff=11008, rope_theta=10000.0, norm_eps=1e-5,
                      max_len=4096),
    "llama3_8b": dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      head_dim=128, d_ff=14336, rope_theta=500000.0, norm_eps=1e-5,
                      max_len=8192),
    # Qwen2 / Qwen2.5: Llama with q/k/v biases (Qwen/Qwen2-0.5B, Qwen/Qwen2.5-7B).
    "qwen2_0_5b": dict(_QWEN2, vocab_size=151936, d_model=896, n_layers=24, n_heads=14,
                       n_kv_heads=2, head_dim=64, d_ff=4864, tie_embeddings=True,
                       max_len=131072),
    "qwen2_5_7b": dict(_QWEN2, vocab_size=152064, d_model=3584, n_layers=28, n_heads=28,
                       n_kv_heads=4, head_dim=128, d_ff=18944, max_len=131072),
    # Gemma (google/gemma-2b, google/gemma-7b): GeGLU, (1 + w) norms, scaled embeddings.
    "gemma_2b": dict(_GEMMA, d_model=2048, n_layers=18, n_heads=8, n_kv_heads=1, d_ff=16384),
    "gemma_7b": dict(_GEMMA, d_model=3072, n_layers=28, n_heads=16, n_kv_heads=16, d_ff=24576),
    # Gemma 2 (google/gemma-2-2b, -9b, -27b): post-norms, soft-caps, local layers (4096) and
    # global ones alternating, local first.
    "gemma2_2b": dict(_GEMMA2, d_model=2304, n_layers=26, n_heads=8, n_kv_heads=4, d_ff=9216,
                      query_pre_attn_scalar=256.0),
    "gemma2_9b": dict(_GEMMA2, d_model=3584, n_layers=42, n_heads=16, n_kv_heads=8,
                      d_ff=14336, query_pre_attn_scalar=256.0),
    "gemma2_27b": dict(_GEMMA2, d_model=4608, n_layers=46, n_heads=32, n_kv_heads=16,
                       head_dim=128, d_ff=36864, query_pre_attn_scalar=144.0),
}


def get_config(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown model field(s) {', '.join(unknown)} (--model.FIELD); "
                     f"fields: {', '.join(sorted(fields))}")
  return ModelConfig(**{**PRESETS[name], **overrides})


def param_count(config: ModelConfig) -> int:
  """Closed-form parameter count (for presets too large to instantiate)."""
  c = config
  attn = c.d_model * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
  bias = c.head_dim * (c.n_heads + 2 * c.n_kv_heads) if c.qkv_bias or c.attn_bias else 0
  bias += c.d_model if c.attn_bias else 0
  norms = (4 if c.post_norms else 2) * c.d_model + (2 * c.head_dim if c.qk_norm else 0)
  per_layer = attn + bias + 3 * c.d_model * c.d_ff + norms
  head = 0 if c.tie_embeddings else c.d_model * c.vocab_size
  return c.vocab_size * c.d_model + c.n_layers * per_layer + c.d_model + head


def count_params(model: nnx.Module) -> int:
  """Parameters actually held by `model` (checks `param_count`)."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
