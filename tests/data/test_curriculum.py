"""--curriculum: stages in order of a per-group number, shuffled within a stage, resumable."""

import json
import os
import types

import numpy as np
import pytest

from jaxpref import data as data_lib
from jaxpref import losses
from jaxpref.data import batching, curriculum, make_tiny
from jaxpref.data.batching import Batcher
from jaxpref.data.pairs import batch_indices
from jaxpref.train import setup as setup_lib
from jaxpref.train.config import DataConfig

TOK_PATH = os.path.join(make_tiny.OUT, "tokenizer.model")


def _ds(n=30, with_scores=True):
  tok = data_lib.Tokenizer.load(os.path.join(make_tiny.OUT, "tokenizer.model"))
  # Score gaps 0.5, 1.0, ..., in a scrambled file order.
  gaps = (np.random.default_rng(0).permutation(n) + 1) * 0.5
  records = [data_lib.PairRecord("tell me a color.", "red." * (1 + i % 3), "dog.", weight=1.0,
                                 scores=(float(g), 0.0) if with_scores else None)
             for i, g in enumerate(gaps)]
  return data_lib.PairDataset(records, tok, 32), gaps


def test_stages_hold_the_sorted_field_and_cover_every_group_once():
  ds, gaps = _ds()
  c = curriculum.from_spec(ds, "score_gap", 3, seed=1)  # desc by default: easy (large gap) first
  np.testing.assert_array_equal(c.boundaries, [0, 10, 20, 30])
  for epoch in range(3):
    order = c.epoch_order(epoch)
    np.testing.assert_array_equal(np.sort(order), np.arange(30))
    stage_gaps = [gaps[order[a:b]] for a, b in zip(c.boundaries[:-1], c.boundaries[1:])]
    assert stage_gaps[0].min() > stage_gaps[1].max() and stage_gaps[1].min() > stage_gaps[2].max()
  # Shuffled within a stage: the epochs differ in order, not in each stage's set.
  e0, e1 = c.epoch_order(0), c.epoch_order(1)
  assert not np.array_equal(e0[:10], e1[:10])
  np.testing.assert_array_equal(np.sort(e0[:10]), np.sort(e1[:10]))
  asc = curriculum.from_spec(ds, "score_gap:asc", 3, seed=1)
  assert gaps[asc.epoch_order(0)[:10]].max() < gaps[asc.epoch_order(0)[10:]].min()


def test_batches_follow_the_stages_and_resume_exactly():
  ds, gaps = _ds()
  c = curriculum.from_spec(ds, "score_gap", 3, seed=4)
  stream = np.concatenate([batch_indices(30, 5, s, 4, c.epoch_order) for s in range(12)])
  np.testing.assert_array_equal(stream[:30], c.epoch_order(0))
  np.testing.assert_array_equal(stream[30:], c.epoch_order(1))
  assert gaps[stream[:10]].min() > gaps[stream[10:20]].max()  # batches 0-1: stage 1 only
  # A fresh Batcher (a resumed run) draws the same batches, in any mode.
  for mode in ("pad", "buckets", "pack"):
    mk = lambda: Batcher(ds, 6, 4, mode, multiple=8, window=5, pack_groups=2,
                         curriculum=curriculum.from_spec(ds, "score_gap", 3, seed=4))
    first = [mk().plan(s)[0] for s in range(10)]
    resumed = mk()
    for s in (7, 3, 9):
      np.testing.assert_array_equal(resumed.plan(s)[0], first[s])
    assert "curriculum=score_gap:desc:3" in resumed.describe()
  # pack only reorders within a batch, so the stage order is kept batch by batch.
  pack = Batcher(ds, 5, 4, "pack", pack_groups=5, curriculum=c)
  np.testing.assert_array_equal(np.sort(pack.plan(0)[0]), np.sort(stream[:5]))


