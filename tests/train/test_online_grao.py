"""GRAO's reference answers in the rollout (train/answers.py): each record's chosen answer
joins its group as the last member, laid out like a sample; records without one are
refused by name; and a short run trains on them."""

import dataclasses

import numpy as np
import pytest

from jaxpref import cli_errors
from jaxpref.data import make_tiny
from jaxpref.train import answers, loop

from test_online import config, rows

TINY = make_tiny.OUT


def test_the_answer_follows_its_groups_samples_laid_out_like_one():
  # 2 groups of K=2 samples, width 7: prompt at [0, start), response at [start, end).
  tokens = np.array([[1, 5, 6, 7, 2, 0, 0], [1, 5, 8, 2, 0, 0, 0],
                     [1, 9, 9, 3, 3, 3, 3], [1, 9, 9, 4, 2, 0, 0]], np.int32)
  starts, ends = np.array([2, 2, 3, 3]), np.array([5, 4, 7, 5])
  finished = np.array([True, True, False, True])
  t, s, e, f, cut = answers.append(tokens, starts, ends, finished, [[1, 5], [1, 9, 9]],
                                   [[11], [12, 13, 14, 15]], k=2, n=3, eos_id=2, pad_id=0)
  assert t.shape == (6, 7) and cut == 1
  np.testing.assert_array_equal(t[[0, 1, 3, 4]], tokens)  # the samples keep their rows
  np.testing.assert_array_equal(t[2], [1, 5, 11, 2, 0, 0, 0])  # + EOS
  np.testing.assert_array_equal(t[5], [1, 9, 9, 12, 13, 14, 0])  # cut to n: no EOS
  np.testing.assert_array_equal(s, [2, 2, 2, 3, 3, 3])
  np.testing.assert_array_equal(e, [5, 4, 4, 7, 5, 6])
  np.testing.assert_array_equal(f, [True, True, True, False, True, False])


def grao_config(workdir, train_data, **kw):
  cfg = config(workdir, loss="grao", steps=1, **kw)
  return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_data=train_data))


def test_grao_needs_the_records_chosen_answers(tmp_path):
  with pytest.raises(cli_errors.DataError,
                     match=r"prompts_train.jsonl:1: no 'chosen' string field \(--loss=grao"):
    loop.run(grao_config(tmp_path, f"{TINY}/prompts_train.jsonl"))


@pytest.mark.slow  # the sampler and the step compile (~15 s)
def test_a_grao_run_trains_samples_with_the_reference_answer(tmp_path):
  loop.run(grao_config(tmp_path, f"{TINY}/train.jsonl"))
  train = rows(tmp_path)
  assert len(train) == 1 and np.isfinite(train[0]["loss"])
  assert train[0]["answers/cut"] >= 0 and np.isfinite(train[0]["logps/answer"])
  assert np.isfinite(train[0]["loss/imitation"]) and train[0]["loss/imitation"] != 0.0
