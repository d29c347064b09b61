"""JSONL reading (errors name file, line and field; skipped records counted exactly), the
resumable batch order, eval batching, and the tiny dataset's held-out split."""

import collections
import json
import os

import numpy as np
import pytest

from jaxpref.data import DataError, PairDataset, PairRecord, Tokenizer, batch_indices
from jaxpref.data import eval_batches, make_tiny, pairs, read_pairs

GOOD = '{"prompt": "p", "chosen": "c", "rejected": "r"}'
# case: (line, text the message must contain; None where no field is involved)
BAD = {
    "invalid JSON": ('{"prompt": "p", "chosen": ', "invalid JSON"),
    "missing": ('{"prompt": "p", "rejected": "r"}', "field 'chosen' is missing"),
    "missing prompt": ('{"chosen": "c", "rejected": "r"}', "field 'prompt' is missing"),
    "empty": ('{"prompt": "p", "chosen": "", "rejected": "r"}', "field 'chosen' is empty"),
    "whitespace": ('{"prompt": "p", "chosen": "c", "rejected": " \\n\\t"}',
                   "field 'rejected' is empty"),
    "empty prompt": ('{"prompt": " ", "chosen": "c", "rejected": "r"}', "field 'prompt' is empty"),
    "type": ('{"prompt": "p", "chosen": 3, "rejected": "r"}', "field 'chosen' must be a string"),
    "null": ('{"prompt": "p", "chosen": "c", "rejected": null}',
             "field 'rejected' must be a string, got NoneType"),
    "object": ('["p", "c", "r"]', "expected a JSON object, got list"),
    "surrogate": ('{"prompt": "p", "chosen": "a\\ud800", "rejected": "r"}',
                  "field 'chosen' contains an unpaired surrogate"),
}


def write(tmp_path, lines, name="data.jsonl"):
  path = tmp_path / name
  path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
  return str(path)


@pytest.mark.parametrize("case", sorted(BAD))
def test_error_names_file_line_and_field(tmp_path, case):
  line, needle = BAD[case]
  path = write(tmp_path, [GOOD, "", line, GOOD])  # the blank line 2 still counts as a line
  with pytest.raises(DataError) as e:
    read_pairs(path)
  assert str(e.value).startswith(f"{path}:3: ") and needle in str(e.value)


def test_non_utf8_bytes(tmp_path):
  path = write(tmp_path, [GOOD, b'{"prompt": "p\xff", "chosen": "c", "rejected": "r"}'])
  with pytest.raises(DataError, match=r"data.jsonl:2: bytes are not valid UTF-8 \(byte 13"):
    read_pairs(path)


def test_tolerated_formatting(tmp_path):
  # A BOM, CRLF line endings, whitespace-only lines, extra fields, unicode text, no final
  # newline and U+2028 inside a string (a line break for str.splitlines, not for JSONL).
  path = tmp_path / "data.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n  \r\n\t\n"
                   + b'{"prompt": "caf\xc3\xa9\xe2\x80\xa8?", "chosen": "c", "rejected": "r", '
                   + b'"id": 7}')
  records, report = read_pairs(str(path))
  assert records == [PairRecord("p", "c", "r"), PairRecord("caf\u00e9\u2028?", "c", "r")]
  assert (report.n_read, report.n_skipped) == (2, 0)
  assert report.summary() == f"{path}: read 2 records, skipped 0"


def test_skip_invalid_counts_every_reason(tmp_path):
  lines = [GOOD, BAD["missing"][0], "", BAD["missing"][0], b"\xff\xfe", BAD["empty"][0],
           BAD["object"][0], BAD["invalid JSON"][0], BAD["type"][0], GOOD]
  records, report = read_pairs(write(tmp_path, lines), skip_invalid=True)
  assert len(records) == report.n_read == 2
  assert report.n_skipped == 7
  assert report.reasons == {"missing field 'chosen'": 2, "invalid UTF-8": 1,
                            "field 'chosen' is empty": 1, "record is not a JSON object": 1,
                            "invalid JSON": 1, "field 'chosen' is not a string": 1}
  assert len(report.first_errors) == 5  # capped
  assert [e.split(": ")[0].rsplit(":", 1)[1] for e in report.first_errors] == \
      ["2", "4", "5", "6", "7"]
  assert report.first_errors[0].endswith("data.jsonl:2: field 'chosen' is missing")
  summary = report.summary()
  assert "read 2 records, skipped 7" in summary and "2x missing field 'chosen'" in summary
  assert "first: " in summary and "data.jsonl:2:" in summary


def test_missing_file_and_no_records(tmp_path):
  with pytest.raises(DataError, match="nope.jsonl: no such file"):
    read_pairs(str(tmp_path / "nope.jsonl"))
  with pytest.raises(DataError, match="no valid records .1 skipped; first: .*:1: field 'chosen'"):
    read_pairs(write(tmp_path, [BAD["missing"][0]]), skip_invalid=True)
  with pytest.raises(DataError, match="empty.jsonl: no valid records"):
    read_pairs(write(tmp_path, ["", "  "], name="empty.jsonl"))


