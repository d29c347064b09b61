"""--truncation (keep_end | keep_start | drop) and --max_prompt_len: exact layouts on
hand-built token ids, drop counts and reports, prepared-data and ref-cache keys."""

import json

import numpy as np
import pytest

from jaxpref import models
from jaxpref.data import (DataError, PairDataset, PairRecord, RankedDataset, RankedRecord,
                          Tokenizer, Truncation, UnpairedDataset, UnpairedRecord, read_pairs,
                          tokenize_sequence)
from jaxpref.data import cli, grain_source, make_tiny, validate
from jaxpref.data.pairs import _layout
from jaxpref.train import ref_cache
from jaxpref.train import setup as setup_lib
from jaxpref.train.config import DataConfig, RunConfig

TINY = make_tiny.OUT
TOK = f"{TINY}/tokenizer.model"
BOS, EOS, PAD = 1, 2, 0


class Ids:
  """A tokenizer whose text is its token ids ("10 11 12"), so layouts are exact."""

  bos_id, eos_id, pad_id, unk_id = BOS, EOS, PAD, 3

  def encode(self, text: str) -> list[int]:
    return [int(x) for x in text.split()]


def ids(a: int, n: int) -> str:
  return " ".join(str(a + i) for i in range(n))


def row(prompt: str, response: str, max_len: int, **policy):
  tokens, mask, seg, cut = tokenize_sequence(Ids(), prompt, response, max_len,
                                             Truncation(**policy))
  n = int(seg.sum())
  return tokens[:n].tolist(), mask[:n].tolist(), cut


def test_prompt_keeps_its_end_or_its_start():
  # 2 + 6 + 2 > 8: the prompt keeps 4 tokens, the response all of its own and the EOS.
  assert row(ids(10, 6), "20 21", 8) == ([BOS, 12, 13, 14, 15, 20, 21, EOS],
                                         [0, 0, 0, 0, 0, 1, 1, 1], True)
  assert row(ids(10, 6), "20 21", 8, mode="keep_start") == (
      [BOS, 10, 11, 12, 13, 20, 21, EOS], [0, 0, 0, 0, 0, 1, 1, 1], True)
  # drop lays the row out as keep_end and says it was cut (the dataset drops the group).
  assert row(ids(10, 6), "20 21", 8, mode="drop") == row(ids(10, 6), "20 21", 8)


def test_response_alone_too_long_keeps_half_a_prompt_and_the_response_start():
  # 2 + 7 > 8: the prompt keeps max_len // 2 = 4 tokens, the response its first 3, no EOS.
  assert row(ids(10, 6), ids(20, 7), 8)[0] == [BOS, 12, 13, 14, 15, 20, 21, 22]
  assert row(ids(10, 6), ids(20, 7), 8, mode="keep_start")[0] == [BOS, 10, 11, 12, 13, 20, 21, 22]


def test_a_fitting_sequence_is_the_same_under_every_policy():
  want = ([BOS, 10, 11, 20, EOS], [0, 0, 0, 1, 1], False)
  for mode in ("keep_end", "keep_start", "drop"):
    assert row("10 11", "20", 5, mode=mode) == want


def test_default_policy_is_the_old_layout():
  tok = Ids()
  for p, r, max_len in [(6, 2, 8), (6, 7, 8), (1, 9, 5), (0, 3, 4), (9, 0, 3), (2, 2, 6)]:
    a = _layout(tok, list(range(10, 10 + p)), list(range(30, 30 + r)), max_len)
    b = _layout(tok, list(range(10, 10 + p)), list(range(30, 30 + r)), max_len,
                Truncation("keep_end", 0))
    for x, y in zip(a[:3], b[:3]):
      np.testing.assert_array_equal(x, y)
    assert a[3] == b[3]


def test_max_prompt_len_cuts_the_prompt_first_and_counts_as_truncated():
  assert row(ids(10, 6), "20 21", 32, max_prompt_len=3) == (
      [BOS, 13, 14, 15, 20, 21, EOS], [0, 0, 0, 0, 1, 1, 1], True)
  assert row(ids(10, 6), "20 21", 32, max_prompt_len=3, mode="keep_start")[0] == [
      BOS, 10, 11, 12, 20, 21, EOS]
  assert row(ids(10, 3), "20 21", 32, max_prompt_len=3)[2] is False  # at the limit: no cut
  # Then the total: 2 + 4 + 3 > 7, so the 4 kept prompt tokens lose 2 more.
  assert row(ids(10, 6), ids(20, 3), 7, max_prompt_len=4)[0] == [BOS, 14, 15, 20, 21, 22, EOS]
  assert row(ids(10, 6), ids(20, 3), 7, max_prompt_len=4, mode="keep_start")[0] == [
      BOS, 10, 11, 20, 21, 22, EOS]


