"""Issue 19, numbers beyond float32: rejected by the reader and `jaxpref-data validate` alike
with `file:line: field` messages, skipped and counted with --skip_invalid_records, never an
OverflowError; and validate fails when --truncation=drop would drop every group."""

import json
import os
import subprocess
import sys

import pytest

from jaxpref.data import DataError, read_pairs, read_ranked, read_unpaired
from jaxpref.data import make_tiny
from jaxpref.data import validate as validate_lib
from jaxpref.data.cli import main as data_cli

TINY = make_tiny.OUT
TOK = f"{TINY}/tokenizer.model"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HUGE = "9" * 400
PAIR = '{"prompt": "name a fruit.", "chosen": "apple.", "rejected": "dog."'

BAD_PAIRS = {  # raw JSON tail of a pair record -> the field named in the message
    "weight 1e308": (', "weight": 1e308}', "weight"),
    "weight 400 digits": (f', "weight": {HUGE}}}', "weight"),
    "score 400 digits": (f', "chosen_score": 1, "rejected_score": -{HUGE}}}', "rejected_score"),
    "score 1e39": (', "chosen_score": 1e39, "rejected_score": 0}', "chosen_score"),
    "user 400 digits": (f', "user": {HUGE}}}', "user"),
    "ref logps 400 digits": (f', "ref_chosen_logps": -{HUGE}, "ref_rejected_logps": -1}}',
                             "ref_chosen_logps"),
    "source logps 400 digits": (f', "source_logps": [[-{HUGE}, -1]]}}', "source_logps[0][0]"),
}


def _file(tmp_path, *lines, name="data.jsonl"):
  path = tmp_path / name
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


@pytest.mark.parametrize("case", sorted(BAD_PAIRS))
def test_reader_and_validator_reject_with_file_line_field(tmp_path, case):
  tail, field = BAD_PAIRS[case]
  path = _file(tmp_path, PAIR + "}", PAIR + tail, PAIR + "}")
  with pytest.raises(DataError) as e:
    read_pairs(path)
  assert f"{path}:2: field '{field}'" in str(e.value) and "range" in str(e.value)
  records, report = read_pairs(path, skip_invalid=True)
  assert len(records) == report.n_read == 2 and report.n_skipped == 1
  v = validate_lib.validate(path)
  assert not v.ok and v.errors[0].startswith(f"{path}:2: field '{field}'")
  assert v.errors[0] == str(e.value).split(" (pass --skip_invalid_records")[0]  # one message


def test_huge_integer_message_gives_its_size_not_its_digits(tmp_path):
  path = _file(tmp_path, PAIR + f', "weight": {HUGE}}}')
  with pytest.raises(DataError, match="an integer of 400 digits") as e:
    read_pairs(path)
  assert HUGE not in str(e.value)


def test_ranked_unpaired_and_curriculum_numbers(tmp_path):
  ranked = _file(tmp_path, json.dumps({"prompt": "p", "completions": [
      {"response": "a", "score": 1}, {"response": "b", "score": 10**400}]}), name="r.jsonl")
  with pytest.raises(DataError, match=r"r.jsonl:1: field 'completions\[1\].score'"):
    read_ranked(ranked)
  unpaired = _file(tmp_path, json.dumps({"prompt": "p", "completion": "c", "label": True,
                                         "weight": 1e300}), name="u.jsonl")
  with pytest.raises(DataError, match="u.jsonl:1: field 'weight'"):
    read_unpaired(unpaired)
  keep = _file(tmp_path, PAIR + f', "difficulty": {HUGE}}}', name="k.jsonl")
  with pytest.raises(DataError, match="k.jsonl:1: field 'difficulty'"):
    read_pairs(keep, keep="difficulty")


def test_validate_cli_no_traceback_and_exit_1(tmp_path, capsys):
  path = _file(tmp_path, PAIR + "}", PAIR + f', "weight": {HUGE}}}')
  assert data_cli(["validate", path]) == 1
  out = capsys.readouterr().out
  assert f"{path}:2: field 'weight' is an integer of 400 digits" in out and "FAIL" in out


def test_validate_subprocess_has_no_traceback(tmp_path):
  path = _file(tmp_path, PAIR + f', "weight": {HUGE}, "chosen_score": 1e308, '
               '"rejected_score": 0}')
  proc = subprocess.run([sys.executable, "-m", "jaxpref.data.cli", "validate", path],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout
  assert "field 'weight'" in proc.stdout


def test_validate_fails_when_drop_would_drop_every_group(tmp_path, capsys):
  path = f"{TINY}/eval.jsonl"
  args = ["validate", path, f"--tokenizer={TOK}", "--max_len=4", "--truncation=drop"]
  assert data_cli(args) == 1
  out = capsys.readouterr().out
  assert "FAIL: training would stop:" in out and "--truncation=drop would drop them all" in out
  # Cut instead of dropped, or with room for some groups: training reads them.
  assert data_cli(["validate", path, f"--tokenizer={TOK}", "--max_len=4"]) == 0
  assert data_cli(["validate", path, f"--tokenizer={TOK}", "--max_len=24",
                   "--truncation=drop"]) == 0
