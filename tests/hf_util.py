"""A small random-weight Hugging Face Llama saved as a Hub folder, for the --init_from and
--export_hf tests (imports torch and transformers: call only after importorskip)."""


def random_llama(path, vocab_size: int, seed: int = 0):
  """Saves a 2-layer LlamaForCausalLM whose weights are N(0, 0.2), far from any init
  jaxpref would draw, under `path`; returns (path as str, the torch model)."""
  import torch
  import transformers
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  model.save_pretrained(path)
  return str(path), model
