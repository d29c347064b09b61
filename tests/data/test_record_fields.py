"""Optional numeric record fields: `weight`, `chosen_score`/`rejected_score` and `label_smoothing`."""

import dataclasses
import os

import numpy as np
import pytest

from jaxpref.data import DataError, PairDataset, Tokenizer, read_pairs
from jaxpref.data import make_tiny

TOK = Tokenizer.load(os.path.join(make_tiny.OUT, "tokenizer.model"))


def write(tmp_path, lines):
  path = tmp_path / "d.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def rec(extra=""):
  return '{"prompt": "name a fruit.", "chosen": "apple.", "rejected": "dog."' + extra + "}"


def test_weights_and_scores_reach_the_batch(tmp_path):
  path = write(tmp_path, [rec(', "weight": 2, "chosen_score": 8, "rejected_score": 3.5'),
                          rec(', "weight": 0.5, "chosen_score": 1, "rejected_score": 0')])
  records, _ = read_pairs(path)
  ds = PairDataset(records, TOK, 16)
  batch = ds.batch(np.array([1, 0]), weight=np.array([1.0, 0.0]))
  np.testing.assert_array_equal(batch.weight, [0.5, 0.0])  # record weight x padding
  np.testing.assert_array_equal(batch.scores, [[1, 0], [8, 3.5]])
  assert batch.valid.tolist() == [[True, True], [False, False]]


def test_no_fields_means_weight_one_and_no_scores(tmp_path):
  records, _ = read_pairs(write(tmp_path, [rec(), rec()]))
  batch = PairDataset(records, TOK, 16).batch(np.array([0, 1]))
  assert batch.scores is None and batch.weight.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("extra,needle", [
    (', "weight": -1', "field 'weight' must be a finite number >= 0"),
    (', "weight": "2"', "field 'weight'"),
    (', "weight": true', "field 'weight'"),
    (', "chosen_score": 3', "field 'rejected_score' is missing"),
    (', "chosen_score": "a", "rejected_score": 1', "field 'chosen_score' must be a finite number"),
])
def test_bad_numeric_fields_are_named(tmp_path, extra, needle):
  with pytest.raises(DataError, match=r"d.jsonl:2: ") as e:
    read_pairs(write(tmp_path, [rec(), rec(extra)]))
  assert needle in str(e.value)


def test_scores_in_some_records_only_is_an_error(tmp_path):
  path = write(tmp_path, [rec(', "chosen_score": 1, "rejected_score": 0'), rec(), rec()])
  with pytest.raises(DataError, match=r"d.jsonl:2: fields 'chosen_score'/'rejected_score' are missing"):
    read_pairs(path)


def test_label_smoothing_reaches_the_batch(tmp_path):
  path = write(tmp_path, [rec(', "label_smoothing": 0.25'), rec(', "label_smoothing": 0')])
  records, _ = read_pairs(path)
  batch = PairDataset(records, TOK, 16).batch(np.array([1, 0]))
  np.testing.assert_array_equal(batch.label_smoothing, [0.0, 0.25])
  assert PairDataset(read_pairs(write(tmp_path, [rec()]))[0], TOK, 16).batch(
      np.array([0])).label_smoothing is None


@pytest.mark.parametrize("value", ["-0.1", "0.6", '"0.1"', "true", "null"])
def test_bad_label_smoothing_is_named(tmp_path, value):
  with pytest.raises(DataError, match=r"d.jsonl:2: field 'label_smoothing' must be a finite "
                                      r"number in \[0, 0.5\]"):
    read_pairs(write(tmp_path, [rec(', "label_smoothing": 0.1'),
                                rec(f', "label_smoothing": {value}')]))


def test_label_smoothing_in_some_records_only_is_an_error(tmp_path):
  path = write(tmp_path, [rec(', "label_smoothing": 0.1'), rec()])
  with pytest.raises(DataError, match=r"d.jsonl:2: field 'label_smoothing' is missing"):
    read_pairs(path)


@pytest.mark.slow  # over 10 s on 2 cores: kept out of the fast tier
def test_tiny_data_with_per_record_label_smoothing_trains(tmp_path):
  """The field flows records -> batch -> Logps -> dpo: training on it lowers the loss, and
  equal per-record values evaluate exactly as the scalar hyperparameter."""
  import json

  import jax
  from flax import nnx

  from jaxpref import losses, models
  from jaxpref.train.config import OptimConfig
  from jaxpref.train.optimizer import make_optimizer
  from jaxpref.train.reference import Reference
  from jaxpref.train.roles import policy
  from jaxpref.train.step import TrainState, make_steps

  tiny = [json.loads(line) for line in open(os.path.join(make_tiny.OUT, "train.jsonl"))][:16]
  path = write(tmp_path, [json.dumps({**r, "label_smoothing": 0.2}) for r in tiny])
  batch = PairDataset(read_pairs(path)[0], TOK, 32).batch(np.arange(16))
  plain = dataclasses.replace(batch, label_smoothing=None)
  model = models.Decoder(models.get_config("tiny"), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  optimizer = make_optimizer(OptimConfig(learning_rate=3e-3, warmup_steps=0), 10)
  forward = policy.forward(graphdef)
  train_step, eval_step = make_steps(forward, losses.bind("dpo", {}), optimizer)
  _, scalar_eval = make_steps(forward, losses.bind("dpo", {"label_smoothing": 0.2}), optimizer)
  ref = Reference("model", jax.tree.map(lambda x: x.copy(), params))
  state = TrainState(step=np.int32(0), params=params, opt_state=optimizer.init(params))
  history = []
  for _ in range(8):
    state, metrics = train_step(state, ref, batch)
    history.append(float(metrics["loss"]))
  assert np.isfinite(history).all() and history[-1] < history[0], history
  per_pair = float(eval_step(state.params, ref, batch)[0]["loss"])
  np.testing.assert_allclose(per_pair, float(scalar_eval(state.params, ref, plain)[0]["loss"]),
                             rtol=1e-5)
  assert per_pair != pytest.approx(float(eval_step(state.params, ref, plain)[0]["loss"]), rel=1e-3)
