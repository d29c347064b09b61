"""Extra record fields -> extra group members and source log-probs (data/extra_members.py):
K=3 groups with the right tokens and masks, errors naming file/line/field, remapping."""

import json
import os

import numpy as np
import pytest

from jaxpref import losses, models
from jaxpref.data import (DataError, PairDataset, PairRecord, Tokenizer, read_pairs,
                          tokenize_sequence)
from jaxpref.data import extra_members, make_tiny, make_tiny_extra
from jaxpref.train import loop
from jaxpref.train.config import DataConfig, RunConfig

TOK = Tokenizer.load(os.path.join(make_tiny.OUT, "tokenizer.model"))
BASE = {"prompt": "name a fruit.", "chosen": "apple.", "rejected": "dog."}


def write(tmp_path, records, name="d.jsonl"):
  path = tmp_path / name
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return str(path)


def test_rationale_records_become_groups_of_three(tmp_path):
  rec = {**BASE, "rationale": "apple is a fruit and dog is not."}
  records, _ = read_pairs(write(tmp_path, [rec, rec]), require=("rationale",))
  ds = PairDataset(records, TOK, 192, extra=("rationale",))
  batch = ds.batch(np.arange(2))
  assert batch.tokens.shape == (2, 3, 192) and batch.valid.all()
  prompt = extra_members.rationale_prompt(BASE["prompt"], BASE["chosen"], BASE["rejected"])
  assert "Assistant 1: apple." in prompt and "Assistant 2: dog." in prompt
  want = tokenize_sequence(TOK, prompt, rec["rationale"], 192)
  np.testing.assert_array_equal(batch.tokens[0, 2], want[0])
  np.testing.assert_array_equal(batch.loss_mask[0, 2], want[1])
  assert batch.loss_mask[0, 2].sum() == len(TOK.encode(rec["rationale"])) + 1  # + EOS
  for j, response in enumerate((BASE["chosen"], BASE["rejected"])):  # the pair is unchanged
    np.testing.assert_array_equal(batch.tokens[0, j], tokenize_sequence(TOK, BASE["prompt"], response, 192)[0])


def test_rejected_prompt_member_is_the_chosen_response_under_the_other_prompt(tmp_path):
  rec = {**BASE, "rejected_prompt": "name a tool."}
  ds = PairDataset(read_pairs(write(tmp_path, [rec]))[0], TOK, 32, extra=("rejected_prompt",))
  tokens, mask, _, _ = tokenize_sequence(TOK, "name a tool.", "apple.", 32)
  np.testing.assert_array_equal(ds.tokens[0, 2], tokens)
  np.testing.assert_array_equal(ds.loss_mask[0, 2], mask)
  # Same response, so the masked tokens are the same ids as member 0's (the condition differs).
  assert list(ds.tokens[0, 0][ds.loss_mask[0, 0] > 0]) == list(tokens[mask > 0])
  assert ds.members.all()


def test_ordinary_pairs_stay_pairs_even_when_records_hold_the_fields(tmp_path):
  rec = {**BASE, "rationale": "because.", "rejected_prompt": "name a tool."}
  ds = PairDataset(read_pairs(write(tmp_path, [rec]))[0], TOK, 32)
  assert ds.tokens.shape == (1, 2, 32) and ds.batch(np.arange(1)).source_logps is None


def test_truncating_the_extra_member_counts_the_group(tmp_path):
  rec = {**BASE, "rationale": "apple is a fruit and dog is not."}
  records, _ = read_pairs(write(tmp_path, [rec]))
  assert PairDataset(records, TOK, 192, extra=("rationale",)).n_truncated == 0
  assert PairDataset(records, TOK, 32, extra=("rationale",)).n_truncated == 1
  assert PairDataset(records, TOK, 32).n_truncated == 0


@pytest.mark.parametrize("field", ["rationale", "rejected_prompt", "source_logps"])
def test_a_required_field_missing_names_file_line_and_field(tmp_path, field):
  value = [[-1.0, -2.0]] if field == "source_logps" else "text."
  path = write(tmp_path, [{**BASE, field: value}, BASE])
  with pytest.raises(DataError, match=rf"d\.jsonl:2: field '{field}' is missing"):
    read_pairs(path, require=(field,))
  if field == "source_logps":  # carried whenever present, so all records or none
    with pytest.raises(DataError, match="d.jsonl:2: no field 'source_logps', but .*d.jsonl:1 has 1"):
      read_pairs(path)
  else:
    read_pairs(path)  # not required: read, the member not built


def test_dataset_refuses_a_record_without_its_member_field():
  records = [PairRecord(**BASE)]
  with pytest.raises(ValueError, match="record 0: field 'rationale' is missing"):
    PairDataset(records, TOK, 32, extra=("rationale",))


@pytest.mark.parametrize("extra,needle", [
    ({"rationale": 3}, "d.jsonl:1: field 'rationale' must be a string"),
    ({"rationale": "  "}, "d.jsonl:1: field 'rationale' is empty"),
    ({"rejected_prompt": ["x"]}, "d.jsonl:1: field 'rejected_prompt' must be a string"),
    ({"source_logps": [-1.0, -2.0]}, r"d.jsonl:1: field 'source_logps'\[0\] must be \[chosen, rejected\]"),
    ({"source_logps": []}, "d.jsonl:1: field 'source_logps' must be a list"),
    ({"source_logps": [[-1.0, 0.5]]}, r"d.jsonl:1: field 'source_logps'\[0\] must hold log-probs <= 0"),
    ({"source_logps": [[-1.0, float("nan")]]}, "d.jsonl:1: field 'source_logps'"),
])
def test_bad_extra_fields_are_named(tmp_path, extra, needle):
  with pytest.raises(DataError, match=needle):
    read_pairs(write(tmp_path, [{**BASE, **extra}]))


