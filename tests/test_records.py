"""JSONL reading: errors name file, line and field; skipped records are counted; batch order."""

import json
import os

import numpy as np
import pytest

from jaxpref.data import DataError, PairDataset, Tokenizer, batch_indices, eval_batches, read_pairs
from jaxpref.data import make_tiny

GOOD = '{"prompt": "p", "chosen": "c", "rejected": "r"}'
BAD = {
    "invalid JSON": ('{"prompt": "p", "chosen": ', "invalid JSON"),
    "missing": ('{"prompt": "p", "rejected": "r"}', "field 'chosen' is missing"),
    "empty": ('{"prompt": "p", "chosen": "  ", "rejected": "r"}', "field 'chosen' is empty"),
    "type": ('{"prompt": "p", "chosen": 3, "rejected": "r"}', "field 'chosen' must be a string"),
    "object": ('["p", "c", "r"]', "expected a JSON object"),
}


def write(tmp_path, lines, name="data.jsonl"):
  path = tmp_path / name
  path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
  return str(path)


@pytest.mark.parametrize("case", sorted(BAD))
def test_error_names_file_line_and_field(tmp_path, case):
  line, needle = BAD[case]
  path = write(tmp_path, [GOOD, "", line, GOOD])
  with pytest.raises(DataError) as e:
    read_pairs(path)
  assert f"data.jsonl:3: " in str(e.value) and needle in str(e.value)


def test_non_utf8_bytes(tmp_path):
  path = write(tmp_path, [GOOD, b'{"prompt": "p\xff", "chosen": "c", "rejected": "r"}'])
  with pytest.raises(DataError, match=r"data.jsonl:2: bytes are not valid UTF-8"):
    read_pairs(path)


def test_skip_invalid_counts_every_reason(tmp_path):
  lines = [GOOD, BAD["missing"][0], "", BAD["missing"][0], b"\xff\xfe", BAD["empty"][0], GOOD]
  records, report = read_pairs(write(tmp_path, lines), skip_invalid=True)
  assert len(records) == report.n_read == 2
  assert report.n_skipped == 4
  assert report.reasons == {"missing field 'chosen'": 2, "invalid UTF-8": 1,
                            "field 'chosen' is empty": 1}
  assert report.first_errors[0].endswith("data.jsonl:2: field 'chosen' is missing")
  assert "skipped 4" in report.summary()


def test_missing_file_and_no_records(tmp_path):
  with pytest.raises(DataError, match="nope.jsonl: no such file"):
    read_pairs(str(tmp_path / "nope.jsonl"))
  with pytest.raises(DataError, match="no valid records"):
    read_pairs(write(tmp_path, [BAD["missing"][0]]), skip_invalid=True)


def test_batch_indices_pure_and_cover_each_epoch():
  n, bs = 10, 4
  stream = np.concatenate([batch_indices(n, bs, s, seed=3) for s in range(10)])  # 4 epochs
  for e in range(4):
    assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
  assert not np.array_equal(stream[:n], stream[n:2 * n])  # a fresh order each epoch
  np.testing.assert_array_equal(batch_indices(n, bs, 7, seed=3), stream[28:32])
  assert not np.array_equal(batch_indices(n, bs, 7, seed=4), stream[28:32])


def test_eval_batches_cover_every_record_once():
  tok = Tokenizer.load(os.path.join(make_tiny.OUT, "tokenizer.model"))
  records, _ = read_pairs(os.path.join(make_tiny.OUT, "eval.jsonl"))
  ds = PairDataset(records[:10], tok, 32)
  batches = list(eval_batches(ds, 4))
  assert [b.tokens.shape[0] for b in batches] == [4, 4, 4]
  weights = np.concatenate([b.weight for b in batches])
  assert weights.tolist() == [1.0] * 10 + [0.0] * 2
  got = np.concatenate([b.tokens for b in batches])[:10]
  np.testing.assert_array_equal(got, ds.tokens)
  assert not batches[-1].valid[2:].any()


def test_tiny_dataset_holds_out_template_category_combinations():
  def load(split):
    with open(os.path.join(make_tiny.OUT, f"{split}.jsonl")) as f:
      return [json.loads(line) for line in f]
  train, evals = load("train"), load("eval")
  assert len(train) == make_tiny.N_TRAIN and len(evals) == make_tiny.N_EVAL
  held = {make_tiny.prompt_text(make_tiny.held_out_template(i), c)
          for i, c in enumerate(make_tiny.CATEGORIES)}
  assert not {r["prompt"] for r in train} & held
  assert {r["prompt"] for r in evals} == held
  triples = lambda rows: {(r["prompt"], r["chosen"], r["rejected"]) for r in rows}
  assert not triples(train) & triples(evals)
  # Chosen names an item of the asked category; rejected, of another one.
  item_cat = {i: c for c, items in make_tiny.CATEGORIES.items() for i in items.split()}
  word = lambda s: s.rstrip(".?").split()[-1]
  for r in train + evals:
    cat = next(c for c in make_tiny.CATEGORIES if c in r["prompt"])
    assert item_cat[word(r["chosen"])] == cat != item_cat[word(r["rejected"])]
