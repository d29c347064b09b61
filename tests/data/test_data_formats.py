"""Record sources (JSONL, Parquet, folders, globs), chat layouts and field remapping."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli_util import ROOT, train
from jaxpref.data import DataError, PairRecord, Tokenizer, chat, make_tiny
from jaxpref.data import read_pairs, read_ranked, read_unpaired
from jaxpref.data.records import FIELD_NAMES, parse_fields
from jaxpref.train import setup as setup_lib
from jaxpref.train.config import DataConfig, RunConfig

TOK = Tokenizer.load(os.path.join(make_tiny.OUT, "tokenizer.model"))


def pair(i, **extra):
  return dict(prompt=f"name fruit {i}.", chosen="apple.", rejected="dog.", **extra)


def write_jsonl(path, objs):
  path.write_text("".join(json.dumps(o) + "\n" for o in objs))
  return str(path)


def write_parquet(path, objs):
  pq.write_table(pa.Table.from_pylist(objs), str(path))
  return str(path)


# --- Parquet, folders, globs ----------------------------------------------------------

def test_parquet_reads_like_jsonl(tmp_path):
  objs = [pair(0, weight=2.0), pair(1, weight=0.5)]
  from_parquet, report = read_pairs(write_parquet(tmp_path / "d.parquet", objs))
  assert from_parquet == read_pairs(write_jsonl(tmp_path / "d.jsonl", objs))[0]
  assert from_parquet[0] == PairRecord("name fruit 0.", "apple.", "dog.", weight=2.0)
  assert report.summary() == f"{tmp_path / 'd.parquet'}: read 2 records, skipped 0"


def test_parquet_null_is_an_absent_field(tmp_path):
  # A column is in every row; a null is how a row leaves the optional field out.
  records, _ = read_pairs(write_parquet(tmp_path / "d.parquet", [pair(0, weight=3.0),
                                                                 pair(1, weight=None)]))
  assert [r.weight for r in records] == [3.0, 1.0]
  with pytest.raises(DataError, match=r"d2.parquet:2: field 'chosen' is missing"):
    read_pairs(write_parquet(tmp_path / "d2.parquet", [pair(0), dict(pair(1), chosen=None)]))


def shards(tmp_path):
  """Three shards written out of order; the middle one's row 2 has an empty response."""
  d = tmp_path / "data"
  d.mkdir()
  write_parquet(d / "train-00002.parquet", [pair(4), pair(5)])
  write_parquet(d / "train-00000.parquet", [pair(0), pair(1)])
  write_parquet(d / "train-00001.parquet", [pair(2), dict(pair(3), rejected="  ")])
  return d


def test_shards_by_glob_and_folder_in_sorted_order_errors_name_shard_and_row(tmp_path):
  d = shards(tmp_path)
  bad = d / "train-00001.parquet"
  for path in (str(d / "train-*.parquet"), str(d)):
    with pytest.raises(DataError) as e:
      read_pairs(path)
    assert str(e.value).startswith(f"{bad}:2: field 'rejected' is empty")
    records, report = read_pairs(path, skip_invalid=True)
    assert [r.prompt for r in records] == [f"name fruit {i}." for i in (0, 1, 2, 4, 5)]
    assert (report.n_read, report.n_skipped, len(report.files)) == (5, 1, 3)
    assert report.first_errors == [f"{bad}:2: field 'rejected' is empty"]
    assert "(3 files)" in report.summary()


def test_folder_mixes_jsonl_and_parquet_and_reports_other_files(tmp_path):
  write_jsonl(tmp_path / "a.jsonl", [pair(0)])
  write_parquet(tmp_path / "b.parquet", [pair(1)])
  (tmp_path / "README.md").write_text("not data")
  records, report = read_pairs(str(tmp_path))
  assert [r.prompt for r in records] == ["name fruit 0.", "name fruit 1."]
  assert report.ignored == ["README.md"]
  assert "1 files in the folder not read (not .jsonl/.parquet: README.md)" in report.summary()


