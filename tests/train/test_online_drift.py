"""DRIFT's pairs (--online.pairs=drift): each group's best sample against its record's
rejected response, laid out by hand; the records' rejected field is required."""

import dataclasses

import numpy as np
import pytest

from jaxpref import cli_errors
from jaxpref.data import make_tiny
from jaxpref.train import drift, loop
from jaxpref.types import GroupBatch

from test_online import config, rows

TINY = make_tiny.OUT


def test_the_best_sample_meets_the_records_negative():
  t = np.array([[[1, 5, 6, 2, 0, 0], [1, 5, 7, 8, 2, 0]],
                [[1, 9, 3, 0, 0, 0], [1, 9, 4, 0, 0, 0]]], np.int32)
  mask = np.zeros(t.shape, np.float32)
  mask[0, 0, 2:4], mask[0, 1, 2:5], mask[1, 0, 2], mask[1, 1, 2] = 1, 1, 1, 1
  batch = GroupBatch(tokens=t, loss_mask=mask, segment_ids=(t > 0).astype(np.int32),
                     valid=np.array([[True, True], [False, True]]),
                     weight=np.ones(2, np.float32),
                     scores=np.array([[0.2, 0.9], [5.0, 0.1]], np.float32))
  out, cut = drift.pairs(batch, [[1, 5], [1, 9]], [[11, 12], [13, 14, 15, 16]], eos_id=2,
                         pad_id=0)
  assert out.tokens.shape == (2, 2, 6) and cut == 1
  np.testing.assert_array_equal(out.tokens[0, 0], t[0, 1])  # the better sample (0.9)
  np.testing.assert_array_equal(out.tokens[0, 1], [1, 5, 11, 12, 2, 0])  # + EOS
  np.testing.assert_array_equal(out.loss_mask[0, 1], [0, 0, 1, 1, 1, 0])
  np.testing.assert_array_equal(out.tokens[1, 0], t[1, 1])  # member 0 is invalid
  np.testing.assert_array_equal(out.tokens[1, 1], [1, 9, 13, 14, 15, 16])  # cut: no EOS
  np.testing.assert_array_equal(out.scores, np.float32([[0.9, 0.2], [0.1, 0.1]]))
  np.testing.assert_array_equal(out.weight, [1.0, 1.0])


def drift_config(workdir, train_data, **kw):
  cfg = config(workdir, loss="dpo", steps=1, pairs="drift", **kw)
  return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_data=train_data))


@pytest.mark.slow  # the sampler and a pair step compile (~15 s)
def test_a_drift_run_trains_samples_against_the_datas_rejected(tmp_path):
  loop.run(drift_config(tmp_path / "drift", f"{TINY}/train.jsonl"))
  train = rows(tmp_path / "drift")
  assert len(train) == 1 and np.isfinite(train[0]["loss"])
  assert train[0]["drift/negatives_cut"] >= 0 and "rewards/accuracy" in train[0]


def test_drift_needs_the_records_rejected_responses(tmp_path):
  with pytest.raises(cli_errors.DataError, match=r"prompts_train.jsonl:1: no 'rejected'"):
    loop.run(drift_config(tmp_path / "none", f"{TINY}/prompts_train.jsonl"))
  with pytest.raises(ValueError, match="--online.pairs=drift makes preference pairs"):
    loop.run(dataclasses.replace(drift_config(tmp_path / "pg", f"{TINY}/train.jsonl"),
                                 loss="grpo"))
