"""The reward head reads the token transformers' *ForSequenceClassification reads: the
rightmost token that is not pad_token_id. With pad_token_id = eos_token_id that is the token
before the closing EOS (hf_reward.read_rule gives skip_id), on import and on export."""

import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxpref.data import Tokenizer, make_tiny  # noqa: E402
from jaxpref.models import convert, hf_reward  # noqa: E402
from jaxpref.models.heads import RewardModel, last_token_index  # noqa: E402

V, BOS, EOS, PAD = 160, 2, 3, 0  # the tiny sentencepiece tokenizer's ids
SHAPE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             bos_token_id=BOS, eos_token_id=EOS)


def seq_cls(path, pad):
  torch.manual_seed(0)
  model = transformers.LlamaForSequenceClassification(
      transformers.LlamaConfig(num_labels=1, pad_token_id=pad, **SHAPE)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  model.save_pretrained(path)
  return str(path), model


def rows(pad, t=20, seed=0):
  """BOS + text + EOS, right-padded with `pad`: (tokens, segment_ids)."""
  rng = np.random.default_rng(seed)
  tokens, seg = np.full((4, t), pad), np.zeros((4, t), np.int32)
  for i, n in enumerate((6, 11, 19, 20)):  # the last row fills the row, EOS last
    tokens[i, :n] = [BOS, *rng.integers(4, V, n - 2), EOS]
    seg[i, :n] = 1
  return tokens, seg


def ours(path, skip_id, tokens, seg):
  cfg = convert.run_config(path, {})
  decoder, head = hf_reward.load(path, cfg)
  model = RewardModel(cfg, 1, rngs=nnx.Rngs(0), skip_id=skip_id)
  model.decoder = decoder
  model.head[...] = jnp.asarray(head)
  return model, np.asarray(model(jnp.asarray(tokens, jnp.int32), jnp.asarray(seg)))


def theirs(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def test_last_token_index_skips_the_id():
  tokens = jnp.array([[2, 7, 9, 3, 3, 3], [2, 3, 3, 3, 3, 3], [3, 3, 3, 3, 3, 3]])
  seg = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [0] * 6])
  assert list(last_token_index(seg)) == [3, 1, 0]
  assert list(last_token_index(seg, tokens, 3)) == [2, 0, 0]
  with pytest.raises(ValueError, match="needs the tokens"):
    last_token_index(seg, None, 3)


@pytest.mark.slow
@pytest.mark.parametrize("pad", [PAD, EOS], ids=["pad_is_pad", "pad_is_eos"])
def test_import_reads_the_token_transformers_reads(tmp_path, pad):
  path, model = seq_cls(tmp_path / "cls", pad)
  tok = Tokenizer.load(f"{make_tiny.OUT}/tokenizer.model")
  written, skip, note = hf_reward.read_rule(path, tok)
  assert written == pad and skip == (EOS if pad == EOS else -1)
  assert (note is not None) == (pad == EOS) and (note is None or "before the closing EOS" in note)
  tokens, seg = rows(pad)
  got, want = ours(path, skip, tokens, seg)[1], theirs(model, tokens)
  diff = float(np.abs(got - want).max())
  print(f"pad_token_id={pad}: max |jaxpref reward - transformers score| = {diff:.3g}")
  assert diff < 1e-4 and want.std() > 1e-2
  if pad == EOS:  # reading the EOS itself, as before, gives other scores
    assert np.abs(ours(path, -1, tokens, seg)[1] - want).max() > 1e-2


@pytest.mark.slow
def test_export_round_trip_when_pad_is_eos(tmp_path):
  path, _ = seq_cls(tmp_path / "cls", EOS)
  tokens, seg = rows(EOS, seed=1)
  model, scores = ours(path, EOS, tokens, seg)
  pure = {"decoder": nnx.to_pure_dict(nnx.state(model.decoder, nnx.Param)),
          "head": np.asarray(model.head[...]) * 2.0}  # a "trained" head, not the loaded one
  cfg = convert.run_config(path, {})
  with pytest.raises(ValueError, match="this model read the EOS itself"):
    hf_reward.save(pure, cfg, str(tmp_path / "bad"), pad_token_id=EOS, eos_token_id=EOS)
  out = str(tmp_path / "out")
  files = hf_reward.save(pure, cfg, out, pad_token_id=EOS, eos_token_id=EOS, bos_token_id=BOS,
                         skip_id=EOS, max_shard_size="20KB")
  assert "model.safetensors.index.json" in files and len(files) > 2  # shards + index
  back = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  assert (back.config.pad_token_id, back.config.eos_token_id) == (EOS, EOS)
  np.testing.assert_allclose(theirs(back, tokens), 2.0 * scores, atol=1e-4, rtol=0)


def test_read_rule_of_a_causal_start_uses_the_tokenizers_padding():
  tok = types.SimpleNamespace(pad_id=EOS, eos_id=EOS)  # a tokenizer that pads with EOS
  assert hf_reward.read_rule("", tok)[:2] == (EOS, EOS)
  tok = types.SimpleNamespace(pad_id=PAD, eos_id=EOS)
  assert hf_reward.read_rule("", tok) == (PAD, -1, None)
