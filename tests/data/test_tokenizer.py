"""Tokenizer and sequence layout: exact prompt/response boundaries, one BOS, one EOS, the
loss mask, truncation, and the shipped tokenizer (deterministic, fits the tiny preset)."""

import json
import os

import numpy as np
import pytest

from jaxpref.data import PairDataset, PairRecord, Tokenizer, make_tiny, tokenize_pair
from jaxpref.data import tokenize_sequence, train_tokenizer

TINY = make_tiny.OUT
TOK = Tokenizer.load(os.path.join(TINY, "tokenizer.model"))
TINY_FILES = ("train.jsonl", "eval.jsonl", "corpus.txt", "tokenizer.model", "ranked_train.jsonl",
              "ranked_eval.jsonl")


def check_row(tokens, mask, seg, prompt, response, max_len):
  """The untruncated layout: BOS + prompt + response + EOS + padding."""
  p, r = TOK.encode(prompt), TOK.encode(response)
  n = 2 + len(p) + len(r)
  assert list(tokens[:n]) == [TOK.bos_id] + p + r + [TOK.eos_id]
  assert (tokens[n:] == TOK.pad_id).all()
  assert tokens[0] == TOK.bos_id and list(tokens).count(TOK.bos_id) == 1
  assert list(np.flatnonzero(tokens == TOK.eos_id)) == [n - 1]  # one EOS, ending the response
  assert list(np.flatnonzero(mask)) == list(range(1 + len(p), n))  # response tokens + EOS
  assert TOK.decode(tokens[mask > 0][:-1]) == response.strip()
  assert TOK.decode(tokens[1:1 + len(p)]) == prompt.strip()
  assert list(seg) == [1] * n + [0] * (max_len - n)


def test_special_ids_and_vocab():
  assert (TOK.pad_id, TOK.unk_id, TOK.bos_id, TOK.eos_id) == (0, 1, 2, 3)
  assert TOK.vocab_size <= 512  # fits the tiny preset


@pytest.mark.parametrize("rec", [
    PairRecord("name a fruit.", "i would say apple.", "i would say dog."),
    PairRecord("which tool do you like?", "how about saw?", "how about a very long answer?"),
    PairRecord("x", "y", "z"),
    PairRecord("give me one sport, please. ", " tennis.", "rowing"),  # spaces at the seam
])
def test_pair_layout_and_mask_for_chosen_and_rejected_alike(rec):
  tokens, mask, seg, cut = tokenize_pair(TOK, rec, 32)
  assert tokens.shape == mask.shape == seg.shape == (2, 32) and not cut
  assert (tokens.dtype, mask.dtype, seg.dtype) == (np.int32, np.float32, np.int32)
  for k, response in enumerate((rec.chosen, rec.rejected)):
    check_row(tokens[k], mask[k], seg[k], rec.prompt, response, 32)
    single = tokenize_sequence(TOK, rec.prompt, response, 32)
    for a, b in zip((tokens[k], mask[k], seg[k]), single[:3]):
      np.testing.assert_array_equal(a, b)
  assert mask[:, 0].sum() == 0  # GroupBatch: position 0 (BOS) never counts


def test_control_strings_in_text_stay_text():
  for text in ("<s> hello </s>", "</s><s>", "<pad> <unk>"):
    ids = TOK.encode(text)
    assert not {TOK.bos_id, TOK.eos_id, TOK.pad_id} & set(ids)
  tokens, mask, _, _ = tokenize_pair(TOK, PairRecord("say <s>.", "</s>", "<s>"), 32)
  assert (tokens == TOK.bos_id).sum(axis=1).tolist() == [1, 1]
  assert (tokens == TOK.eos_id).sum(axis=1).tolist() == [1, 1]


def test_truncation_drops_the_prompt_start_first():
  prompt, response = "tell me a fruit. " * 6, "i would say apple."
  p, r = TOK.encode(prompt), TOK.encode(response)
  exact = 2 + len(p) + len(r)
  tokens, mask, seg, cut = tokenize_sequence(TOK, prompt, response, exact)
  assert not cut and tokens[-1] == TOK.eos_id and seg.all()
  tokens, mask, _, cut = tokenize_sequence(TOK, prompt, response, exact - 1)
  assert cut and list(tokens) == [TOK.bos_id] + p[1:] + r + [TOK.eos_id]
  tokens, mask, _, cut = tokenize_sequence(TOK, prompt, response, len(r) + 2 + 3)
  assert cut and list(tokens) == [TOK.bos_id] + p[-3:] + r + [TOK.eos_id]
  assert mask.sum() == len(r) + 1
  tokens, mask, _, cut = tokenize_sequence(TOK, prompt, response, len(r) + 2)  # no prompt left
  assert cut and list(tokens) == [TOK.bos_id] + r + [TOK.eos_id] and mask[1:].all()