def test_length_field_and_one_stage_is_a_plain_shuffle():
  ds, _ = _ds()
  c = curriculum.from_spec(ds, "length", 2, seed=0)
  lengths = ds.segment_ids.astype(bool).sum((1, 2))
  order = c.epoch_order(0)
  assert lengths[order[:15]].max() <= lengths[order[15:]].min()
  one = curriculum.from_spec(ds, "weight", 1, seed=0)
  np.testing.assert_array_equal(np.sort(one.epoch_order(0)), np.arange(30))
  assert curriculum.from_spec(ds, "", 3, seed=0) is None


def test_bad_specs_are_clear_errors():
  ds, _ = _ds(with_scores=False)
  with pytest.raises(ValueError, match="needs scores"):
    curriculum.from_spec(ds, "score_gap", 2, seed=0)
  with pytest.raises(ValueError, match="=gap: not one of score_gap.*no 'gap' values"):
    curriculum.from_spec(ds, "gap", 2, seed=0)
  with pytest.raises(ValueError, match="not a field name"):
    curriculum.from_spec(ds, "9lives", 2, seed=0)
  with pytest.raises(ValueError, match="asc or desc"):
    curriculum.from_spec(ds, "length:up", 2, seed=0)
  with pytest.raises(ValueError, match="curriculum_stages must be in"):
    curriculum.from_spec(ds, "length", 31, seed=0)
  with pytest.raises(ValueError, match="label_smoothing field"):
    curriculum.from_spec(ds, "label_smoothing", 2, seed=0)


# --- any numeric field of the records ------------------------------------------------------

PAIR = {"prompt": "tell me a color.", "chosen": "red.", "rejected": "dog."}
RATED = {"prompt": "name a fruit.", "completions": [
    {"response": "apple.", "score": 2}, {"response": "i am not sure.", "score": 1},
    {"response": "dog.", "score": 0}]}
UNPAIRED = {"prompt": "tell me a color.", "completion": "red.", "label": True}


def _write(path, objs):
  path.write_text("".join(json.dumps(o) + "\n" for o in objs))
  return str(path)


def _train(path, fmt, spec, stages=2, **kw):
  """(train dataset, its Batcher's curriculum) as the train loop reads them."""
  cfg = types.SimpleNamespace(data=DataConfig(train_data=path, eval_data="", tokenizer=TOK_PATH,
                                              format=fmt, curriculum=spec,
                                              curriculum_stages=stages, **kw), loss="dpo",
                              loss_spec=losses.resolve("dpo"), role="policy")
  train_ds, _ = setup_lib.load_data(cfg, data_lib.Tokenizer.load(TOK_PATH))
  return train_ds, batching.from_config(cfg.data, train_ds, 1).curriculum


def test_any_record_field_orders_the_stages(tmp_path):
  difficulty = [3.0, -1, 7, 0.5, 2, 11]
  path = _write(tmp_path / "p.jsonl", [dict(PAIR, difficulty=d, judge_margin=-d, other="x")
                                       for d in difficulty])
  ds, c = _train(path, "pairs", "difficulty", stages=3)
  np.testing.assert_array_equal(ds.curriculum_values, difficulty)  # only the named field kept
  assert c.spec == "difficulty:asc"  # a field of the data's own: smallest first by default
  np.testing.assert_array_equal([sorted(np.take(difficulty, s)) for s in c.stages],
                                [[-1, 0.5], [2, 3], [7, 11]])
  _, desc = _train(path, "pairs", "judge_margin:desc", stages=3)
  np.testing.assert_array_equal(np.take(difficulty, desc.stages[0]), [-1, 0.5])
  # --data_fields still renames our own fields; the curriculum field is read as named.
  renamed = _write(tmp_path / "q.jsonl", [{"question": PAIR["prompt"], "chosen": "red.",
                                           "rejected": "dog.", "difficulty": d}
                                          for d in difficulty])
  ds, c = _train(renamed, "pairs", "difficulty", stages=2, fields="prompt:question")
  np.testing.assert_array_equal(ds.curriculum_values, difficulty)
  # Fields of ours are not kept as record values: score_gap etc. read their own arrays.
  ds, _ = _train(path, "pairs", "length", stages=2)
  assert ds.curriculum_values is None


