"""`jaxpref-data prepare`: stored groups equal the in-memory datasets, stats, errors, re-runs."""

import json
import os

import numpy as np
import pytest

from jaxpref.data import (PairDataset, RankedDataset, Tokenizer, UnpairedDataset, read_pairs,
                          read_ranked, read_unpaired)
from jaxpref.data import cli, curriculum, grain_source, packing, prepare

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "jaxpref",
                    "data", "tiny")
TOK = os.path.join(TINY, "tokenizer.model")


def _prepare(tmp_path, path, *flags, name="out"):
  out = str(tmp_path / name)
  rc = cli.main(["prepare", path, f"--tokenizer={TOK}", f"--out={out}", *flags])
  return rc, out


def _assert_same(prepared, ds):
  got = prepared.batch(np.arange(prepared.n))
  want = ds.batch(np.arange(ds.n))
  assert prepared.n == ds.n
  for name in ("tokens", "loss_mask", "segment_ids", "valid", "weight", "scores", "label",
               "label_smoothing"):
    a, b = getattr(got, name), getattr(want, name)
    assert (a is None) == (b is None), name
    if a is not None:
      assert a.dtype == b.dtype and a.shape == b.shape, name
      np.testing.assert_array_equal(a, b, err_msg=name)


def _assert_group_values(out, ds, fields):
  """groups.npz holds the lengths and curriculum values that training plans with."""
  info = grain_source.read_info(out)
  file = os.path.join(out, grain_source.GROUPS_FILE)
  assert info["groups_sha256"] == grain_source.file_sha256(file)
  assert info["curriculum_fields"] == fields
  assert info["max_response_length"] == int(ds.loss_mask.sum(-1).max())
  with np.load(file) as g:
    assert sorted(g.files) == sorted(["lengths"] + [f"curriculum_{f}" for f in fields])
    np.testing.assert_array_equal(g["lengths"], packing.member_lengths(ds.segment_ids))
    for field in fields:
      np.testing.assert_array_equal(g[f"curriculum_{field}"], curriculum.field_values(ds, field))


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.load(TOK)


def test_tiny_pairs_equal_the_in_memory_dataset(tmp_path, tok, capsys):
  # max_len 16 truncates some tiny pairs, so the truncation path is compared too.
  rc, out = _prepare(tmp_path, f"{TINY}/train.jsonl", "--max_len=16")
  assert rc == 0
  records, _ = read_pairs(f"{TINY}/train.jsonl")
  ds = PairDataset(records, tok, 16)
  assert ds.n_truncated > 0
  prepared = grain_source.PreparedDataset(out)
  _assert_same(prepared, ds)
  info = grain_source.read_info(out)
  lengths = ds.segment_ids.sum(-1)
  assert info["records_read"] == 2000 and info["records_skipped"] == 0
  assert info["groups"] == 2000 and info["truncated_groups"] == ds.n_truncated
  assert info["max_length"] == lengths.max() == 16
  assert info["tokens"] == ds.n_tokens and info["unk_tokens"] == ds.n_unk
  assert info["tokenizer"]["sha256"] == grain_source.file_sha256(TOK)
  edges, counts = info["length_histogram"]["edges"], info["length_histogram"]["counts"]
  np.testing.assert_array_equal(counts, np.histogram(lengths.ravel(), edges)[0])
  assert sum(counts) == 4000
  # The same stats are in the TFDS dataset info.
  meta = json.load(open(os.path.join(grain_source.dataset_dir(out), "metadata.json")))
  assert meta["stats"]["truncated_groups"] == ds.n_truncated
  out_text = capsys.readouterr().out
  assert f"truncated to --max_len=16: {ds.n_truncated} groups" in out_text
  _assert_group_values(out, ds, ["length", "weight"])
  assert "needs scores in the records" in info["curriculum_missing"]["score_gap"]
  assert ("curriculum values stored (groups.npz): length, weight; not score_gap, label_smoothing"
          in out_text)


