"""config.json keys a checkpoint omits take transformers' default for its family (Gemma 2
without soft-caps: 50 and 30; Gemma without head_dim: 256; Qwen2 without
num_key_value_heads: 32), as `from_pretrained` would build the model, never jaxpref's."""

import pytest

transformers = pytest.importorskip("transformers")

from jaxpref.models import hf_config  # noqa: E402

# The fewest keys that name each family; every other key read is left to the defaults.
SPARSE = {f: {"model_type": f, "architectures": [fam.architecture]}
          for f, fam in hf_config.FAMILIES.items()}
# Small shapes, so the derived keys (head_dim, kv heads) differ from the defaults' own; 32
# heads, which every family's default K/V head count divides.
SHAPE = dict(hidden_size=128, num_attention_heads=32, num_hidden_layers=2, intermediate_size=96,
             vocab_size=128)


def built(hf: dict) -> dict:
  """The config.json transformers writes after filling in its defaults."""
  keys = {k: v for k, v in hf.items() if k != "architectures"}
  config = transformers.AutoConfig.for_model(**keys)
  return {**config.to_dict(), "architectures": hf["architectures"]}


@pytest.mark.parametrize("family", list(SPARSE))
@pytest.mark.parametrize("shape", [False, True], ids=["all_default", "small"])
def test_omitted_keys_read_as_transformers_fills_them(family, shape):
  hf = dict(SPARSE[family], **(SHAPE if shape else {}))
  ours = hf_config.config_from_hf(hf)
  assert ours == hf_config.config_from_hf(built(hf))


@pytest.mark.parametrize("family,key", [
    (f, k) for f, fam in hf_config.FAMILIES.items() for k in fam.defaults
    if k not in ("bos_token_id", "eos_token_id", "pad_token_id")])
def test_each_key_omitted_alone(family, key):
  """A full config.json less one key: that key's default, and only it, changes."""
  full = built(dict(SPARSE[family], **SHAPE))
  full.pop(key, None)
  if key == "rope_theta":  # transformers 5 keeps it in rope_parameters
    full["rope_parameters"] = {"rope_type": "default"}
  if key in ("sliding_window", "num_hidden_layers"):  # layer_types was made for the given
    full.pop("layer_types", None)
  assert hf_config.config_from_hf(full) == hf_config.config_from_hf(built(full))


def test_the_issues_examples():
  gemma2 = hf_config.config_from_hf(SPARSE["gemma2"])
  assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap) == (50.0, 30.0)
  assert (gemma2.sliding_window, gemma2.query_pre_attn_scalar) == (4096, 256.0)
  off = hf_config.config_from_hf({**SPARSE["gemma2"], "attn_logit_softcapping": None,
                                  "final_logit_softcapping": None})
  assert (off.attn_logit_softcap, off.final_logit_softcap) == (0.0, 0.0)  # null: off
  gemma = hf_config.config_from_hf({**SPARSE["gemma"], **SHAPE})
  assert gemma.head_dim == 256 and gemma.n_kv_heads == 16 and gemma.tie_embeddings
  llama = hf_config.config_from_hf({**SPARSE["llama"], **SHAPE})
  assert (llama.head_dim, llama.n_kv_heads, llama.max_len) == (4, 32, 2048)
  qwen2 = hf_config.config_from_hf({**SPARSE["qwen2"], **SHAPE, "num_attention_heads": 64})
  assert (qwen2.n_kv_heads, qwen2.max_len, qwen2.head_dim) == (32, 32768, 2)
  nulls = hf_config.config_from_hf({**SPARSE["qwen2"], **SHAPE, "num_key_value_heads": None})
  assert nulls.n_kv_heads == 32  # null: as many as the query heads
