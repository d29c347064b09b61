"""TRL's metric names and tie rule: every loss family's `rewards/accuracy` counts an exact tie
half and reports `rewards/ties`; `--tie_accuracy=loss` (TRL: `chosen > rejected`, a tie
lost) and TRL's plural aliases are applied to each logged row, in metrics.jsonl and
TensorBoard. Expected values are computed by hand (comments) and by a float64 numpy
reference written from the rule, never by the code under test."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref import losses
from jaxpref.train.metrics import MetricWriter, finish_row
from jaxpref.types import Logps, RewardOutputs
from test_faults_metrics import _events


def ref_accuracy(diff, w, tie):
  """sum_b w_b [1 if d_b > 0; 1/2 (half) or 0 (loss) if d_b == 0; 0 if d_b < 0] / sum_b w_b."""
  diff, w = np.asarray(diff, np.float64), np.asarray(w, np.float64)
  win = np.where(diff > 0, 1.0, np.where(diff == 0, 0.5 if tie == "half" else 0.0, 0.0))
  return float(np.sum(win * w) / np.sum(w))


def _both(metrics, key="rewards/accuracy"):
  """{mode: the logged accuracy} for both --tie_accuracy modes."""
  host = {k: float(v) for k, v in metrics.items()}
  return {mode: finish_row(host, mode)[key] for mode in ("half", "loss")}


def test_pairs_dpo():
  # Margins beta*h: 0.1*(1-0)=0.1 > 0, a tie, 0.1*(0-2) < 0, a tie (weight 0: padding).
  policy, ref = np.array([[1., 0.], [.5, .5], [0., 2.], [3., 3.]]), np.zeros((4, 2))
  w = np.array([2., 1., 1., 0.])
  lp = Logps(policy=jnp.asarray(policy, jnp.float32), ref=jnp.asarray(ref, jnp.float32),
             length=jnp.ones((4, 2)), valid=jnp.ones((4, 2), bool), weight=jnp.asarray(w))
  _, metrics = losses.bind("dpo", {})(lp)
  assert float(metrics["rewards/ties"]) == pytest.approx(1 / 4)  # one tie of weight 1 in 4
  got = _both(metrics)
  assert got["half"] == pytest.approx(2.5 / 4) == ref_accuracy(policy[:, 0] - policy[:, 1], w,
                                                                "half")
  assert got["loss"] == pytest.approx(2.0 / 4) == ref_accuracy(policy[:, 0] - policy[:, 1], w,
                                                                "loss")


def test_dpo_at_step_0_reads_half_or_zero():
  """policy = reference: every pair ties, 0.5 (ours) against TRL's 0."""
  p = jnp.asarray(np.random.default_rng(0).normal(size=(8, 2)), jnp.float32)
  lp = Logps(policy=p, ref=p, length=jnp.ones((8, 2)), valid=jnp.ones((8, 2), bool),
             weight=jnp.ones(8))
  _, metrics = losses.bind("dpo", {})(lp)
  assert float(metrics["rewards/ties"]) == 1.0
  assert _both(metrics) == {"half": 0.5, "loss": 0.0}


def test_ranked_lists():
  # One list of K = 3 rewards (3, 1, 1): pairs (0,1) and (0,2) won, (1,2) tied.
  policy = np.array([[3., 1., 1.]])
  lp = Logps(policy=jnp.asarray(policy, jnp.float32), ref=jnp.zeros((1, 3)),
             length=jnp.ones((1, 3)), valid=jnp.ones((1, 3), bool), weight=jnp.ones(1))
  _, metrics = losses.bind("listmle", {})(lp)
  assert float(metrics["rewards/ties"]) == pytest.approx(1 / 3)
  diffs = [policy[0, 0] - policy[0, 1], policy[0, 0] - policy[0, 2], policy[0, 1] - policy[0, 2]]
  got = _both(metrics)
  assert got["half"] == pytest.approx(2.5 / 3) == ref_accuracy(diffs, [1, 1, 1], "half")
  assert got["loss"] == pytest.approx(2.0 / 3) == ref_accuracy(diffs, [1, 1, 1], "loss")


