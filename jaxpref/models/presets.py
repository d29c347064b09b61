"""Named model sizes; `get_config(name, **overrides)`."""

from __future__ import annotations

import dataclasses

from jaxpref.models.decoder import ModelConfig

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
