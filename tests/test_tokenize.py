"""Sequence layout: exact prompt/response boundaries, one BOS, one EOS, the loss mask."""

import json
import os

import numpy as np
import pytest

from jaxpref.data import PairDataset, PairRecord, Tokenizer, tokenize_sequence
from jaxpref.data import make_tiny

TINY = os.path.join(os.path.dirname(make_tiny.__file__), "tiny")
TOK = Tokenizer.load(os.path.join(TINY, "tokenizer.model"))


def test_special_ids_and_vocab():
  assert (TOK.pad_id, TOK.bos_id, TOK.eos_id) == (0, 2, 3)
  assert TOK.vocab_size <= 512  # fits the tiny preset


@pytest.mark.parametrize("prompt,response", [
    ("name a fruit.", "i would say apple."), ("which tool do you like?", "how about saw?"),
    ("x", "y")])
def test_layout_and_mask(prompt, response):
  tokens, mask, seg, cut = tokenize_sequence(TOK, prompt, response, 32)
  p, r = TOK.encode(prompt), TOK.encode(response)
  n = 2 + len(p) + len(r)
  assert not cut
  assert list(tokens[:n]) == [TOK.bos_id] + p + r + [TOK.eos_id]
  assert (tokens[n:] == TOK.pad_id).all()
  assert list(tokens).count(TOK.bos_id) == 1 and list(tokens).count(TOK.eos_id) == 1
  # The mask covers exactly the response tokens and the EOS.
  assert list(np.flatnonzero(mask)) == list(range(1 + len(p), n))
  assert TOK.decode(tokens[mask > 0][:-1]) == response
  assert TOK.decode(tokens[1:1 + len(p)]) == prompt
  assert list(seg) == [1] * n + [0] * (32 - n)


def test_control_strings_in_text_stay_text():
  ids = TOK.encode("<s> hello </s>")
  assert TOK.bos_id not in ids and TOK.eos_id not in ids


def test_truncation_keeps_prompt_end_then_response_start():
  prompt = "tell me a fruit. " * 6
  response = "i would say apple."
  p, r = TOK.encode(prompt), TOK.encode(response)
  max_len = len(r) + 2 + 3
  tokens, mask, _, cut = tokenize_sequence(TOK, prompt, response, max_len)
  assert cut
  assert list(tokens) == [TOK.bos_id] + p[-3:] + r + [TOK.eos_id]
  assert mask.sum() == len(r) + 1
  # Response alone too long: half the row keeps the prompt's end, the response loses its
  # end and the EOS (it did not end there).
  tokens, mask, _, cut = tokenize_sequence(TOK, prompt, response * 5, 12)
  assert cut and TOK.eos_id not in tokens and tokens[0] == TOK.bos_id
  assert list(tokens[1:7]) == p[-6:]
  assert list(tokens[7:]) == TOK.encode(response * 5)[:5] and mask[7:].all() and not mask[:7].any()


def test_pair_dataset_chosen_first_and_counts_truncation():
  recs = [PairRecord("name a fruit.", "apple.", "dog."),
          PairRecord("name a fruit. " * 20, "apple.", "dog.")]
  ds = PairDataset(recs, TOK, 16)
  assert ds.tokens.shape == (2, 2, 16) and ds.n_truncated == 1
  chosen, rejected = ds.tokens[0]
  assert TOK.decode(chosen[ds.loss_mask[0, 0] > 0][:-1]) == "apple."
  assert TOK.decode(rejected[ds.loss_mask[0, 1] > 0][:-1]) == "dog."
  batch = ds.batch(np.array([1, 0]))
  assert batch.tokens.shape == (2, 2, 16) and batch.valid.all() and (batch.weight == 1).all()


def test_every_tiny_record_round_trips():
  for split in ("train", "eval"):
    with open(os.path.join(TINY, f"{split}.jsonl")) as f:
      for line in f:
        rec = json.loads(line)
        for text in rec.values():
          assert TOK.decode(TOK.encode(text)) == text