def test_bad_policy_is_a_clear_error():
  with pytest.raises(ValueError, match="--truncation='middle' is not one of"):
    Truncation("middle")
  with pytest.raises(ValueError, match="--max_prompt_len must be >= 0"):
    Truncation(max_prompt_len=-1)


def _pairs():
  # Group 1 does not fit max_len=8 (2 + 6 + 1 > 8); groups 0 and 2 do.
  return [PairRecord("10 11", "20", "21", weight=1.0),
          PairRecord(ids(10, 6), "20", "21", weight=2.0),
          PairRecord("12", "22 23", "24", weight=3.0)]


def test_drop_removes_cut_groups_and_counts_them():
  ds = PairDataset(_pairs(), Ids(), 8, truncation=Truncation("drop"))
  assert (ds.n, ds.n_dropped_groups, ds.n_truncated) == (2, 1, 0)
  assert ds.weight.tolist() == [1.0, 3.0]  # per-record arrays follow the kept groups
  assert ds.tokens[1, 0, :5].tolist() == [BOS, 12, 22, 23, EOS]
  assert ds.drop_note == "; dropped 1 groups over --max_len=8 (--truncation=drop)"
  kept = PairDataset(_pairs(), Ids(), 8)
  assert (kept.n, kept.n_dropped_groups, kept.n_truncated, kept.drop_note) == (3, 0, 1, "")
  np.testing.assert_array_equal(ds.tokens, kept.tokens[[0, 2]])
  batch = ds.batch(np.arange(ds.n))
  assert batch.weight.tolist() == [1.0, 3.0] and batch.valid.all()


def test_drop_with_max_prompt_len_names_both_limits():
  ds = PairDataset(_pairs(), Ids(), 32, truncation=Truncation("drop", max_prompt_len=2))
  assert (ds.n, ds.n_dropped_groups) == (2, 1)
  assert ds.drop_note == ("; dropped 1 groups over --max_len=32 or --max_prompt_len=2 "
                          "(--truncation=drop)")


def test_everything_dropped_is_an_error():
  with pytest.raises(DataError, match="every one of the 3 groups is over --max_len=4 and "
                     "--truncation=drop dropped them all"):
    PairDataset(_pairs(), Ids(), 4, truncation=Truncation("drop"))


def test_ranked_and_unpaired_drop_their_cut_groups():
  ranked = [RankedRecord("10", ("20", "21", "22"), (3.0, 1.0, 2.0)),
            RankedRecord(ids(10, 9), ("20", "21"), (1.0, 2.0))]
  ds = RankedDataset(ranked, Ids(), 8, 3, truncation=Truncation("drop"))
  assert (ds.n, ds.n_dropped_groups) == (1, 1)
  assert ds.scores.tolist() == [[3.0, 2.0, 1.0]]
  unpaired = [UnpairedRecord(ids(10, 9), "20", True), UnpairedRecord("11", "21", False),
              UnpairedRecord("12", "22", True)]
  ds = UnpairedDataset(unpaired, Ids(), 8, truncation=Truncation("drop"))
  assert (ds.n, ds.n_dropped_groups, ds.n_desirable) == (2, 1, 1)
  assert ds.label[:, 0].tolist() == [0, 1]
  assert ds.tokens[:, 0, :4].tolist() == [[BOS, 11, 21, EOS], [BOS, 12, 22, EOS]]


def test_validate_follows_the_policy(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                          for p, c, r in [("10 11", "20", "21"), (ids(10, 6), "20", "21")]))
  v = validate.validate(str(path), "pairs", "", Ids(), 8, Truncation("drop"))
  assert v.n_over_length == 1
  assert sum("training drops its group" in w for w in v.warnings) == 2  # chosen, rejected
  assert "over --max_len=8 after tokenization; --truncation=drop)" in v.render()
  v = validate.validate(str(path), "pairs", "", Ids(), 32, Truncation(max_prompt_len=4))
  assert v.n_over_length == 1
  assert [w for w in v.warnings if "over" in w] == [
      f"{path}:2: field 'prompt' is over --max_prompt_len=4 after tokenization (6 tokens); "
      "training truncates it"]
  assert validate.validate(str(path), "pairs", "", Ids(), 8).n_over_length == 1


def _cfg(**data):
  return RunConfig(workdir="", model=models.get_config("tiny"),
                   data=DataConfig(train_data=f"{TINY}/eval.jsonl", eval_data="", tokenizer=TOK,
                                   **data))


