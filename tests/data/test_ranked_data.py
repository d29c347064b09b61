"""Rated multi-response records: reading, ranked groups for listwise losses, pairs from ratings."""

import json
import os

import numpy as np
import pytest

from jaxpref.data import (DataError, RankedDataset, RankedRecord, Tokenizer, make_tiny,
                          pairs_from_ratings, read_pairs, read_ranked)

TOK = Tokenizer.load(os.path.join(make_tiny.OUT, "tokenizer.model"))
REC = RankedRecord("name a fruit.", ("dog.", "apple.", "i am not sure.", "pear."), (0, 3, 1, 3))


def test_read_ranked_and_errors(tmp_path):
  path = tmp_path / "r.jsonl"
  good = {"prompt": "name a fruit.", "completions": [{"response": "apple.", "score": 2},
                                                     {"response": "dog.", "score": 0.5}]}
  path.write_text(json.dumps(good) + "\n")
  assert read_ranked(str(path))[0] == [RankedRecord("name a fruit.", ("apple.", "dog."), (2.0, 0.5))]
  bad = [({"prompt": "p"}, "field 'completions' must be a list"),
         ({"prompt": "p", "completions": [{"response": "a", "score": 1}]}, "need >= 2"),
         ({"prompt": "p", "completions": [{"response": "a", "score": 1}, {"response": "b"}]},
          "completions[1]: field 'score' must be a finite number"),
         ({"prompt": "p", "completions": [{"response": "", "score": 1}, {"response": "b", "score": 0}]},
          "completions[0]: field 'response' is empty")]
  for obj, needle in bad:
    path.write_text(json.dumps(good) + "\n" + json.dumps(obj) + "\n")
    with pytest.raises(DataError, match="r.jsonl:2: ") as e:
      read_ranked(str(path))
    assert needle in str(e.value)


def test_ranked_groups_sorted_best_first_with_drops_and_padding():
  short = RankedRecord("name a tool.", ("saw.", "cat."), (1.0, 0.0))
  ds = RankedDataset([REC, short], TOK, 16, group_size=3)
  assert ds.tokens.shape == (2, 3, 16) and ds.n_dropped_responses == 1
  np.testing.assert_array_equal(ds.scores, [[3, 3, 1], [1, 0, 0]])
  batch = ds.batch(np.array([0, 1]))
  assert batch.valid.tolist() == [[True, True, True], [True, True, False]]
  responses = [TOK.decode(batch.tokens[0, k][batch.loss_mask[0, k] > 0][:-1]) for k in range(3)]
  assert responses == ["apple.", "pear.", "i am not sure."]  # ties keep file order


def test_pairs_from_ratings_modes_and_ties():
  pairs, ties = pairs_from_ratings([REC], "best_vs_worst")
  assert [(p.chosen, p.rejected, p.scores) for p in pairs] == [("apple.", "dog.", (3.0, 0.0))]
  pairs, ties = pairs_from_ratings([REC], "best_vs_rest")
  assert [p.rejected for p in pairs] == ["i am not sure.", "dog."] and ties == 1  # apple = pear
  pairs, ties = pairs_from_ratings([REC], "all_pairs")
  assert len(pairs) == 5 and ties == 1
  assert all(p.scores[0] > p.scores[1] for p in pairs)
  with pytest.raises(ValueError, match="pairing mode"):
    pairs_from_ratings([REC], "random")


def test_shipped_ranked_data_orders_right_unsure_wrong():
  records, _ = read_ranked(os.path.join(make_tiny.OUT, "ranked_eval.jsonl"))
  assert len(records) == make_tiny.N_RANKED_EVAL
  ds = RankedDataset(records, TOK, 32, group_size=3)
  assert ds.n_unk == 0 and ds.n_truncated == 0
  assert (ds.scores == [2, 1, 0]).all()


@pytest.mark.slow
def test_listwise_training_on_ranked_lists(tmp_path):
  from jaxpref import models
  from jaxpref.train import loop
  from jaxpref.train.config import DataConfig, RunConfig
  tiny = make_tiny.OUT
  cfg = RunConfig(workdir=str(tmp_path / "w"), model=models.get_config("tiny"), loss="pro",
                  mesh="data:8", steps=6, log_every=2, eval_every=3, checkpoint_every=3,
                  progress=False, plot=False,
                  data=DataConfig(train_data=f"{tiny}/ranked_train.jsonl", format="ranked",
                                  eval_data=f"{tiny}/ranked_eval.jsonl", group_size=3,
                                  tokenizer=f"{tiny}/tokenizer.model", batch_size=16))
  final = loop.run(cfg)
  assert final["step"] == 6 and np.isfinite(final["loss"]) and 0 <= final["rewards/accuracy"] <= 1


def test_message_lists_read_as_the_pair_does(tmp_path):
  """Without a chat template, message-list prompts and responses render in the plain
  format, as the equivalent pair record's; the rest of each completion is kept."""
  turns = [{"role": "user", "content": "name a fruit."}]
  said = lambda text: [{"role": "assistant", "content": text}]
  (tmp_path / "p.jsonl").write_text(json.dumps({"chosen": turns + said("apple."),
                                                "rejected": turns + said("dog.")}) + "\n")
  (tmp_path / "r.jsonl").write_text(json.dumps({"completions": [
      {"response": turns + said("dog."), "score": 0}, {"response": "apple.", "score": 3}]}) + "\n")
  pair = read_pairs(str(tmp_path / "p.jsonl"))[0][0]
  assert read_ranked(str(tmp_path / "r.jsonl"))[0] == [
      RankedRecord(pair.prompt, (pair.rejected, pair.chosen), (0.0, 3.0))]
  (tmp_path / "r.jsonl").write_text(json.dumps({"prompt": turns, "completions": [
      {"response": said("a"), "score": 0}]}) + "\n")
  with pytest.raises(DataError, match=r"r.jsonl:1: field 'completions' has 1 entries; need >= 2"):
    read_ranked(str(tmp_path / "r.jsonl"))