def test_bad_or_missing_values_name_file_line_and_field(tmp_path):
  for bad, needle in (({}, "field 'difficulty' is missing"),
                      ({"difficulty": "hard"}, "field 'difficulty' must be a finite number"),
                      ({"difficulty": True}, "field 'difficulty' must be a finite number"),
                      ({"difficulty": None}, "field 'difficulty' must be a finite number")):
    path = _write(tmp_path / "p.jsonl", [dict(PAIR, difficulty=1), dict(PAIR, **bad),
                                         dict(PAIR, difficulty=2)])
    with pytest.raises(data_lib.DataError, match=r"p.jsonl:2: " + needle) as e:
      _train(path, "pairs", "difficulty")
    assert "--skip_invalid_records" in str(e.value)
  # NaN/inf (JSON extensions Python reads) are not finite either.
  path = tmp_path / "n.jsonl"
  path.write_text(json.dumps(dict(PAIR, difficulty=1)) + "\n"
                  + json.dumps(PAIR)[:-1] + ', "difficulty": NaN}\n')
  with pytest.raises(data_lib.DataError, match="n.jsonl:2: field 'difficulty' must be a finite"):
    _train(str(path), "pairs", "difficulty")
  # Skipped and counted like any bad record.
  path = _write(tmp_path / "s.jsonl", [dict(PAIR, difficulty=1), PAIR, dict(PAIR, difficulty="x"),
                                       dict(PAIR, difficulty=2)])
  records, report = data_lib.read_pairs(path, skip_invalid=True, keep="difficulty")
  assert [r.curriculum_value for r in records] == [1.0, 2.0] and report.n_skipped == 2
  assert report.reasons == {"missing field 'difficulty'": 1,
                            "field 'difficulty' is not a finite number": 1}
  # The eval file is not asked for the field.
  assert data_lib.read_pairs(path, skip_invalid=True)[1].n_skipped == 0


def test_ranked_ratings_and_unpaired_groups_inherit_the_record_value(tmp_path):
  rated = _write(tmp_path / "r.jsonl", [dict(RATED, difficulty=d) for d in (5.0, 1.0, 3.0)])
  ds, c = _train(rated, "ranked", "difficulty", stages=3, group_size=3)
  np.testing.assert_array_equal(ds.curriculum_values, [5, 1, 3])
  np.testing.assert_array_equal([s.tolist() for s in c.stages], [[1], [2], [0]])
  # all_pairs makes 3 pairs per record: each carries its record's value.
  ds, c = _train(rated, "ratings_all_pairs", "difficulty:desc", stages=3)
  np.testing.assert_array_equal(ds.curriculum_values, [5] * 3 + [1] * 3 + [3] * 3)
  np.testing.assert_array_equal(ds.curriculum_values[c.stages[0]], [5, 5, 5])
  ds, _ = _train(rated, "ratings_best_vs_rest", "difficulty")
  np.testing.assert_array_equal(ds.curriculum_values, [5, 5, 1, 1, 3, 3])
  pairs = _write(tmp_path / "p.jsonl", [dict(PAIR, difficulty=d) for d in (4.0, 2.0)])
  ds, _ = _train(pairs, "pairs_as_unpaired", "difficulty")  # each pair: two unpaired groups
  np.testing.assert_array_equal(ds.curriculum_values, [4, 4, 2, 2])
  unpaired = _write(tmp_path / "u.jsonl", [dict(UNPAIRED, difficulty=d) for d in (0.5, -2.0)])
  ds, c = _train(unpaired, "unpaired", "difficulty")
  np.testing.assert_array_equal(ds.curriculum_values, [0.5, -2])
  np.testing.assert_array_equal(c.stages[0], [1])
  with pytest.raises(data_lib.DataError, match="r.jsonl:1: field 'gpt4_score' is missing"):
    _train(rated, "ratings_best_vs_worst", "gpt4_score")


def test_policy_margin_in_round_one_is_file_order():
  ds, _ = _ds()
  c = curriculum.from_spec(ds, "policy_margin", 3, seed=0)
  assert c.spec == "policy_margin:desc"
  np.testing.assert_array_equal(np.concatenate(c.stages), np.arange(30))