def test_batch_indices_cover_each_epoch_and_span_epoch_boundaries():
  n, bs = 10, 4
  stream = np.concatenate([batch_indices(n, bs, s, seed=3) for s in range(10)])  # 4 epochs
  for e in range(4):
    assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
  assert not np.array_equal(stream[:n], stream[n:2 * n])  # a fresh order each epoch
  # Batch 2 holds positions 8..11: the end of epoch 0 and the start of epoch 1.
  np.testing.assert_array_equal(batch_indices(n, bs, 2, seed=3), stream[8:12])
  # A batch larger than the data spans several epochs, still each a permutation.
  big = batch_indices(3, 7, 0, seed=0)
  assert sorted(big[:3]) == sorted(big[3:6]) == [0, 1, 2]
  assert not np.array_equal(batch_indices(n, bs, 7, seed=4), stream[28:32])


def test_batch_indices_are_a_pure_function_of_seed_and_step():
  expected = [batch_indices(50, 8, s, seed=11) for s in range(20)]
  pairs._epoch_permutation.cache_clear()  # as in a freshly resumed process
  np.testing.assert_array_equal(batch_indices(50, 8, 17, seed=11), expected[17])
  for s in reversed(range(20)):
    np.testing.assert_array_equal(batch_indices(50, 8, s, seed=11), expected[s])
  # The documented definition, independent of the implementation.
  concat = np.concatenate([np.random.default_rng([11, e]).permutation(50) for e in range(4)])
  np.testing.assert_array_equal(np.concatenate(expected), concat[:160])
  with pytest.raises(ValueError, match="batch_size > 0"):
    batch_indices(50, 0, 0, seed=0)
  with pytest.raises(ValueError, match="n > 0"):
    batch_indices(0, 8, 0, seed=0)


@pytest.fixture(scope="module")
def small_ds():
  tok = Tokenizer.load(os.path.join(make_tiny.OUT, "tokenizer.model"))
  records, _ = read_pairs(os.path.join(make_tiny.OUT, "eval.jsonl"))
  return PairDataset(records[:10], tok, 32)


@pytest.mark.parametrize("batch_size,sizes", [(4, [4, 4, 4]), (5, [5, 5]), (16, [16])])
def test_eval_batches_cover_every_record_once(small_ds, batch_size, sizes):
  batches = list(eval_batches(small_ds, batch_size))
  assert [b.tokens.shape[0] for b in batches] == sizes
  weights = np.concatenate([b.weight for b in batches])
  valid = np.concatenate([b.valid for b in batches])
  n_pad = sum(sizes) - 10
  assert weights.tolist() == [1.0] * 10 + [0.0] * n_pad
  assert valid[:10].all() and not valid[10:].any()
  for name in ("tokens", "loss_mask", "segment_ids"):
    got = np.concatenate([getattr(b, name) for b in batches])[:10]
    np.testing.assert_array_equal(got, getattr(small_ds, name))


def load_split(split):
  with open(os.path.join(make_tiny.OUT, f"{split}.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_tiny_dataset_holds_out_template_category_combinations():
  train, evals = load_split("train"), load_split("eval")
  assert len(train) == make_tiny.N_TRAIN and len(evals) == make_tiny.N_EVAL
  cats = list(make_tiny.CATEGORIES)
  held = {make_tiny.prompt_text(make_tiny.held_out_template(i), c) for i, c in enumerate(cats)}
  all_prompts = {make_tiny.prompt_text(t, c) for t in range(len(make_tiny.PROMPTS)) for c in cats}
  assert {r["prompt"] for r in train} == all_prompts - held  # every other combination is seen
  assert {r["prompt"] for r in evals} == held and len(held) == len(cats)
  triples = lambda rows: {(r["prompt"], r["chosen"], r["rejected"]) for r in rows}
  assert not triples(train) & triples(evals)


def test_tiny_dataset_pattern_needs_prompt_and_item_together():
  train, evals = load_split("train"), load_split("eval")
  item_cat = {i: c for c, items in make_tiny.CATEGORIES.items() for i in items.split()}
  word = lambda s: s.rstrip(".?").split()[-1]
  template = lambda s: s.rsplit(word(s), 1)[0]
  for r in train + evals:
    cat = next(c for c in make_tiny.CATEGORIES if f" {c}" in r["prompt"])
    assert item_cat[word(r["chosen"])] == cat != item_cat[word(r["rejected"])]
    assert template(r["chosen"]) == template(r["rejected"])  # same response template
  # Every item is chosen (for its own category) and rejected (for others) in training.
  chosen = collections.Counter(word(r["chosen"]) for r in train)
  rejected = collections.Counter(word(r["rejected"]) for r in train)
  assert set(chosen) == set(rejected) == set(item_cat)