def test_load_data_reports_the_dropped_groups(monkeypatch):
  said = []
  monkeypatch.setattr(setup_lib, "say", said.append)
  cfg = _cfg(max_len=16, truncation="drop")
  ds, _ = setup_lib.load_data(cfg, Tokenizer.load(TOK))
  records, _ = read_pairs(f"{TINY}/eval.jsonl")
  kept = PairDataset(records, Tokenizer.load(TOK), 16)
  assert ds.n_dropped_groups == kept.n_truncated > 0 and ds.n == len(records) - kept.n_truncated
  assert said[0].endswith(f"; 0 of {ds.n} groups truncated to --max_len=16; dropped "
                          f"{kept.n_truncated} groups over --max_len=16 (--truncation=drop)")


def _prepare(tmp_path, *flags):
  out = str(tmp_path / "out")
  rc = cli.main(["prepare", f"{TINY}/eval.jsonl", f"--tokenizer={TOK}", f"--out={out}", *flags])
  return rc, out


def test_prepare_stores_the_policy_and_refuses_other_flags(tmp_path, capsys):
  rc, out = _prepare(tmp_path, "--max_len=16", "--truncation=drop")
  assert rc == 0
  info = grain_source.read_info(out)
  records, _ = read_pairs(f"{TINY}/eval.jsonl")
  want = PairDataset(records, Tokenizer.load(TOK), 16, truncation=Truncation("drop"))
  assert (info["truncation"], info["max_prompt_len"]) == ("drop", 0)
  assert (info["groups"], info["dropped_groups"]) == (want.n, want.n_dropped_groups)
  assert f"dropped {want.n_dropped_groups} groups over --max_len=16" in capsys.readouterr().out
  prepared = grain_source.PreparedDataset(out)
  np.testing.assert_array_equal(prepared.batch(np.arange(want.n)).tokens,
                                want.batch(np.arange(want.n)).tokens)
  assert prepared.drop_note == want.drop_note
  grain_source.check_config(_cfg(max_len=16, truncation="drop"), prepared)
  with pytest.raises(ValueError, match="prepared with --truncation=drop; this run has "
                     "--truncation=keep_end"):
    grain_source.check_config(_cfg(max_len=16), prepared)
  with pytest.raises(ValueError, match="prepared with --max_prompt_len=0; this run has "
                     "--max_prompt_len=8"):
    grain_source.check_config(_cfg(max_len=16, truncation="drop", max_prompt_len=8), prepared)


def test_default_prepare_stores_no_policy_and_refuses_another(tmp_path):
  rc, out = _prepare(tmp_path, "--max_len=16")
  assert rc == 0
  info = grain_source.read_info(out)
  assert "truncation" not in info and "dropped_groups" not in info  # as before these flags
  with pytest.raises(ValueError, match="prepared with --truncation=keep_end; this run has "
                     "--truncation=keep_start"):
    grain_source.check_config(_cfg(max_len=16, truncation="keep_start"),
                              grain_source.PreparedDataset(out))


def test_prepare_that_drops_everything_fails(tmp_path, capsys):
  rc, _ = _prepare(tmp_path, "--max_len=4", "--truncation=drop")
  assert rc == 1
  assert "every one of the 300 groups is over --max_len=4" in capsys.readouterr().err


def test_ref_cache_key_follows_the_policy(tmp_path):
  def key(**data):
    cfg = _cfg(**data)
    return ref_cache.key_parts(cfg, f"{TINY}/eval.jsonl", weights="w")
  default = key()
  assert "truncation" not in default  # caches written before these flags stay valid
  assert default == key(truncation="keep_end", max_prompt_len=0)
  others = [key(truncation="keep_start"), key(truncation="drop"), key(max_prompt_len=8)]
  assert len({json.dumps(k, sort_keys=True) for k in [default, *others]}) == 4
  assert others[2]["truncation"] == ["keep_end", 8]


def test_flags_reach_the_data_config():
  from jaxpref import flags as jflags
  assert jflags.FLAGS["truncation"].default == "keep_end"
  assert set(jflags.FLAGS["truncation"].parser.enum_values) == {"keep_end", "keep_start", "drop"}
  assert jflags.FLAGS["max_prompt_len"].default == 0
  assert Truncation.of(DataConfig(truncation="drop", max_prompt_len=5)) == Truncation("drop", 5)


def test_scoring_tools_cut_rather_than_drop():
  # jaxpref-eval, jaxpref-strength and best-of-N score every record: `drop` is read as keep_end.
  cfg = DataConfig(truncation="drop", max_prompt_len=7)
  assert Truncation.for_scoring(cfg) == Truncation("keep_end", 7)
  assert Truncation.for_scoring(DataConfig(truncation="keep_start")) == Truncation("keep_start", 0)
  assert Truncation.for_scoring(object()) == Truncation()  # a config from before the flags