def test_missing_sources_are_named(tmp_path):
  with pytest.raises(DataError, match=r"train-\*.parquet: no files match this pattern"):
    read_pairs(str(tmp_path / "train-*.parquet"))
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(DataError, match=r"a folder with no .jsonl or .parquet files \(it holds notes"):
    read_pairs(str(tmp_path))
  (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
  with pytest.raises(DataError, match=r"broken.parquet: not a readable Parquet file"):
    read_pairs(str(tmp_path / "broken.parquet"))
  # A good footer over a damaged data page fails while reading, still naming the file.
  path = write_parquet(tmp_path / "damaged.parquet", [pair(i) for i in range(100)])
  data = bytearray(open(path, "rb").read())
  data[40:120] = b"\xff" * 80
  open(path, "wb").write(bytes(data))
  with pytest.raises(DataError, match=r"damaged.parquet: not a readable Parquet file \("):
    read_pairs(path)


def test_parquet_bytes_column_is_a_type_error(tmp_path):
  path = write_parquet(tmp_path / "d.parquet", [dict(pair(0), chosen=b"apple\xff")])
  with pytest.raises(DataError, match=r"d.parquet:1: field 'chosen' must be a string, got bytes"):
    read_pairs(path)


def test_ranked_and_unpaired_from_parquet(tmp_path):
  ranked = [dict(prompt="name a fruit.", completions=[dict(response="apple.", score=2.0),
                                                     dict(response="dog.", score=0.5)])]
  records, _ = read_ranked(write_parquet(tmp_path / "r.parquet", ranked))
  assert records[0].responses == ("apple.", "dog.") and records[0].scores == (2.0, 0.5)
  unpaired = [dict(prompt="name a fruit.", completion="apple.", label=True)]
  assert read_unpaired(write_parquet(tmp_path / "u.parquet", unpaired))[0][0].label is True


# --- chat layouts ------------------------------------------------------------------------

def msg(role, content):
  return {"role": role, "content": content}


def test_ultrafeedback_binarized_layout():
  # prompt string + message lists that repeat it, as in HuggingFaceH4/ultrafeedback_binarized
  obj = dict(prompt="name a fruit.", chosen=[msg("user", "name a fruit."), msg("assistant", "apple.")],
             rejected=[msg("user", "name a fruit."), msg("assistant", "dog.")])
  out, problem = chat.to_pair(obj)
  assert problem is None
  assert (out["prompt"], out["chosen"], out["rejected"]) == \
      ("User: name a fruit.\nAssistant:", "apple.", "dog.")


def test_multi_turn_messages_and_final_turn_only(tmp_path):
  history = [msg("system", "be brief."), msg("user", "hi."), msg("assistant", "hello."),
             msg("user", "name a fruit.")]
  objs = [dict(chosen=history + [msg("assistant", "apple.")],
               rejected=history + [msg("assistant", "dog.")]),
          dict(prompt=history, chosen=[msg("assistant", "pear.")],
               rejected=[msg("assistant", "cat.")])]
  records, _ = read_pairs(write_jsonl(tmp_path / "c.jsonl", objs))
  prompt = "System: be brief.\nUser: hi.\nAssistant: hello.\nUser: name a fruit.\nAssistant:"
  assert records == [PairRecord(prompt, "apple.", "dog."), PairRecord(prompt, "pear.", "cat.")]
  assert chat.render(history) == prompt


CHAT_BAD = {
    "prefix": (dict(chosen=[msg("user", "a?"), msg("assistant", "b.")],
                    rejected=[msg("user", "c?"), msg("assistant", "d.")]),
               "fields 'chosen'/'rejected' do not share a prompt: the conversations differ at "
               "message 0"),
    "last_turn": (dict(chosen=[msg("user", "a?"), msg("assistant", "b.")],
                       rejected=[msg("assistant", "b."), msg("user", "d?")]),
                  "field 'rejected' must end with the assistant's response, but its last "
                  "message is the user's"),
    "bad_message": (dict(chosen=[{"role": "user"}, msg("assistant", "b.")],
                         rejected=[msg("user", "a?"), msg("assistant", "d.")]),
                    "field 'chosen' message 0 must be {\"role\": system|user|assistant"),
    "not_list": (dict(chosen=[msg("user", "a?"), msg("assistant", "b.")], rejected="d."),
                 "field 'rejected' must be a list of {\"role\", \"content\"} messages"),
    "prompt_differs": (dict(prompt="x?", chosen=[msg("user", "a?"), msg("assistant", "b.")],
                            rejected=[msg("assistant", "d.")]),
                       "field 'chosen' does not start with the conversation in field 'prompt'"),
    "no_prompt": (dict(chosen=[msg("assistant", "b.")], rejected=[msg("assistant", "d.")]),
                  "field 'prompt' is empty: the conversation has no turn before the responses"),
    "empty_response": (dict(chosen=[msg("user", "a?"), msg("assistant", " ")],
                            rejected=[msg("user", "a?"), msg("assistant", "d.")]),
                       "field 'chosen' is empty"),
    "hh_prefix": (dict(chosen="\n\nHuman: a?\n\nAssistant: b.",
                       rejected="\n\nHuman: c?\n\nAssistant: d."),
                  "fields 'chosen'/'rejected' differ before their last '\\n\\nAssistant:'"),
    "hh_no_turn": (dict(chosen="\n\nHuman: a?\n\nAssistant: b.", rejected="\n\nHuman: a?"),
                   "field 'rejected' has no '\\n\\nAssistant:' turn"),
}


@pytest.mark.parametrize("case", sorted(CHAT_BAD))
def test_chat_errors_name_file_line_field(tmp_path, case):
  obj, needle = CHAT_BAD[case]
  path = write_jsonl(tmp_path / "c.jsonl", [pair(0), obj])
  with pytest.raises(DataError) as e:
    read_pairs(path)
  assert str(e.value).startswith(f"{path}:2: {needle}"), str(e.value)


def test_hh_rlhf_transcripts_split_at_the_last_assistant_turn(tmp_path):
  shared = "\n\nHuman: hi.\n\nAssistant: hello.\n\nHuman: name a fruit."
  obj = dict(chosen=shared + "\n\nAssistant: apple.", rejected=shared + "\n\nAssistant: dog.")
  records, _ = read_pairs(write_jsonl(tmp_path / "hh.jsonl", [obj]))
  assert records == [PairRecord(shared + "\n\nAssistant:", " apple.", " dog.")]


# --- field remapping ---------------------------------------------------------------------

def test_remapped_fields(tmp_path):
  objs = [dict(question="name a fruit.", response_j="apple.", response_k="dog.", prompt="ignored")]
  spec = "prompt:question,chosen:response_j,rejected:response_k"
  records, _ = read_pairs(write_jsonl(tmp_path / "se.jsonl", objs), fields=spec)
  assert records == [PairRecord("name a fruit.", "apple.", "dog.")]
  swapped, _ = read_pairs(write_jsonl(tmp_path / "p.jsonl", [pair(0)]),
                          fields="chosen:rejected,rejected:chosen")
  assert (swapped[0].chosen, swapped[0].rejected) == ("dog.", "apple.")


def test_remapped_errors_name_the_files_own_fields(tmp_path):
  objs = [dict(question="q.", response_j="a.", response_k="b."),
          dict(question="q.", response_j="a.", prompt="not used")]
  path = write_jsonl(tmp_path / "se.jsonl", objs)
  with pytest.raises(DataError, match=r"se.jsonl:2: field 'response_k' is missing"):
    read_pairs(path, fields="prompt:question,chosen:response_j,rejected:response_k")
  _, report = read_pairs(path, fields="prompt:question,chosen:response_j,rejected:response_k",
                         skip_invalid=True)
  assert report.reasons == {"missing field 'response_k'": 1}


def test_remapped_chat_messages_from_parquet(tmp_path):
  objs = [dict(prompt="name a fruit.", good=[msg("user", "name a fruit."), msg("assistant", "apple.")],
               bad=[msg("user", "name a fruit."), msg("assistant", "dog.")])]
  records, _ = read_pairs(write_parquet(tmp_path / "uf.parquet", objs), fields="chosen:good,rejected:bad")
  assert records == [PairRecord("User: name a fruit.\nAssistant:", "apple.", "dog.")]


@pytest.mark.parametrize("spec,needle", [
    ("prompt:question,answer:response", "'answer' is not a record field; valid: " + ", ".join(FIELD_NAMES)),
    ("prompt", "'prompt' is not OURS:THEIRS (e.g. prompt:question)"),
    ("prompt:a,prompt:b", "'prompt' is mapped twice"),
])
def test_bad_field_specs(spec, needle):
  with pytest.raises(ValueError) as e:
    parse_fields(spec)
  assert str(e.value) == f"--data_fields: {needle}"


def test_load_data_passes_fields_through(tmp_path):
  d = shards(tmp_path)
  cfg = RunConfig(workdir=str(tmp_path / "w"), model=None, data=DataConfig(
      train_data=str(d / "*.parquet"), eval_data="", max_len=16, skip_invalid=True,
      fields="chosen:rejected,rejected:chosen"))
  train_ds, eval_ds = setup_lib.load_data(cfg, TOK)
  assert eval_ds is None and train_ds.n == 5
  first = train_ds.tokens[0, 0][train_ds.loss_mask[0, 0] > 0]
  assert TOK.decode(first[:-1]) == "dog."  # chosen is the file's rejected; EOS last


def test_unknown_data_fields_flag_fails_at_start_up(tmp_path):
  proc = train(str(tmp_path / "w"), "--data_fields=answer:response", check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "--data_fields: 'answer' is not a record field; valid: prompt, chosen" in proc.stderr


@pytest.mark.slow
def test_training_run_from_parquet_shards_with_remapped_fields(tmp_path):
  d = tmp_path / "data"
  d.mkdir()
  with open(os.path.join(ROOT, "jaxpref/data/tiny/train.jsonl")) as f:
    objs = [json.loads(line) for line in f][:64]
  renamed = [dict(question=o["prompt"], good=o["chosen"], bad=o["rejected"]) for o in objs]
  write_parquet(d / "train-00000.parquet", renamed[:32])
  write_parquet(d / "train-00001.parquet", renamed[32:])
  proc = train(str(tmp_path / "w"), f"--train_data={d}/train-*.parquet", "--eval_data=",
               "--data_fields=prompt:question,chosen:good,rejected:bad", "--steps=2",
               "--batch_size=8", "--noplot")
  assert f"train data: {d}/train-*.parquet: read 64 records, skipped 0 (2 files)" in proc.stdout