def test_truncation_cuts_a_too_long_response_at_its_end_without_eos():
  # Half the row keeps the prompt's end; the response loses its end and the EOS (it did
  # not end there).
  prompt, response = "tell me a fruit. " * 6, "i would say apple. " * 5
  p, r = TOK.encode(prompt), TOK.encode(response)
  tokens, mask, seg, cut = tokenize_sequence(TOK, prompt, response, 12)
  assert cut and TOK.eos_id not in tokens and tokens[0] == TOK.bos_id and seg.all()
  assert list(tokens[1:7]) == p[-6:]
  assert list(tokens[7:]) == r[:5] and mask[7:].all() and not mask[:7].any()
  tokens, mask, _, cut = tokenize_sequence(TOK, "x", response, 12)  # short prompt kept whole
  px = TOK.encode("x")
  assert cut and list(tokens) == [TOK.bos_id] + px + r[:11 - len(px)]
  with pytest.raises(ValueError, match="max_len"):
    tokenize_sequence(TOK, "x", "y", 2)


def test_pair_truncated_if_either_row_is_cut():
  rec = PairRecord("name a fruit.", "apple.", "i would say dog. " * 10)
  tokens, mask, _, cut = tokenize_pair(TOK, rec, 16)
  n_chosen = 2 + len(TOK.encode("name a fruit.")) + len(TOK.encode("apple."))
  assert cut and tokens[0, n_chosen - 1] == TOK.eos_id  # the chosen row is whole
  assert TOK.eos_id not in tokens[1] and mask[1, -1] == 1


def test_pair_dataset_chosen_first_and_counts():
  recs = [PairRecord("name a fruit.", "apple.", "dog."),
          PairRecord("name a fruit. " * 20, "apple.", "dog."),
          PairRecord("Name A Fruit.", "apple.", "dog.")]  # capitals: unknown to the tokenizer
  ds = PairDataset(recs, TOK, 24)
  assert ds.tokens.shape == (3, 2, 24) and ds.n == 3 and ds.n_truncated == 1
  assert ds.n_unk == 2 * 3 and ds.n_tokens == int(ds.segment_ids.sum())
  chosen, rejected = ds.tokens[0]
  assert TOK.decode(chosen[ds.loss_mask[0, 0] > 0][:-1]) == "apple."
  assert TOK.decode(rejected[ds.loss_mask[0, 1] > 0][:-1]) == "dog."
  batch = ds.batch(np.array([1, 0]))
  assert batch.tokens.shape == (2, 2, 24) and batch.valid.all() and (batch.weight == 1).all()
  assert batch.scores is None and batch.label is None
  assert (batch.valid.dtype, batch.weight.dtype) == (np.bool_, np.float32)
  np.testing.assert_array_equal(batch.tokens[1], ds.tokens[0])
  with pytest.raises(ValueError, match="max_len"):
    PairDataset(recs, TOK, 2)


def test_load_errors_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.model"):
    Tokenizer.load(str(tmp_path / "nope.model"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="bad.model.*not a sentencepiece model"):
    Tokenizer.load(str(bad))


def test_train_tokenizer_is_deterministic_with_fixed_ids(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("".join(f"the {w} is on the {v}.\n" for w in ("cat", "dog", "bird")
                            for v in ("mat", "roof", "table", "chair")))
  train_tokenizer.main([f"--corpus={corpus}", f"--model_prefix={tmp_path / 'a'}",
                        "--vocab_size=64"])
  path_b = train_tokenizer.train(str(corpus), str(tmp_path / "b"), 64)
  model = (tmp_path / "a.model").read_bytes()
  assert model == open(path_b, "rb").read()  # no paths recorded inside the model
  tok = Tokenizer.load(path_b)
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert tok.vocab_size <= 64
  assert len((tmp_path / "a.vocab").read_text().splitlines()) == tok.vocab_size
  assert tok.decode(tok.encode("the dog is on the mat.")) == "the dog is on the mat."


def test_make_tiny_reproduces_the_shipped_files(tmp_path):
  make_tiny.main([f"--out={tmp_path}"])
  for name in TINY_FILES:
    assert (tmp_path / name).read_bytes() == open(os.path.join(TINY, name), "rb").read(), name


def test_every_tiny_record_round_trips():
  for split in ("train", "eval"):
    with open(os.path.join(TINY, f"{split}.jsonl")) as f:
      for line in f:
        for text in json.loads(line).values():
          ids = TOK.encode(text)
          assert TOK.unk_id not in ids and TOK.decode(ids) == text
