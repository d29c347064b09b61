"""Hugging Face tokenizers (jaxpref/data/tokenizer.py): a tokenizer.json, or a model folder
holding one, gives the token ids and special ids transformers' PreTrainedTokenizerFast gives
for the same files; missing special tokens are errors naming the files."""

import json
import os

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from jaxpref.data import Tokenizer, make_tiny, tokenize_sequence  # noqa: E402
from jaxpref.data.tokenizer import HFTokenizer, find  # noqa: E402

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|eot|>"]
TEXTS = ["name a fruit.", "i would say apple, or maybe a pear!", "which tool do you like?",
         "  two  spaces and\ttabs\nnew lines", "unseen zebra qwerty 123", "hi<|eot|>there</s>",
         ""]


def corpus():
  with open(os.path.join(make_tiny.OUT, "corpus.txt")) as f:
    return [line.strip() for line in f if line.strip()]


def build(kind: str) -> "tokenizers.Tokenizer":
  """A small tokenizer trained in memory on the tiny corpus."""
  from tokenizers import decoders, models, pre_tokenizers, trainers
  if kind == "bpe":  # byte-level, as Llama 3 / Qwen2 / GPT-2
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  else:
    tk = tokenizers.Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL)
  tk.train_from_iterator(corpus(), trainer)
  return tk


def hf_folder(path, kind="bpe", config=None, model_config=None):
  os.makedirs(path, exist_ok=True)
  build(kind).save(os.path.join(path, "tokenizer.json"))
  config = {"bos_token": "<s>", "eos_token": {  # as older tokenizer_config.json files write it
                "__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False,
                "rstrip": False, "single_word": False, "special": True},
            "pad_token": "<pad>", "unk_token": "<unk>"} if config is None else config
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  if model_config is not None:
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(model_config, f)
  return str(path)


@pytest.mark.parametrize("kind", ["bpe", "wordlevel"])
def test_ids_and_text_match_transformers(tmp_path, kind):
  folder = hf_folder(tmp_path / kind, kind)
  ours = Tokenizer.load(folder)
  assert isinstance(ours, HFTokenizer) and find(folder) == os.path.join(folder, "tokenizer.json")
  theirs = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
  for text in TEXTS:
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False), text
    assert ours.decode(ids) == theirs.decode(ids), text
  assert len(ours.encode(TEXTS[1])) > 3  # real tokens, not one unknown
  assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == (
      theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id, theirs.unk_token_id)
  assert ours.vocab_size == len(theirs)
  # An added special token in the text is that token, as in transformers.
  assert SPECIAL.index("<|eot|>") in ours.encode("hi<|eot|>there")
  # The file itself reads the same as the folder.
  file = Tokenizer.load(os.path.join(folder, "tokenizer.json"))
  assert file.encode(TEXTS[1]) == ours.encode(TEXTS[1]) and file.eos_id == ours.eos_id


def test_sequence_layout_with_a_tokenizer_json(tmp_path):
  tok = Tokenizer.load(hf_folder(tmp_path / "t"))
  tokens, mask, seg, truncated = tokenize_sequence(tok, "name a fruit.", " apple.", 32)
  p, r = tok.encode("name a fruit."), tok.encode(" apple.")
  n = 2 + len(p) + len(r)
  assert list(tokens[:n]) == [tok.bos_id] + p + r + [tok.eos_id] and not truncated
  assert (tokens[n:] == tok.pad_id).all()
  assert list(np.flatnonzero(mask)) == list(range(1 + len(p), n))
  assert seg.sum() == n


def test_special_ids_fall_back_to_config_json(tmp_path):
  # Qwen2's tokenizer_config.json has "bos_token": null; config.json holds bos_token_id.
  folder = hf_folder(tmp_path / "q", config={"bos_token": None, "eos_token": "<|eot|>"},
                     model_config={"bos_token_id": 1, "eos_token_id": [4, 2]})
  tok = Tokenizer.load(folder)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 4, 0, -1)
  with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
    json.dump({"bos_token": {"content": "<s>"}, "pad_token": "<pad>"}, f)
  assert Tokenizer.load(folder).bos_id == 1  # "<s>" is id 1 as well, read from the map


def test_missing_or_unknown_special_tokens_name_the_files(tmp_path):
  folder = hf_folder(tmp_path / "noeos", config={"bos_token": "<s>"})
  with pytest.raises(ValueError, match=r"no EOS token: .*tokenizer_config\.json.*config\.json"):
    Tokenizer.load(folder)
  folder = hf_folder(tmp_path / "typo", config={"bos_token": "<s>", "eos_token": "<eos>"})
  with pytest.raises(ValueError, match=r"tokenizer_config\.json: eos_token '<eos>' is not in"):
    Tokenizer.load(folder)
  with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
    Tokenizer.load(str(tmp_path))
  bad = tmp_path / "bad.json"
  bad.write_text("{}")
  with pytest.raises(ValueError, match="is not a tokenizers tokenizer.json"):
    Tokenizer.load(str(bad))


def test_sentencepiece_folder_still_loads():
  tok = Tokenizer.load(make_tiny.OUT)  # the tiny folder holds tokenizer.model
  assert (tok.bos_id, tok.eos_id) == (2, 3) and tok.chat_template is None
  assert tok.encode("name a fruit.") == Tokenizer.load(
      os.path.join(make_tiny.OUT, "tokenizer.model")).encode("name a fruit.")
