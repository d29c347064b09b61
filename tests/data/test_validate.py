"""`jaxpref-data validate`: counts, every bad record, warnings, exit codes; same verdicts as
the training reader."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli_util import ROOT, env
from jaxpref.data import DataError, PairDataset, Tokenizer, make_tiny, read_pairs
from jaxpref.data.cli import main
from jaxpref.data.validate import histogram, validate

TOKENIZER = os.path.join(make_tiny.OUT, "tokenizer.model")
TOK = Tokenizer.load(TOKENIZER)
GOOD = '{"prompt": "name a fruit.", "chosen": "apple.", "rejected": "dog."}'
LONG = ('{"prompt": "name a fruit.", "chosen": "apple apple apple apple apple apple.", '
        '"rejected": "dog."}')
LINES = [
    GOOD,
    '{"prompt": "name a fruit.", "chosen": "apple.", "rejected": ',  # 2: bad JSON
    '{"prompt": "name a fruit.", "rejected": "dog."}',  # 3: missing field
    b'{"prompt": "name a fruit\xff.", "chosen": "a.", "rejected": "b."}',  # 4: non-UTF-8
    '{"prompt": "name a fruit.", "chosen": " ", "rejected": "dog."}',  # 5: empty response
    '{"prompt": "name a fruit.", "chosen": "pear.", "rejected": "pear."}',  # 6: identical
    GOOD,  # 7: duplicate of 1
    LONG,  # 8: over-length at max_len=12
    '{"prompt": "name a fruit.", "chosen": 3, "rejected": "dog."}',  # 9: wrong type
    '',  # blank lines are not records
    '{"chosen": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "b."}], '
    '"rejected": [{"role": "user", "content": "c?"}, {"role": "assistant", "content": "d."}]}',
]


def write(tmp_path, lines, name="d.jsonl"):
  path = tmp_path / name
  path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
  return str(path)


def test_counts_every_bad_record_and_warnings(tmp_path):
  path = write(tmp_path, LINES)
  v = validate(path, tok=TOK, max_len=12)
  assert (v.n_total, v.n_valid) == (10, 4)
  assert v.bad == {"invalid JSON": 1, "missing field 'chosen'": 1, "invalid UTF-8": 1,
                   "field 'chosen' is empty": 1, "field 'chosen' is not a string": 1,
                   "chat prompts differ": 1}
  assert v.errors == [
      f"{path}:2: invalid JSON (Expecting value at column 61); JSONL holds one complete JSON "
      "object per line",
      f"{path}:3: field 'chosen' is missing",
      f"{path}:4: bytes are not valid UTF-8 (byte 24: b'\\xff')",
      f"{path}:5: field 'chosen' is empty",
      f"{path}:9: field 'chosen' must be a string, got int",
      f"{path}:11: fields 'chosen'/'rejected' do not share a prompt: the conversations differ at "
      "message 0 (a pair is one conversation with two final assistant turns)",
  ]
  assert (v.n_duplicates, v.n_identical, v.n_over_length) == (1, 1, 1)
  assert v.warnings == [
      f"{path}:6: fields 'chosen'/'rejected' are identical (no preference to learn)",
      f"{path}:7: duplicate: the same prompt and responses as {path}:1",
      f"{path}:8: field 'chosen' is over --max_len=12 after tokenization (BOS + 6 prompt + 7 "
      "response tokens + EOS = 15); training truncates it",
  ]
  assert not v.ok and v.fatal is None
  assert v.prompt_lengths == [6, 6, 6, 6] and v.unit == "tokens"


def test_validator_and_reader_agree(tmp_path):
  path = write(tmp_path, LINES)
  v = validate(path)
  with pytest.raises(DataError) as e:
    read_pairs(path)
  assert str(e.value) == v.errors[0] + " (pass --skip_invalid_records to skip and count such records)"
  records, report = read_pairs(path, skip_invalid=True)
  assert report.reasons == v.bad and report.n_read == v.n_valid == len(records)
  assert report.first_errors == v.errors[:5]
  for max_len in (12, 16, 24):  # over-length is the pairs that training truncates
    assert validate(path, tok=TOK, max_len=max_len).n_over_length == \
        PairDataset(records, TOK, max_len).n_truncated


def test_cli_output_and_exit_codes(tmp_path, capsys):
  path = write(tmp_path, LINES)
  assert main(["validate", path, f"--tokenizer={TOKENIZER}", "--max_len=12"]) == 1
  out = capsys.readouterr().out
  assert out.startswith(f"{path}: 10 records (pairs): 4 valid, 6 bad\n")
  assert f"\n  {path}:4: bytes are not valid UTF-8" in out
  assert "duplicates: 1; chosen identical to rejected: 1; over-length: 1 (over --max_len=12" in out
  assert "prompt length (tokens): min 6, median 6, p95 6, max 6" in out
  assert f"FAIL: training would stop at {path}:2 (--skip_invalid_records would skip the 6" in out

  clean = write(tmp_path, [GOOD, LONG, '{"prompt": "a.", "chosen": "b.", "rejected": "b."}'],
                "clean.jsonl")
  assert main(["validate", clean]) == 0  # warnings do not fail the check
  out = capsys.readouterr().out
  assert "chosen identical to rejected: 1; over-length: not checked" in out
  assert "response length (characters): min 2, median 4, p95 28, max 36" in out
  assert out.rstrip().endswith("OK: training reads all 3 records")


def test_file_wide_problems_fail(tmp_path, capsys):
  mixed = write(tmp_path, [GOOD[:-1] + ', "chosen_score": 1, "rejected_score": 0}', GOOD])
  v = validate(mixed)
  assert not v.errors and not v.ok
  assert v.fatal.startswith(f"{mixed}:2: fields 'chosen_score'/'rejected_score' are missing")
  assert main(["validate", str(tmp_path / "nope.jsonl")]) == 1
  assert "FAIL: training would stop: " in capsys.readouterr().out
  assert validate(write(tmp_path, [""], "empty.jsonl")).fatal.endswith(
      "empty.jsonl: no valid records (0 skipped)")


def test_usage_errors_exit_2(tmp_path, capsys):
  path = write(tmp_path, [GOOD])
  assert main(["validate", path, "--fields=answer:response"]) == 2
  assert "--fields: 'answer' is not a record field" in capsys.readouterr().err
  assert main(["validate", path, "--tokenizer=/no/such.model"]) == 2
  assert "--tokenizer: no sentencepiece model" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    main(["validate", path, "--format=lists"])
  assert e.value.code == 2


def test_remapped_sharded_parquet(tmp_path, capsys):
  d = tmp_path / "data"
  d.mkdir()
  rows = [dict(question="name a fruit.", good="apple.", bad="dog."),
          dict(question="name a fruit.", good="apple.")]
  pq.write_table(pa.Table.from_pylist(rows[:1]), str(d / "train-0.parquet"))
  pq.write_table(pa.Table.from_pylist(rows), str(d / "train-1.parquet"))
  fields = "--fields=prompt:question,chosen:good,rejected:bad"
  assert main(["validate", str(d / "train-*.parquet"), fields]) == 1
  out = capsys.readouterr().out
  assert f"  {d}/train-1.parquet:2: field 'bad' is missing\n" in out
  assert f"{d}/train-1.parquet:1: duplicate: the same prompt and responses as {d}/train-0.parquet:1" in out
  assert "3 records (pairs): 2 valid, 1 bad" in out


def test_ranked_and_unpaired(tmp_path):
  ranked = write(tmp_path, [json.dumps(dict(prompt="p.", completions=[
      dict(response="a.", score=1), dict(response="b.", score=0)])),
      json.dumps(dict(prompt="p.", completions=[dict(response="a.", score=1)]))], "r.jsonl")
  v = validate(ranked, "ranked")
  assert v.bad == {"fewer than 2 completions": 1} and v.response_lengths == [2, 2]
  unpaired = write(tmp_path, ['{"prompt": "p.", "completion": "a.", "label": true}',
                              '{"prompt": "p.", "completion": "a.", "label": "yes"}'], "u.jsonl")
  v = validate(unpaired, "unpaired")
  assert v.errors == [f"{unpaired}:2: field 'label' must be true/false (or 1/0), got 'yes'"]


def test_histogram():
  lines = histogram([1, 2, 2, 3, 10], "len", bins=3, width=4)  # bins 4 wide: 1-4, 5-8, 9-12
  assert lines[0] == "len: min 1, median 2, p95 8, max 10"
  assert [ln.split()[:4] for ln in lines[1:]] == [["1", "-", "4", "4"], ["5", "-", "8", "0"],
                                                   ["9", "-", "12", "1"]]
  assert lines[1].endswith(" ####") and lines[3].endswith(" #")
  assert histogram([7, 7], "len")[1:] == ["       7 - 7            2 " + "#" * 40]
  assert histogram([], "len") == ["len: no records"]


def test_unknown_tokens_are_counted(tmp_path):
  path = write(tmp_path, ['{"prompt": "Name a Fruit.", "chosen": "APPLE.", "rejected": "dog."}'])
  v = validate(path, tok=TOK)
  ids = [x for t in ("Name a Fruit.", "APPLE.", "dog.") for x in TOK.encode(t)]
  assert v.n_tokens == len(ids) and v.n_unk == ids.count(TOK.unk_id) > 0
  assert f"unknown tokens: {v.n_unk} of {v.n_tokens}" in v.render()


def test_module_runs_as_a_command(tmp_path):
  path = write(tmp_path, [GOOD, '{"prompt": "a"}'])
  proc = subprocess.run([sys.executable, "-m", "jaxpref.data.cli", "validate", path], cwd=ROOT,
                        env=env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr
  assert f"{path}:2: field 'chosen' is missing" in proc.stdout
