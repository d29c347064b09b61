"""Optional numeric record fields: `weight` and `chosen_score`/`rejected_score`."""

import os

import numpy as np
import pytest

from jaxpref.data import DataError, PairDataset, Tokenizer, read_pairs
from jaxpref.data import make_tiny

TOK = Tokenizer.load(os.path.join(make_tiny.OUT, "tokenizer.model"))


def write(tmp_path, lines):
  path = tmp_path / "d.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def rec(extra=""):
  return '{"prompt": "name a fruit.", "chosen": "apple.", "rejected": "dog."' + extra + "}"


def test_weights_and_scores_reach_the_batch(tmp_path):
  path = write(tmp_path, [rec(', "weight": 2, "chosen_score": 8, "rejected_score": 3.5'),
                          rec(', "weight": 0.5, "chosen_score": 1, "rejected_score": 0')])
  records, _ = read_pairs(path)
  ds = PairDataset(records, TOK, 16)
  batch = ds.batch(np.array([1, 0]), weight=np.array([1.0, 0.0]))
  np.testing.assert_array_equal(batch.weight, [0.5, 0.0])  # record weight x padding
  np.testing.assert_array_equal(batch.scores, [[1, 0], [8, 3.5]])
  assert batch.valid.tolist() == [[True, True], [False, False]]


def test_no_fields_means_weight_one_and_no_scores(tmp_path):
  records, _ = read_pairs(write(tmp_path, [rec(), rec()]))
  batch = PairDataset(records, TOK, 16).batch(np.array([0, 1]))
  assert batch.scores is None and batch.weight.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("extra,needle", [
    (', "weight": -1', "field 'weight' must be a finite number >= 0"),
    (', "weight": "2"', "field 'weight'"),
    (', "weight": true', "field 'weight'"),
    (', "chosen_score": 3', "field 'rejected_score' is missing"),
    (', "chosen_score": "a", "rejected_score": 1', "field 'chosen_score' must be a finite number"),
])
def test_bad_numeric_fields_are_named(tmp_path, extra, needle):
  with pytest.raises(DataError, match=r"d.jsonl:2: ") as e:
    read_pairs(write(tmp_path, [rec(), rec(extra)]))
  assert needle in str(e.value)


def test_scores_in_some_records_only_is_an_error(tmp_path):
  path = write(tmp_path, [rec(', "chosen_score": 1, "rejected_score": 0'), rec(), rec()])
  with pytest.raises(DataError, match=r"d.jsonl:2: fields 'chosen_score'/'rejected_score' are missing"):
    read_pairs(path)
