"""transformers' defaults for the config.json keys `hf_config` reads, per family (the 5.x
config classes' values): a key a config.json omits takes its family's value, as
`from_pretrained` gives it, never jaxpref's."""

from __future__ import annotations

# HEADS: num_key_value_heads = num_attention_heads; HIDDEN: head_dim = hidden // heads.
HEADS, HIDDEN = "num_attention_heads", "hidden_size // num_attention_heads"
LLAMA_DEFAULTS = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=HEADS, head_dim=HIDDEN, rms_norm_eps=1e-6,
    max_position_embeddings=2048, tie_word_embeddings=False, rope_theta=10000.0,
    bos_token_id=1, eos_token_id=2, pad_token_id=None)
QWEN2_DEFAULTS = dict(
    LLAMA_DEFAULTS, vocab_size=151936, intermediate_size=22016, num_key_value_heads=32,
    max_position_embeddings=32768, bos_token_id=None, eos_token_id=None)
GEMMA_DEFAULTS = dict(
    LLAMA_DEFAULTS, vocab_size=256000, hidden_size=3072, intermediate_size=24576,
    num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16, head_dim=256,
    max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
    pad_token_id=0)
QWEN3_DEFAULTS = dict(QWEN2_DEFAULTS, head_dim=128)
MISTRAL_DEFAULTS = dict(LLAMA_DEFAULTS, intermediate_size=14336, num_key_value_heads=8,
                         max_position_embeddings=131072, sliding_window=4096)
GEMMA2_DEFAULTS = dict(
    GEMMA_DEFAULTS, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, query_pre_attn_scalar=256,
    sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
# Gemma 3 text: global layers' theta 1e6, local layers' (rope_local_base_freq) 1e4; without
# layer_types, every sliding_window_pattern-th layer (6th) is global.
GEMMA3_DEFAULTS = dict(
    GEMMA2_DEFAULTS, vocab_size=262208, max_position_embeddings=131072, rope_theta=1e6,
    rope_local_base_freq=1e4, sliding_window_pattern=6, attn_logit_softcapping=None,
    final_logit_softcapping=None)
MIXTRAL_DEFAULTS = dict(
    MISTRAL_DEFAULTS, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=1e6,
    sliding_window=None, num_local_experts=8, num_experts_per_tok=2)
PHI3_DEFAULTS = dict(
    LLAMA_DEFAULTS, vocab_size=32064, hidden_size=3072, intermediate_size=8192,
    max_position_embeddings=4096, rms_norm_eps=1e-5, eos_token_id=32000, pad_token_id=32000,
    sliding_window=None)


def with_defaults(hf: dict, defaults: dict) -> dict:
  """`hf` with every omitted key at its family default. An explicit null keeps its meaning
  (a null cap is off); a null head count or head_dim is derived, as transformers derives it."""
  out = {**{k: v for k, v in defaults.items() if k not in hf}, **hf}
  for key, derived in (("num_key_value_heads", HEADS), ("head_dim", HIDDEN)):
    if out.get(key) in (None, derived):
      out[key] = (out["num_attention_heads"] if derived == HEADS
                  else out["hidden_size"] // out["num_attention_heads"])
  return out
