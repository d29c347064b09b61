"""Nash-MD and XPO in the online loop (jaxpref/train/game_rollouts.py): a run of each
samples its second set (the geometric mixture, the reference), logs finite losses and the
rollout's metrics; the preference Nash-MD reads is TRL's sigmoid of reward differences."""

import numpy as np
import pytest

from jaxpref.train import game_rollouts, loop
from test_online import config, rows


def test_preference_is_sigmoid_of_scalar_differences_or_the_pairwise_probability():
  s = np.array([[1.0, 0.0], [0.0, 0.0], [0.2, 0.9]])
  np.testing.assert_allclose(game_rollouts.preference(s, False, 1.0),
                             [1 / (1 + np.exp(-1.0)), 0.5, 1 / (1 + np.exp(0.7))])
  # a pairwise source (weight 2) scored on the pair alone returns 2 P(first beats second)
  np.testing.assert_allclose(game_rollouts.preference(2 * s[:, :1], True, 2.0), s[:, 0])


@pytest.mark.slow  # two short runs: over 10 s on 2 cores
@pytest.mark.parametrize("loss", ["nash_md", "xpo"])
def test_a_game_run_trains_on_its_second_samples(tmp_path, loss):
  final = loop.run(config(tmp_path, loss=loss, steps=2, num_generations=2, mixture_coef=0.5))
  train = rows(tmp_path)
  assert [r["step"] for r in train] == [1, 2]
  for r in train:
    assert np.isfinite(r["loss"]) and r["grad_norm"] > 0
    assert 0.0 < r["reward/mean"] and 0.0 < r["reward/opponent_mean"]  # text length / 10
    if loss == "nash_md":
      assert 0.0 < r["rewards/probability"] < 1.0
      assert r["preference/mean"] == pytest.approx(r["rewards/probability"], abs=1e-6)
      assert np.isfinite(r["kl/mean"])
    else:
      assert 0.0 <= r["pairs/chosen_is_reference"] <= 1.0
      assert r["loss/xpo"] < 0  # alpha * log-probs of the reference samples
      assert 0.0 <= r["pairs/fraction"] <= 1.0
  assert final["step"] == 2 and np.isfinite(final["reward/mean"])


def test_game_losses_are_refused_with_several_updates_or_in_a_sum(tmp_path):
  with pytest.raises(ValueError, match="updates_per_rollout must be 1"):
    loop.run(config(tmp_path, loss="nash_md", updates_per_rollout=2))
  with pytest.raises(ValueError, match="combine with no other loss"):
    loop.run(config(tmp_path / "b", loss="0.5*xpo+grpo"))
  with pytest.raises(ValueError, match="mixture_coef must be in"):
    loop.run(config(tmp_path / "c", loss="nash_md", mixture_coef=1.5))