def test_source_logps_reach_the_batch_and_need_one_source_count(tmp_path):
  recs = [{**BASE, "source_logps": [[-1.0, -2.0], [-3.0, -4.5]]},
          {**BASE, "source_logps": [[-5.0, -6.0], [-7.0, -8.0]]}]
  ds = PairDataset(read_pairs(write(tmp_path, recs), require=("source_logps",))[0], TOK, 32)
  got = ds.batch(np.array([1, 0])).source_logps
  np.testing.assert_array_equal(got, [[[-5, -6], [-7, -8]], [[-1, -2], [-3, -4.5]]])
  assert ds.tokens.shape[1] == 2  # no extra member
  bad = recs + [{**BASE, "source_logps": [[-1.0, -2.0]]}]
  with pytest.raises(DataError, match="d.jsonl:3: 1 source models in field 'source_logps', but "
                                      ".*d.jsonl:1 has 2 source models in it"):
    read_pairs(write(tmp_path, bad))


def test_data_fields_remaps_the_extra_fields(tmp_path):
  rec = {**BASE, "why": "apple is a fruit.", "worse_prompt": "name a tool.",
         "scores_by_model": [[-1.0, -2.0]]}
  fields = "rationale:why,rejected_prompt:worse_prompt,source_logps:scores_by_model"
  records, _ = read_pairs(write(tmp_path, [rec]), fields=fields,
                          require=("rationale", "rejected_prompt", "source_logps"))
  r = records[0]
  assert (r.rationale, r.rejected_prompt, r.source_logps) == (
      "apple is a fruit.", "name a tool.", ((-1.0, -2.0),))
  with pytest.raises(DataError, match="d.jsonl:1: field 'why' is missing"):
    read_pairs(write(tmp_path, [BASE]), fields="rationale:why", require=("rationale",))


def test_shipped_tiny_files_are_the_generators_output(tmp_path):
  make_tiny_extra.main([f"--out={tmp_path}"])
  for kind in ("rationale", "condition", "source"):
    for split, n in (("pairs", make_tiny_extra.N_TRAIN), ("eval", make_tiny_extra.N_EVAL)):
      name = f"{kind}_{split}.jsonl"
      shipped = open(os.path.join(make_tiny.OUT, name)).read()
      assert shipped == (tmp_path / name).read_text(), name
      assert len(shipped.splitlines()) == n < 300


@pytest.mark.parametrize("loss,train", [("rdpo", "rationale_pairs"), ("mapl", "condition_pairs"),
                                        ("infifpo", "source_pairs")])
def test_setup_builds_what_the_loss_needs_and_refuses_data_without_it(tmp_path, loss, train):
  def cfg(data):
    return RunConfig(workdir=str(tmp_path / "run"), model=models.get_config("tiny"), loss=loss,
                     data=DataConfig(train_data=data, eval_data="", max_len=32, batch_size=8,
                                     tokenizer=os.path.join(make_tiny.OUT, "tokenizer.model")))
  ds = loop.setup(cfg(os.path.join(make_tiny.OUT, f"{train}.jsonl"))).train_ds
  assert ds.tokens.shape[1] == 2 + len(losses.member_fields(loss))
  field = losses.record_fields(loss)[0]
  with pytest.raises(DataError, match=rf"train\.jsonl:1: field '{field}' is missing"):
    loop.setup(cfg(os.path.join(make_tiny.OUT, "train.jsonl")))


def test_score_sources_writes_what_training_reads(tmp_path):
  """A saved tiny model scores a pair file; the written `source_logps` are its summed
  log-probs of each pair laid out as training lays it out, one entry per --model."""
  from flax import nnx

  from jaxpref.models import convert
  from jaxpref.train import score_sources
  from jaxpref.models.logps import token_logps

  model = models.Decoder(models.get_config("tiny"), rngs=nnx.Rngs(3))
  convert.save_jaxpref(model, str(tmp_path / "src"))
  tiny = [json.loads(line) for line in open(os.path.join(make_tiny.OUT, "train.jsonl"))][:5]
  src = write(tmp_path, [{**r, "extra": i} for i, r in enumerate(tiny)], "in.jsonl")
  tok_path = os.path.join(make_tiny.OUT, "tokenizer.model")
  out = str(tmp_path / "out.jsonl")
  assert score_sources.main([src, out, f"--model={tmp_path / 'src'}", f"--model={tmp_path / 'src'}",
                             f"--tokenizer={tok_path}", f"--tokenizer={tok_path}",
                             "--max_len=32", "--batch_size=4"]) == 0
  records, _ = read_pairs(out, require=("source_logps",))
  got = np.array([r.source_logps for r in records])  # [N, S=2, 2]
  ds = PairDataset(read_pairs(src)[0], TOK, 32)
  graphdef, params = nnx.split(model)
  want = np.asarray(token_logps(graphdef, params, ds.batch(np.arange(5))).sum(-1))
  np.testing.assert_allclose(got[:, 0], want, atol=1e-3)
  np.testing.assert_array_equal(got[:, 0], got[:, 1])
  assert [json.loads(line)["extra"] for line in open(out)] == list(range(5))  # fields kept
  assert score_sources.main([src, out, f"--model={tmp_path / 'src'}", f"--tokenizer={tok_path}",
                             f"--tokenizer={tok_path}"]) == 2