def test_unpaired_kto():
  # Mismatched completions' log-ratio 0, so the reference point z0 = 0; the labelled ones'
  # rewards 0.1 * (1, 0, -1, 0.5) with labels (1, 1, 0, 0): right, tie, right, wrong.
  rho = np.array([1., 0., -1., .5])
  policy = np.stack([rho, np.zeros(4)], 1)
  label = np.array([[1, 1], [1, 1], [0, 0], [0, 0]])
  lp = Logps(policy=jnp.asarray(policy, jnp.float32), ref=jnp.zeros((4, 2)),
             length=jnp.ones((4, 2)), valid=jnp.ones((4, 2), bool), weight=jnp.ones(4),
             label=jnp.asarray(label))
  _, metrics = losses.bind("kto", {})(lp)
  assert float(metrics["rewards/ties"]) == pytest.approx(1 / 4)
  signed = rho * np.where(label[:, 0] == 1, 1.0, -1.0)  # > 0: the side the label says
  got = _both(metrics)
  assert got["half"] == pytest.approx(2.5 / 4) == ref_accuracy(signed, np.ones(4), "half")
  assert got["loss"] == pytest.approx(2.0 / 4) == ref_accuracy(signed, np.ones(4), "loss")


def test_reward_model_bt():
  # Reward differences 0 (tie), 1 (right), -1 (wrong), weights 1, 1, 2.
  reward = np.array([[.5, .5], [1., 0.], [0., 1.]])
  w = np.array([1., 1., 2.])
  lp = RewardOutputs(reward=jnp.asarray(reward, jnp.float32), length=jnp.ones((3, 2)),
                     valid=jnp.ones((3, 2), bool), weight=jnp.asarray(w, jnp.float32))
  _, metrics = losses.bind("bt", {})(lp)
  assert float(metrics["rewards/ties"]) == pytest.approx(1 / 4)
  got = _both(metrics)
  d = reward[:, 0] - reward[:, 1]
  assert got["half"] == pytest.approx(1.5 / 4) == ref_accuracy(d, w, "half")
  assert got["loss"] == pytest.approx(1.0 / 4) == ref_accuracy(d, w, "loss")


def test_attribute_accuracies_per_attribute():
  # Two pairs, two attributes; scores zeta(y_w) - zeta(y_l) = (1, 0) and (0, -2), prefs all
  # 1: attribute 0 has a win and a tie, attribute 1 a tie and a loss.
  s = np.array([[[1., 0.], [0., 0.]], [[0., 0.], [0., 2.]]])  # [B, 2, A]
  lp = RewardOutputs(reward=jnp.zeros((2, 2)), length=jnp.ones((2, 2)),
                     valid=jnp.ones((2, 2), bool), weight=jnp.ones(2),
                     embed=jnp.asarray(s, jnp.float32), attribute_prefs=jnp.ones((2, 2)))
  _, metrics = losses.bind("attribute_bt", {})(lp)
  d = s[:, 0] - s[:, 1]
  for a, (half, loss) in enumerate([(1.5 / 2, 1 / 2), (.5 / 2, 0.)]):
    got = _both(metrics, f"rewards/accuracy_attr{a}")
    assert got["half"] == pytest.approx(half) == ref_accuracy(d[:, a], [1, 1], "half")
    assert got["loss"] == pytest.approx(loss) == ref_accuracy(d[:, a], [1, 1], "loss")
  got = _both(metrics)  # all four entries: 1 win, 2 ties, 1 loss
  assert got["half"] == pytest.approx(2 / 4) and got["loss"] == pytest.approx(1 / 4)


def test_online_accuracy_has_no_ties_to_convert():
  """The online role's `rewards/accuracy` is the share of positive advantages (no tie rule,
  no `rewards/ties`): both modes log it unchanged."""
  row = {"rewards/accuracy": 0.25, "rewards/margin": 1.0, "loss": 0.1}
  assert finish_row(row, "half") == finish_row(row, "loss") == {
      **row, "rewards/accuracies": 0.25, "rewards/margins": 1.0}
  with pytest.raises(ValueError, match="--tie_accuracy='x' is not one of half, loss"):
    finish_row(row, "x")


@pytest.mark.parametrize("mode,accuracy", [("half", 0.625), ("loss", 0.5)])
def test_rows_as_logged(tmp_path, mode, accuracy):
  writer = MetricWriter(str(tmp_path), tie_accuracy=mode)
  writer.write(3, "eval", {"loss": 0.7, "rewards/accuracy": np.float32(0.625),
                           "rewards/ties": np.float32(0.25), "rewards/margin": np.float32(-0.5)})
  writer.close()
  with open(tmp_path / "metrics.jsonl") as f:
    (row,) = [json.loads(line) for line in f]
  assert row["rewards/accuracy"] == row["rewards/accuracies"] == accuracy
  assert row["rewards/margin"] == row["rewards/margins"] == -0.5 and row["rewards/ties"] == 0.25
  events = {tag: v for _, tag, v in _events(tmp_path / "tensorboard")}
  assert events["eval/rewards/accuracies"] == events["eval/rewards/accuracy"] == accuracy
  assert events["eval/rewards/margins"] == -0.5
