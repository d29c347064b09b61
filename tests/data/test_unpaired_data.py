"""Unpaired records: reading, errors, splitting pairs, and the KL member of each group."""

import json
import os

import numpy as np
import pytest

from jaxpref.data import (DataError, PairRecord, Tokenizer, UnpairedDataset, UnpairedRecord,
                          read_pairs, read_unpaired, unpair)
from jaxpref.data import make_tiny

TOK = Tokenizer.load(os.path.join(make_tiny.OUT, "tokenizer.model"))


def test_read_unpaired_and_errors(tmp_path):
  path = tmp_path / "u.jsonl"
  path.write_text('{"prompt": "name a fruit.", "completion": "apple.", "label": true}\n'
                  '{"prompt": "name a fruit.", "completion": "dog.", "label": 0, "weight": 2}\n')
  records, report = read_unpaired(str(path))
  assert records == [UnpairedRecord("name a fruit.", "apple.", True, 1.0),
                     UnpairedRecord("name a fruit.", "dog.", False, 2.0)]
  for line, needle in [('{"prompt": "p", "completion": "c"}', "field 'label' is missing"),
                       ('{"prompt": "p", "completion": "c", "label": "yes"}', "field 'label' must be"),
                       ('{"prompt": "p", "label": true}', "field 'completion' is missing")]:
    path.write_text('{"prompt": "p", "completion": "c", "label": true}\n' + line + "\n")
    with pytest.raises(DataError, match="u.jsonl:2: ") as e:
      read_unpaired(str(path))
    assert needle in str(e.value)


def test_dataset_labels_and_mismatched_member():
  pairs = [PairRecord(f"name a {c}.", "apple.", "dog.") for c in ("fruit", "color", "tool")]
  records = unpair(pairs)
  assert [r.label for r in records] == [True, False] * 3
  ds = UnpairedDataset(records, TOK, 16)
  assert ds.n == 6 and ds.n_desirable == 3
  batch = ds.batch(np.arange(6))
  np.testing.assert_array_equal(batch.label, [[1, -1], [0, -1]] * 3)
  for i in range(6):
    j = (i + 3) % 6
    member1 = TOK.decode(batch.tokens[i, 1][batch.loss_mask[i, 1] > 0][:-1])
    assert member1 == records[j].completion
    assert records[j].prompt != records[i].prompt  # not the pair's own other completion
    assert TOK.decode(batch.tokens[i, 0][batch.loss_mask[i, 0] > 0][:-1]) == records[i].completion


def test_message_lists_read_as_the_pair_does(tmp_path):
  """Without a chat template (the tiny tokenizer has none), message lists render in the
  plain format, prompt and completion exactly as the equivalent pair record's."""
  turns = [{"role": "user", "content": "name a fruit."}]
  said = [{"role": "assistant", "content": "apple."}]
  (tmp_path / "p.jsonl").write_text(json.dumps({"chosen": turns + said, "rejected": turns + [
      {"role": "assistant", "content": "dog."}]}) + "\n")
  (tmp_path / "u.jsonl").write_text(
      json.dumps({"completion": turns + said, "label": True}) + "\n"
      + json.dumps({"prompt": turns, "completion": "apple.", "label": True}) + "\n"
      + json.dumps({"prompt": "name a fruit.", "completion": said, "label": True}) + "\n")
  pair = read_pairs(str(tmp_path / "p.jsonl"))[0][0]
  records = read_unpaired(str(tmp_path / "u.jsonl"))[0]
  assert pair.prompt == "User: name a fruit.\nAssistant:"
  assert records == [UnpairedRecord(pair.prompt, pair.chosen, True)] * 3
  bad = {"prompt": turns, "completion": 3, "label": 1}
  (tmp_path / "u.jsonl").write_text(json.dumps(bad) + "\n")
  with pytest.raises(DataError, match="u.jsonl:1: field 'completion' must be a string"):
    read_unpaired(str(tmp_path / "u.jsonl"))