def test_ranked_and_unpaired_equal_the_in_memory_datasets(tmp_path, tok):
  records, _ = read_ranked(f"{TINY}/ranked_eval.jsonl")  # 3 responses per record
  for k in (2, 4):  # responses dropped; a missing member (all zeros, invalid)
    rc, out = _prepare(tmp_path, f"{TINY}/ranked_eval.jsonl", "--format=ranked", "--max_len=24",
                       f"--group_size={k}", name=f"ranked{k}")
    assert rc == 0
    ds = RankedDataset(records, tok, 24, k)
    _assert_same(grain_source.PreparedDataset(out), ds)
    assert grain_source.read_info(out)["dropped_responses"] == ds.n_dropped_responses
    _assert_group_values(out, ds, ["length", "score_gap", "weight"])
  assert ds.n_dropped_responses == 0 and not ds.members[:, 3].any()

  # Unpaired: 2501 records over 3 chunks, so the KL completion (half the set away) crosses
  # chunk boundaries; an odd count makes the shift uneven.
  src = tmp_path / "unpaired.jsonl"
  lines = open(f"{TINY}/train.jsonl").read().splitlines() * 2
  with open(src, "w") as f:
    for i, line in enumerate(lines[:prepare.CHUNK * 2 + 453]):
      r = json.loads(line)
      f.write(json.dumps({"prompt": r["prompt"], "completion": r["chosen" if i % 3 else "rejected"],
                          "label": bool(i % 3), "weight": 0.5 + i % 2}) + "\n")
  rc, out = _prepare(tmp_path, str(src), "--format=unpaired", "--max_len=16", name="unpaired")
  assert rc == 0
  records, _ = read_unpaired(str(src))
  ds = UnpairedDataset(records, tok, 16)
  _assert_same(grain_source.PreparedDataset(out), ds)
  assert grain_source.read_info(out)["desirable"] == ds.n_desirable
  _assert_group_values(out, ds, ["length", "weight"])  # 3 chunks, concatenated


def _with_bad_records(tmp_path):
  lines = open(f"{TINY}/train.jsonl").read().splitlines()[:6]
  lines[2] = json.dumps({"prompt": "a", "chosen": "b"})
  lines[4] = '{"prompt": "a", '
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_bad_record_stops_with_file_line_field(tmp_path, capsys):
  path = _with_bad_records(tmp_path)
  rc, out = _prepare(tmp_path, path, "--max_len=32")
  assert rc == 1
  err = capsys.readouterr().err
  assert f"{path}:3: field 'rejected' is missing" in err and "--skip_invalid_records" in err
  assert not grain_source.is_prepared(out)


def test_skip_invalid_counts_by_reason(tmp_path, tok):
  path = _with_bad_records(tmp_path)
  rc, out = _prepare(tmp_path, path, "--max_len=32", "--skip_invalid_records")
  assert rc == 0
  info = grain_source.read_info(out)
  assert info["records_read"] == 4 and info["records_skipped"] == 2 and info["groups"] == 4
  assert info["skipped_by_reason"] == {"missing field 'rejected'": 1, "invalid JSON": 1}
  assert info["first_errors"][0].startswith(f"{path}:3:")
  records, _ = read_pairs(path, skip_invalid=True)
  _assert_same(grain_source.PreparedDataset(out), PairDataset(records, tok, 32))


def test_rerun_replaces_and_foreign_folder_is_refused(tmp_path, capsys):
  path = _with_bad_records(tmp_path)
  rc, out = _prepare(tmp_path, f"{TINY}/eval.jsonl", "--max_len=32")
  assert rc == 0 and grain_source.read_info(out)["groups"] == 300
  rc, out = _prepare(tmp_path, path, "--max_len=20", "--skip_invalid_records")
  assert rc == 0
  info = grain_source.read_info(out)
  assert info["groups"] == 4 and info["max_len"] == 20
  assert grain_source.PreparedDataset(out).n == 4
  assert grain_source.PreparedDataset(out).stored_lengths()[1].shape == (4, 2)  # groups.npz anew
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("mine")
  rc, _ = _prepare(tmp_path, f"{TINY}/eval.jsonl", "--max_len=32", name="other")
  assert rc == 2 and "notes.txt" in capsys.readouterr().err
  assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
